"""Tests for L{coder1_relay.telemetry}: counts without content."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay import telemetry as telemetry_module
from coder1_relay.code_names import UNKNOWN, CodeNames
from coder1_relay.crash_budget import CrashBudget, CrashBudgetPolicy
from coder1_relay.telemetry import MAX_PENDING_CRASHES, MAX_VERSIONS, Telemetry, TelemetrySettings

DAY = 86400.0
CANARY = "CANARY-123"


def _report(**changes: object) -> dict[str, Any]:
    report: dict[str, Any] = {
        "type": "coder1_bridge.replay.BadResume",
        "frames": [{"module": "coder1_bridge.commands", "function": "_spawn", "line": 12}],
        "version": "0.1.0",
    }
    report.update(changes)
    return report


def _frame(**changes: object) -> dict[str, Any]:
    return _report(frames=[{**_report()["frames"][0], **changes}])


class TelemetryTests(SynchronousTestCase):
    """L{Telemetry} buffers counters, writes them on a timer and prunes them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.path = self.directory / "telemetry.sqlite"

    def _start(self, **kwargs: Any) -> Telemetry:
        telemetry = Telemetry(str(self.path), self.clock, **kwargs)
        telemetry.startService()
        self.addCleanup(self._stop, telemetry)
        return telemetry

    def _stop(self, telemetry: Telemetry) -> None:
        if telemetry.running:
            telemetry.stopService()

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the file as another process would."""
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            rows = db.execute(sql).fetchall()
        db.close()
        return rows

    def _counts(self) -> list[tuple[Any, ...]]:
        return self._rows("SELECT period, name, label, value FROM counts ORDER BY period, name")

    def _all_bytes(self) -> bytes:
        """Everything on disk: the database and any journal beside it."""
        return b"".join(p.read_bytes() for p in sorted(self.directory.iterdir()))

    def test_flush_on_timer(self) -> None:
        """Counters reach the database when the flush timer fires, not before."""
        telemetry = self._start()
        telemetry.command_started()
        telemetry.command_started()
        telemetry.command_completed()
        self.clock.advance(9)
        self.assertEqual(self._counts(), [])
        self.clock.advance(1)
        self.assertEqual(
            self._counts(), [(0, "command_completed", "", 1), (0, "command_started", "", 2)]
        )
        telemetry.command_started()
        self.clock.advance(10)
        self.assertEqual(self._counts()[1], (0, "command_started", "", 3))

    def test_flush_on_stop(self) -> None:
        """Stopping writes what is pending, and closes connections still open."""
        telemetry = self._start()
        self.clock.advance(5)
        telemetry.connection_opened("bridge", "conn-1")
        telemetry.bridge_version("0.1.0")
        self.clock.advance(2)
        telemetry.stopService()
        self.assertEqual(self._counts(), [(0, "bridge_version", "0.1.0", 1)])
        self.assertEqual(
            self._rows("SELECT role, opened_at, closed_at FROM connections"), [("bridge", 5, 7)]
        )

    def test_connections(self) -> None:
        """A connection is one row with its role and times; the relay's id is not kept."""
        telemetry = self._start()
        telemetry.connection_opened("ide", CANARY)
        telemetry.connection_opened("bridge", "other")
        self.clock.advance(60)
        telemetry.connection_closed(CANARY)
        telemetry.connection_closed("never-opened")
        self.assertEqual(telemetry.snapshot()["open_connections"], {"bridge": 1, "ide": 0})
        self.clock.advance(10)
        telemetry.stopService()
        self.assertEqual(
            self._rows("SELECT id, role, opened_at, closed_at FROM connections ORDER BY id"),
            [(1, "ide", 0, 60), (2, "bridge", 0, 70)],
        )
        self.assertNotIn(CANARY.encode(), self._all_bytes())

    def test_unknown_role(self) -> None:
        """A role outside the vocabulary is a bug in the caller."""
        telemetry = self._start()
        self.assertRaises(ValueError, telemetry.connection_opened, "admin", "conn-1")

    def test_bridge_versions(self) -> None:
        """Versions are counted each; anything unlike a version counts as invalid."""
        telemetry = self._start()
        for version in (
            "0.1.0",
            "0.1.0",
            "0.2.0rc1.dev3",
            "0.2.0+CANARY",
            "1.0.0e7f3a9",
            "x; rm -rf /",
            CANARY,
            "1\n",
        ):
            telemetry.bridge_version(version)
        telemetry.stopService()
        self.assertEqual(
            self._counts(),
            [
                (0, "bridge_version", "0.1.0", 2),
                (0, "bridge_version", "0.2.0rc1.dev3", 1),
                (0, "bridge_version", "invalid", 5),
            ],
        )

    def test_bridge_versions_bounded(self) -> None:
        """
        Past L{MAX_VERSIONS} distinct versions in an hour, more count as
        "other": a bridge reconnecting under ever new versions adds no rows.
        """
        telemetry = self._start()
        for n in range(MAX_VERSIONS + 50):
            telemetry.bridge_version(f"0.{n}")
        telemetry.bridge_version("0.1")
        telemetry.stopService()
        labels = {row[2]: row[3] for row in self._counts()}
        self.assertEqual(len(labels), MAX_VERSIONS + 1)
        self.assertEqual(labels["other"], 50)
        self.assertEqual(labels["0.1"], 2)

    def test_prune(self) -> None:
        """Rows over 30 days old go, in every table; a 29-day-old row stays."""
        telemetry = self._start()
        for when in (0, DAY + 1):
            self.clock.advance(when - self.clock.seconds())
            telemetry.connection_opened("ide", "conn")
            telemetry.command_started()
            telemetry.connection_closed("conn")
            self.assertTrue(telemetry.crash_report(_report()))
        self.clock.advance(30 * DAY + 1 - self.clock.seconds())
        self.assertEqual(self._counts(), [(86400, "command_started", "", 1)])
        self.assertEqual(self._rows("SELECT closed_at FROM connections"), [(DAY + 1,)])
        self.assertEqual(self._rows("SELECT received_at FROM crash_reports"), [(DAY + 1,)])

    def test_prune_at_start(self) -> None:
        """Starting prunes what an earlier run left over 30 days ago."""
        telemetry = self._start()
        telemetry.command_started()
        telemetry.stopService()
        self.clock.advance(30 * DAY)
        self._start().stopService()
        self.assertEqual(len(self._counts()), 1)
        self.clock.advance(1)
        self._start().stopService()
        self.assertEqual(self._counts(), [])

    def test_file_mode(self) -> None:
        """The database file is private to the relay's user, whatever the umask."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self._start()
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_existing_file_tightened(self) -> None:
        """A database file left readable by others is made private."""
        self.path.touch(0o644)
        self.path.chmod(0o644)
        self._start()
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_memory(self) -> None:
        """Without a path the database lives in memory."""
        telemetry = Telemetry(None, self.clock)
        telemetry.startService()
        telemetry.command_started()
        self.assertEqual(telemetry.snapshot()["counts"], [])
        self.clock.advance(10)
        snapshot = telemetry.snapshot()
        telemetry.stopService()
        self.assertEqual(
            snapshot["counts"],
            [{"period": 0, "name": "command_started", "label": "", "value": 1}],
        )
        self.assertEqual(list(self.directory.iterdir()), [])

    def test_crash_report_stored(self) -> None:
        """
        A crash report whose names are all in the relay's copy of the bridge's
        code is stored with them, and a signature: the same crash, the same one.
        """
        telemetry = self._start()
        self.clock.advance(3)
        self.assertTrue(telemetry.crash_report(_report()))
        self.assertEqual(
            telemetry.snapshot()["pending"], {"counts": [], "connections": 0, "crash_reports": 1}
        )
        self.clock.advance(10)
        self.assertTrue(telemetry.crash_report(_report()))
        self.assertTrue(telemetry.crash_report(_frame(line=13)))
        self.clock.advance(10)
        rows = telemetry.snapshot()["crash_reports"]
        assert isinstance(rows, list)
        first = rows[-1]
        signature = first.pop("signature")
        self.assertEqual(first, {"received_at": 3, **_report()})
        self.assertRegex(signature, "^[0-9a-f]{16}$")
        self.assertEqual(rows[-2]["signature"], signature)
        self.assertNotEqual(rows[0]["signature"], signature)

    def test_vocabulary_read_at_the_first_report(self) -> None:
        """
        The relay reads its copy of the bridge's code for the vocabulary when the
        first crash report comes, not when it starts (reading it costs memory kept
        for good), and only once.
        """
        reads: list[None] = []
        read = CodeNames.of_packages

        def counted() -> CodeNames:
            reads.append(None)
            return read()

        self.patch(telemetry_module.CodeNames, "of_packages", staticmethod(counted))
        telemetry = self._start()
        self.assertEqual(reads, [])
        self.assertTrue(telemetry.crash_report(_report()))
        self.assertTrue(telemetry.crash_report(_frame(line=13)))
        self.assertEqual(reads, [None])

    def test_names_not_in_the_code_are_not_kept(self) -> None:
        """
        A name that matches the patterns but is in no module of the relay's
        copy of the bridge (a bridge choosing its words) is kept as "?": the
        audit's canary, sent as a type, a module and a function, is not on disk.
        """
        canary = "CANARY_7f3a9"
        telemetry = self._start()
        for report in (
            _report(type=canary),
            _report(type=f"coder1_bridge.commands.{canary}"),
            _report(type=f"coder1_bridge.{canary.lower()}.BadResume"),
            _frame(module=f"coder1_bridge.{canary.lower()}"),
            _frame(function=canary),
        ):
            self.assertTrue(telemetry.crash_report(report))
        telemetry.stopService()
        rows = self._rows("SELECT type, frames FROM crash_reports ORDER BY id")
        self.assertEqual(
            [(t, json.loads(f)[0]["module"], json.loads(f)[0]["function"]) for t, f in rows],
            [
                (UNKNOWN, "coder1_bridge.commands", "_spawn"),
                (UNKNOWN, "coder1_bridge.commands", "_spawn"),
                (UNKNOWN, "coder1_bridge.commands", "_spawn"),
                ("coder1_bridge.replay.BadResume", UNKNOWN, UNKNOWN),
                ("coder1_bridge.replay.BadResume", "coder1_bridge.commands", UNKNOWN),
            ],
        )
        self.assertNotIn(b"7f3a9", self._all_bytes())

    def test_budget_per_bridge_and_session(self) -> None:
        """
        A bridge past its day's budget has its reports counted, not kept; the
        other bridges' are still kept, until their session's budget is used.
        The next day starts afresh.
        """
        policy = CrashBudgetPolicy(per_bridge=2, per_session=3, per_relay=100)
        telemetry = self._start(settings=TelemetrySettings(crash_budget=policy))
        kept = [telemetry.crash_report(_report(), "mallory", 1) for _ in range(5)]
        self.assertEqual(kept, [True, True, False, False, False])
        self.assertTrue(telemetry.crash_report(_report(), "mallory", 2))
        self.assertFalse(telemetry.crash_report(_report(), "mallory", 3))
        self.assertTrue(telemetry.crash_report(_report(), "alice", 1))
        self.clock.advance(DAY)
        self.assertTrue(telemetry.crash_report(_report(), "mallory", 1))
        telemetry.stopService()
        self.assertEqual(self._rows("SELECT count(*) FROM crash_reports"), [(5,)])
        self.assertIn((0, "crash_report_dropped", "budget", 4), self._counts())

    def test_flood_stays_under_the_cap(self) -> None:
        """
        Rows past the database's size cap are dropped and counted, never
        written: a flood of the largest reports and of connections from many
        sessions leaves the file under C{max_bytes}, and the counts still go in.
        """
        cap = 1024 * 1024
        policy = CrashBudgetPolicy(per_bridge=10**6, per_session=10**6, per_relay=10**6)
        telemetry = self._start(settings=TelemetrySettings(max_bytes=cap, crash_budget=policy))
        frames = [
            {"module": "coder1_bridge.connection", "function": "_dispatch", "line": 99_999}
        ] * 32
        big = _report(frames=frames)
        for round_ in range(60):
            for n in range(MAX_PENDING_CRASHES):
                telemetry.crash_report(big, f"s{round_}-{n}", 1)
                telemetry.connection_opened("bridge", f"c{n}")
                telemetry.connection_closed(f"c{n}")
            telemetry.command_started()
            self.clock.advance(10)
            self.assertLessEqual(self.path.stat().st_size, cap)
        telemetry.stopService()
        self.assertLessEqual(self.path.stat().st_size, cap)
        counts = {(name, label): value for _, name, label, value in self._counts()}
        (kept,) = self._rows("SELECT count(*) FROM crash_reports")[0]
        self.assertEqual(counts[("command_started", "")], 60)
        self.assertEqual(kept + counts[("crash_report_dropped", "full")], 60 * MAX_PENDING_CRASHES)
        self.assertGreater(counts[("connection_dropped", "")], 0)
        self.assertGreater(kept, 0)

    def test_old_crash_rows_deleted(self) -> None:
        """
        A database from a relay before crash rows were made of known names (no
        signature column) has its crash rows deleted at start: they may hold
        names a bridge chose.
        """
        with sqlite3.connect(self.path) as db:
            db.execute(
                "CREATE TABLE crash_reports (id INTEGER PRIMARY KEY, received_at REAL,"
                " type TEXT, version TEXT, frames TEXT)"
            )
            db.execute("INSERT INTO crash_reports VALUES (1, 0, ?, '0.1.0', '[]')", (CANARY,))
        db.close()
        telemetry = self._start()
        self.assertTrue(telemetry.crash_report(_report()))
        telemetry.stopService()
        self.assertEqual(self._rows("SELECT type FROM crash_reports"), [(_report()["type"],)])
        self.assertNotIn(CANARY.encode(), self._all_bytes())

    def test_crash_report_refused(self) -> None:
        """A report with a message, a path or arguments is refused and only counted."""
        telemetry = self._start()
        for report in (
            _report(message="boom"),
            _frame(path="/home/alice/x.py"),
            _frame(args=["x"]),
            _frame(function="handle(x)"),
            "a string",
        ):
            self.assertFalse(telemetry.crash_report(report), report)
        telemetry.stopService()
        self.assertEqual(self._rows("SELECT * FROM crash_reports"), [])
        self.assertEqual(self._counts(), [(0, "crash_report_refused", "", 5)])

    def test_crash_reports_capped(self) -> None:
        """Past the limit between two flushes, valid reports are counted, not kept."""
        telemetry = self._start()
        for n in range(MAX_PENDING_CRASHES):
            self.assertTrue(telemetry.crash_report(_report(), str(n)))
        self.assertFalse(telemetry.crash_report(_report(), "late"))
        self.clock.advance(10)
        self.assertTrue(telemetry.crash_report(_report(), "later"))
        telemetry.stopService()
        self.assertEqual(
            self._rows("SELECT count(*) FROM crash_reports"), [(MAX_PENDING_CRASHES + 1,)]
        )
        self.assertEqual(self._counts(), [(0, "crash_report_dropped", "pending", 1)])

    def test_canary(self) -> None:
        """Content passed through any entry point reaches neither the disk nor the log."""
        with capturedLogs() as events:
            telemetry = self._start()
            telemetry.connection_opened("bridge", CANARY)
            telemetry.bridge_version(CANARY)
            telemetry.bridge_version("x; rm -rf /")
            for report in (
                _report(type=CANARY),
                _report(version=CANARY),
                _report(message=CANARY),
                _frame(module=CANARY),
                _frame(function=CANARY),
                _frame(line=CANARY),
                _frame(path=CANARY),
                _report(frames=[CANARY]),
                [CANARY],
                {CANARY: _report()},
            ):
                self.assertFalse(telemetry.crash_report(report), report)
            self.assertTrue(telemetry.crash_report(_report()))
            self.clock.advance(10)
            telemetry.connection_closed(CANARY)
            telemetry.stopService()

        on_disk = self._all_bytes()
        self.assertIn(b"BadResume", on_disk)
        self.assertNotIn(CANARY.encode(), on_disk)
        self.assertNotIn(b"rm -rf", on_disk)
        logged = "".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("Telemetry in", logged)
        self.assertNotIn(CANARY, logged)

    def test_write_failure(self) -> None:
        """A failed write is logged and dropped; the flush timer keeps going."""
        telemetry = self._start()
        with sqlite3.connect(self.path) as other:
            other.execute("DROP TABLE counts")
        other.close()
        with capturedLogs() as events:
            telemetry.command_started()
            self.clock.advance(10)
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Telemetry write failed (no such table: counts); this batch is dropped"],
        )
        telemetry.connection_opened("ide", "conn")
        telemetry.connection_closed("conn")
        self.clock.advance(10)
        self.assertEqual(len(self._rows("SELECT * FROM connections")), 1)


class CrashBudgetTests(SynchronousTestCase):
    """L{CrashBudget} counts per bridge, per session and in all, per UTC day."""

    def test_relay_wide_budget(self) -> None:
        """Past the relay's budget for the day nobody's report is kept, until midnight UTC."""
        clock = Clock()
        clock.advance(DAY - 2)
        budget = CrashBudget(clock, CrashBudgetPolicy(per_bridge=5, per_session=5, per_relay=3))
        self.assertEqual([budget.take(f"s{n}", 1) for n in range(4)], [True, True, True, False])
        clock.advance(1)
        self.assertFalse(budget.take("s9", 1))
        clock.advance(1)
        self.assertTrue(budget.take("s9", 1))


class CodeNamesTests(SynchronousTestCase):
    """L{CodeNames} is read from the relay's own copy of the bridge's packages."""

    def test_vocabulary(self) -> None:
        """
        Every module of both packages is known, with the functions, methods and
        classes defined in it, nested ones too; names of other code are not.
        """
        names = CodeNames.of_packages()
        self.assertIn("coder1_bridge.connection", names.modules)
        self.assertIn("coder1_wire.crash", names.modules)
        kept = names.keep(
            {
                "type": "coder1_bridge.config.StalePairingError",
                "version": "0.1.0",
                "frames": [
                    {"module": "coder1_wire.crash", "function": "build_crash_report", "line": 1},
                    {"module": "coder1_wire.crash", "function": "<genexpr>", "line": 2},
                    {"module": "coder1_wire.crash", "function": "fullmatch", "line": 3},
                    {"module": "twisted.internet.defer", "function": "callback", "line": 4},
                ],
            }
        )
        self.assertEqual(kept["type"], "coder1_bridge.config.StalePairingError")
        self.assertEqual(
            [(f["module"], f["function"]) for f in kept["frames"]],
            [
                ("coder1_wire.crash", "build_crash_report"),
                ("coder1_wire.crash", "<genexpr>"),
                ("coder1_wire.crash", UNKNOWN),
                (UNKNOWN, UNKNOWN),
            ],
        )

    def test_builtin_exceptions(self) -> None:
        """Python's built-in exception classes are known by their bare names; others are not."""
        names = CodeNames({})
        report = {"type": "KeyError", "version": "1", "frames": []}
        self.assertEqual(names.keep(report)["type"], "KeyError")  # type: ignore[arg-type]
        report["type"] = "print"
        self.assertEqual(names.keep(report)["type"], UNKNOWN)  # type: ignore[arg-type]
