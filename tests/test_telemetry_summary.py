"""
Tests for C{coder1-relay telemetry} (L{coder1_relay.telemetry_summary},
L{coder1_relay.cli}): the relay's telemetry as an operator reads it.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from contextlib import closing

from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_relay import telemetry_summary
from coder1_relay.crash_budget import DAY
from coder1_relay.redis_telemetry import RedisTelemetry
from coder1_relay.telemetry import RETENTION, Telemetry

from .loopback import reactor
from .test_redis_store import RedisTestCase
from .test_telemetry import _frame, _report

RELAY_SCRIPT = os.path.join(os.path.dirname(sys.executable), "coder1-relay")
#: Tuesday 2026-12-01 09:00 UTC.
START = 1796115600.0


def _fill(telemetry: Telemetry, clock: Clock) -> None:
    """Two days of a small relay's life, ending at 2026-12-02 10:00 UTC."""
    for version in ("0.1.0", "0.1.0", "0.2.0", "CANARY_7f3a9"):
        telemetry.bridge_version(version)
    telemetry.connection_opened("bridge", "b1")
    telemetry.connection_opened("ide", "t1")
    telemetry.command_started()
    telemetry.command_completed()
    telemetry.throttled("rate")
    telemetry.crash_report(_report(), "s", 1)
    telemetry.crash_report(_report(), "s", 2)
    telemetry.crash_report(_frame(function="CANARY_7f3a9"), "s", 3)
    clock.advance(60)
    telemetry.connection_closed("t1")
    clock.advance(DAY + 3600 - 60)
    telemetry.command_started()
    telemetry.connection_closed("b1")
    telemetry.crash_report(["not", "a", "report"])
    clock.advance(10)


