"""Tests for L{coder1_relay.telemetry}: counts without content."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay.telemetry import MAX_PENDING_CRASHES, Telemetry

DAY = 86400.0
CANARY = "CANARY-123"


def _report(**changes: object) -> dict[str, Any]:
    report: dict[str, Any] = {
        "type": "coder1_bridge.commands.SpawnError",
        "frames": [{"module": "coder1_bridge.commands", "function": "handle", "line": 12}],
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

    def _start(self, **kwargs: float) -> Telemetry:
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

    def test_flushOnTimer(self) -> None:
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

    def test_flushOnStop(self) -> None:
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

    def test_unknownRole(self) -> None:
        """A role outside the vocabulary is a bug in the caller."""
        telemetry = self._start()
        self.assertRaises(ValueError, telemetry.connection_opened, "admin", "conn-1")

    def test_bridgeVersions(self) -> None:
        """Versions are counted each; anything unlike a version counts as invalid."""
        telemetry = self._start()
        for version in ("0.1.0", "0.1.0", "0.2.0rc1+local.3", "x; rm -rf /", CANARY, "1\n"):
            telemetry.bridge_version(version)
        telemetry.stopService()
        self.assertEqual(
            self._counts(),
            [
                (0, "bridge_version", "0.1.0", 2),
                (0, "bridge_version", "0.2.0rc1+local.3", 1),
                (0, "bridge_version", "invalid", 3),
            ],
        )

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

    def test_pruneAtStart(self) -> None:
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

    def test_fileMode(self) -> None:
        """The database file is private to the relay's user, whatever the umask."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self._start()
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_existingFileTightened(self) -> None:
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

    def test_crashReportStored(self) -> None:
        """A valid crash report is stored as it came."""
        telemetry = self._start()
        self.clock.advance(3)
        self.assertTrue(telemetry.crash_report(_report()))
        self.assertEqual(
            telemetry.snapshot()["pending"], {"counts": [], "connections": 0, "crash_reports": 1}
        )
        self.clock.advance(10)
        self.assertEqual(telemetry.snapshot()["crash_reports"], [{"received_at": 3, **_report()}])

    def test_crashReportRefused(self) -> None:
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

    def test_crashReportsCapped(self) -> None:
        """Past the limit between two flushes, valid reports are counted, not kept."""
        telemetry = self._start()
        for _ in range(MAX_PENDING_CRASHES):
            self.assertTrue(telemetry.crash_report(_report()))
        self.assertFalse(telemetry.crash_report(_report()))
        self.clock.advance(10)
        self.assertTrue(telemetry.crash_report(_report()))
        telemetry.stopService()
        self.assertEqual(
            self._rows("SELECT count(*) FROM crash_reports"), [(MAX_PENDING_CRASHES + 1,)]
        )
        self.assertEqual(self._counts(), [(0, "crash_report_dropped", "", 1)])

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
        self.assertIn(b"SpawnError", on_disk)
        self.assertNotIn(CANARY.encode(), on_disk)
        self.assertNotIn(b"rm -rf", on_disk)
        logged = "".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("Telemetry in", logged)
        self.assertNotIn(CANARY, logged)

    def test_writeFailure(self) -> None:
        """A failed write is logged and dropped; the flush timer keeps going."""
        telemetry = self._start()
        with sqlite3.connect(self.path) as other:
            other.execute("DROP TABLE counts")
        other.close()
        telemetry.command_started()
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        telemetry.connection_opened("ide", "conn")
        telemetry.connection_closed("conn")
        self.clock.advance(10)
        self.assertEqual(len(self._rows("SELECT * FROM connections")), 1)
