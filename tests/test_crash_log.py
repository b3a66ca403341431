"""
Tests for L{coder1_bridge.crash_log}: the bridge keeps a copy of each crash
report it sends (mode 0600, the last 20), and none with telemetry off.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.commands import CommandRunner
from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_bridge.connection import BridgeSession
from coder1_bridge.crash_log import CRASH_LOG_NAME, KEEP, CrashLog, read_reports
from coder1_bridge.foreground import bridge_services
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.terminals import TerminalManager
from coder1_wire.crash import sanitize_crash_report
from coder1_wire.e2e import Identity, Initiator, b64u
from coder1_wire.envelope import Envelope, Kind
from tests.bridge_sessions import quiet_session

from .logs import capture_logs
from .test_connection import FakeLink


class CrashLogTests(SynchronousTestCase):
    """A crash while handling a frame: the report sent, and its copy kept."""

    def crash(self, *, telemetry: bool = True, times: int = 1) -> tuple[FakeLink, FilePath[str]]:
        """Make a session fail C{times} times handling a sealed frame; its link and directory."""
        reactor: Any = MemoryReactorClock()
        directory = FilePath(self.mktemp())
        browser = Identity.generate()
        session = BridgeSession(
            reactor,
            CommandRunner(reactor, lambda e: session.send(e)),
            TerminalManager(reactor, lambda e: session.send(e)),
            "0.1.0",
            telemetry,
            lambda _: None,
            Identity.generate(),
            browser.public_raw,
            1,
            crash_log=CrashLog(directory, reactor),
        )
        link = FakeLink()
        session.attach(link)
        initiator = Initiator(browser, session.identity.public_raw, 1)
        session.receive(initiator.offer().encode())
        channel = initiator.accept(link.sent[-1])
        session.runner = None  # type: ignore[assignment]  # so that handling fails
        for stream in range(1, times + 1):
            reactor.advance(1)
            secret = Envelope(Kind.CMD_START, stream=stream, peer=1, payload=b"/secret/path")
            session.receive(channel.seal(secret).encode())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), times)
        return link, directory

    def test_kept_as_sent(self) -> None:
        """With telemetry on, the report sent is kept verbatim, with its time, in a 0600 file."""
        link, directory = self.crash()
        [sent] = [e for e in link.sent if e.kind == Kind.CRASH]
        path = directory.child(CRASH_LOG_NAME)
        self.assertEqual(path.getPermissions().shorthand(), "rw-------")
        [kept] = read_reports(path)
        self.assertEqual(kept.payload.encode(), sent.payload)
        self.assertEqual(kept.sent_at, 1.0)
        self.assertIsNotNone(sanitize_crash_report(json.loads(kept.payload)))
        self.assertNotIn(b"/secret/path", path.getContent())

    def test_none_kept_without_telemetry(self) -> None:
        """With telemetry off, no report is sent and no file is written."""
        link, directory = self.crash(telemetry=False)
        self.assertEqual([e for e in link.sent if e.kind == Kind.CRASH], [])
        self.assertFalse(directory.child(CRASH_LOG_NAME).exists())

    def test_bounded(self) -> None:
        """Past L{KEEP} reports, the oldest go: the file keeps the latest 20."""
        link, directory = self.crash(times=KEEP + 5)
        self.assertEqual(len([e for e in link.sent if e.kind == Kind.CRASH]), KEEP + 5)
        kept = read_reports(directory.child(CRASH_LOG_NAME))
        self.assertEqual([report.sent_at for report in kept], [float(n) for n in range(6, 26)])

    def test_no_connection_no_report(self) -> None:
        """The bridge queues no report: with no connection, nothing is made or kept."""
        reactor: Any = MemoryReactorClock()
        directory = FilePath(self.mktemp())
        session = quiet_session(reactor, telemetry=True, crash_log=CrashLog(directory, reactor))
        session.report_crash(ValueError("CANARY"))
        self.assertFalse(directory.child(CRASH_LOG_NAME).exists())

    def test_bridge_keeps_copies_next_to_its_pairing(self) -> None:
        """The bridge that C{start} and twistd run keeps its copies in the pairing's directory."""
        reactor: Any = MemoryReactorClock()
        directory = FilePath(self.mktemp())
        config = BridgeConfig(
            RelayAddress("https://localhost:1"),
            "tok",
            1,
            b64u(Identity.generate().public_raw),
            Identity.generate(),
            "box",
        )
        _, bridge = bridge_services(reactor, directory, config, "box", ReplaySettings(), {})
        assert bridge.session.crash_log is not None
        self.assertEqual(bridge.session.crash_log.path, directory.child(CRASH_LOG_NAME))

    def test_foreign_entries_left_out(self) -> None:
        """An entry that is not exactly a kept report (extra fields, a message) is left out."""
        path = FilePath(self.mktemp())
        good = {"type": "KeyError", "frames": [], "version": "0.1.0"}
        path.setContent(
            json.dumps(
                [
                    {"sent_at": 1, "payload": json.dumps(good)},
                    {"sent_at": 2, "payload": json.dumps({**good, "message": "CANARY"})},
                    {"sent_at": 3, "payload": "not json"},
                    {"sent_at": 4, "payload": json.dumps(good), "extra": "CANARY"},
                    "CANARY",
                ]
            ).encode()
        )
        self.assertEqual([r.sent_at for r in read_reports(path)], [1.0])
        path.setContent(b"{}")
        self.assertEqual(read_reports(path), [])
        self.assertEqual(read_reports(FilePath(self.mktemp())), [])

    def test_write_failure_logged(self) -> None:
        """A copy that cannot be written is a warning, never a crash of the bridge."""
        reactor: Any = MemoryReactorClock()
        blocked = FilePath(self.mktemp())
        blocked.setContent(b"a file where the directory should be")
        events = capture_logs(self)
        CrashLog(blocked, reactor).record(b'{"type":"KeyError","frames":[],"version":"0.1.0"}')
        said = [formatEvent(e) for e in events]
        self.assertTrue(any("could not keep a copy" in line for line in said), said)