class RenderTests(SynchronousTestCase):
    """L{telemetry_summary.render} on a real telemetry database."""

    def test_summary(self) -> None:
        """
        Per hour and per day, what happened; versions and throttles by label;
        crash reports grouped by signature with the frame they ended in; what
        was not kept; the oldest row's age.  Names a bridge made up show as ?.
        """
        clock = Clock()
        clock.advance(START)
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("telemetry.sqlite").path
        telemetry = Telemetry(path, clock)
        telemetry.startService()
        _fill(telemetry, clock)
        telemetry.stopService()

        summary = telemetry_summary.from_sqlite(path, "the test's relay")
        text = telemetry_summary.render(summary, now=clock.seconds(), hours=48)
        self.assertNotIn("CANARY", text)
        lines = text.splitlines()
        self.assertRegex(lines[0], r"^Telemetry in the test's relay \(\d+ KiB\)\.$")
        self.assertEqual(
            lines[1],
            "Oldest row: 25 hours old (2026-12-01 09:00); rows are deleted when 30 days old.",
        )
        self.assertIn(
            "  hour              tabs  bridges  commands  completed  crashes  throttled", lines
        )
        self.assertIn(
            "  2026-12-01 09:00     1        0         1          1        3          1", lines
        )
        self.assertIn(
            "  2026-12-02 10:00     0        1         1          0        0          0", lines
        )
        self.assertIn("  2026-12-01     1        0         1          1        3          1", lines)
        self.assertIn("Bridge versions (connections): 0.1.0 2, 0.2.0 1, invalid 1", lines)
        self.assertIn("Throttled, by reason: rate 1", lines)
        (same,) = [line for line in lines if " 2 x " in line]
        self.assertRegex(
            same,
            r"^  [0-9a-f]{16}  2 x coder1_bridge\.replay\.BadResume in coder1_bridge\.commands, "
            r"_spawn, line 12 \(version 0\.1\.0; last 2026-12-01 09:00\)$",
        )
        self.assertTrue(
            any(
                "1 x coder1_bridge.replay.BadResume in coder1_bridge.commands, ?," in line
                for line in lines
            )
        )
        self.assertEqual(lines[-1], "Not kept: 1 malformed crash report.")

    def test_older_relay_crash_rows_not_shown(self) -> None:
        """
        Crash rows of a relay from before they held known names only (no
        signature column; they may hold text a bridge chose) are counted, not shown.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("telemetry.sqlite").path
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE counts (period INTEGER, name TEXT, label TEXT, value INTEGER)")
            db.execute("CREATE TABLE connections (role TEXT, opened_at REAL, closed_at REAL)")
            db.execute(
                "CREATE TABLE crash_reports (id INTEGER PRIMARY KEY, received_at REAL,"
                " type TEXT, version TEXT, frames TEXT)"
            )
            db.execute("INSERT INTO counts VALUES (?, 'command_started', '', 1)", (START,))
            db.execute(
                "INSERT INTO crash_reports VALUES (1, ?, 'CANARY_7f3a9', '0.1.0', '[]')", (START,)
            )
        text = telemetry_summary.render(telemetry_summary.from_sqlite(path, "here"), now=START)
        self.assertNotIn("CANARY", text)
        self.assertIn(
            "Crash reports: 1 row written by an older relay, not shown; the relay deletes them"
            " when it next starts.",
            text,
        )

    def test_empty(self) -> None:
        """A relay that has recorded nothing yet says so."""
        summary = telemetry_summary.Summary("here")
        self.assertEqual(
            telemetry_summary.render(summary), "Telemetry in here.\nIt holds nothing yet.\n"
        )


class CommandTests(TestCase):
    """The real C{coder1-relay telemetry} command."""

    async def test_state_dir(self) -> None:
        """It prints the summary of the relay in C{--state-dir}, exit status 0."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        clock = Clock()
        clock.advance(time.time() - DAY)
        telemetry = Telemetry(directory.child("telemetry.sqlite").path, clock)
        telemetry.startService()
        _fill(telemetry, clock)
        telemetry.stopService()
        out, err, status = await getProcessOutputAndValue(
            RELAY_SCRIPT,
            ["telemetry", "--state-dir", directory.path],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual((err, status), (b"", 0))
        self.assertIn(b"Per day (UTC):", out)
        self.assertRegex(out.decode(), r"\nOldest row: 2[45] hours old ")

    async def test_no_telemetry(self) -> None:
        """A directory without telemetry: one sentence saying what to give, exit status 1."""
        out, err, status = await getProcessOutputAndValue(
            RELAY_SCRIPT,
            ["telemetry", "--state-dir", self.mktemp()],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual((out, status), (b"", 1))
        self.assertRegex(
            err.decode(),
            r"^coder1-relay: There is no telemetry at \S+telemetry\.sqlite\. Give the relay's "
            r"--state-dir, or --store for relay processes that share Redis\.\n$",
        )

    async def test_redis_unreachable(self) -> None:
        """A --store nobody answers at: one sentence, exit status 1, no traceback."""
        from .redis_server import free_port

        out, err, status = await getProcessOutputAndValue(
            RELAY_SCRIPT,
            ["telemetry", "--store", f"redis://127.0.0.1:{free_port()}/0"],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual((out, status), (b"", 1))
        self.assertRegex(
            err.decode(),
            r"^coder1-relay: Cannot read telemetry from redis://127\.0\.0\.1:\d+/0 \(.*\)\. "
            r"Check that Redis runs and the --store options match the relay's\.\n$",
        )
        self.assertNotIn(b"Traceback", err)


class SharedSummaryTests(RedisTestCase):
    """The summary of several relay processes' telemetry in Redis."""

    async def test_from_redis(self) -> None:
        """What two relay processes wrote to Redis is summed up by the real command."""
        await self.start_server()
        clock = Clock()
        clock.advance(time.time() - DAY)
        for _ in range(2):
            client = await self.client()
            await client.when_ready()
            telemetry = Telemetry(None, clock, shared=RedisTelemetry(client, RETENTION, 1000))
            telemetry.startService()
            telemetry.command_started()
            telemetry.crash_report(_report(), "s", 1)
            telemetry.stopService()
            await client.call("PING")

        async def written() -> bool:
            counts = await client.call("KEYS", "coder1:telemetry:counts:*")
            crashes = await client.call("KEYS", "coder1:telemetry:crashes:*")
            return (
                len(counts) == len(crashes) == 1
                and await client.call("HGET", counts[0], "command_started|") == "2"
                and await client.call("LLEN", crashes[0]) == 2
            )

        await self.eventually(written, "both relays' writes")
        out, err, status = await getProcessOutputAndValue(
            RELAY_SCRIPT, ["telemetry", "--store", self.server.url], env=os.environ, reactor=reactor
        )
        self.assertEqual((err, status), (b"", 0))
        self.assertIn(f"Telemetry in {self.server.url} (prefix coder1:).".encode(), out)
        self.assertRegex(out.decode(), r"  [0-9a-f]{16}  2 x coder1_bridge\.replay\.BadResume")
