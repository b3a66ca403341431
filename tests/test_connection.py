"""Tests for L{coder1_bridge.connection.BridgeSession}: no network, an injected clock."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.commands import CommandRunner
from coder1_bridge.connection import BridgeSession
from coder1_bridge.terminals import TerminalManager
from coder1_wire.crash import sanitize_crash_report
from coder1_wire.envelope import Envelope, Kind, control, decode


@attrs.define
class FakeLink:
    """Records frames; counts aborts."""

    sent: list[Envelope] = attrs.field(factory=list)
    aborts: int = 0

    def send(self, frame: bytes) -> None:
        self.sent.append(decode(frame))

    def abort(self) -> None:
        self.aborts += 1


class BridgeSessionTests(SynchronousTestCase):
    """Heartbeats, dispatch and crash reports on the bridge side."""

    def make(self, telemetry: bool = True) -> tuple[BridgeSession, FakeLink, Clock, list[str]]:
        reactor: Any = MemoryReactorClock()  # a clock; the runner spawns nothing here
        refused: list[str] = []
        session = BridgeSession(
            reactor,
            CommandRunner(reactor, lambda e: session.send(e)),
            TerminalManager(reactor, lambda e: session.send(e)),
            "0.1.0",
            telemetry,
            refused.append,
        )
        link = FakeLink()
        session.attach(link)
        return session, link, reactor, refused

    def test_dead_relay_noticed(self) -> None:
        """With nothing heard for the timeout, the connection is aborted (and so reconnects)."""
        _session, link, clock, _ = self.make()
        clock.advance(44)
        self.assertEqual(link.aborts, 0)
        clock.advance(1)
        self.assertEqual(link.aborts, 1)

    def test_live_relay_kept(self) -> None:
        """Frames from the relay keep the connection; the bridge pings on the interval."""
        session, link, clock, _ = self.make()
        for _ in range(20):
            clock.advance(10)
            session.receive(Envelope(Kind.PONG).encode())
        self.assertEqual(link.aborts, 0)
        self.assertGreaterEqual([e.kind for e in link.sent].count(Kind.PING), 10)

    def test_welcome_sets_interval(self) -> None:
        """WELCOME's heartbeat interval is used; the timeout is at least three intervals."""
        session, link, clock, _ = self.make()
        session.receive(control(Kind.WELCOME, {"peer": 1, "heartbeat": 30}).encode())
        clock.advance(89)
        self.assertEqual(link.aborts, 0)
        clock.advance(1)
        self.assertEqual(link.aborts, 1)

    def test_ping_answered(self) -> None:
        """A PING from the relay is answered with a PONG."""
        session, link, _, _ = self.make()
        session.receive(Envelope(Kind.PING).encode())
        self.assertEqual(link.sent[-1].kind, Kind.PONG)

    def test_detach_stops_heartbeat(self) -> None:
        """After the connection closes no timer is left and nothing is sent."""
        session, link, clock, _ = self.make()
        session.detach(link)
        self.assertEqual(clock.getDelayedCalls(), [])
        session.send(Envelope(Kind.PING))
        self.assertEqual(link.sent, [])

    def test_unsupported_kind(self) -> None:
        """A browser-to-bridge kind this bridge does not handle gets an error on its stream."""
        session, link, _, _ = self.make()
        session.receive(Envelope(0x30, stream=4, peer=2).encode())
        self.assertEqual((link.sent[-1].kind, link.sent[-1].stream), (Kind.UNSUPPORTED, 4))
        self.assertEqual(link.sent[-1].json()["error"], "unsupported")

    def test_malformed_ignored(self) -> None:
        """Garbage from the relay is ignored, not a crash."""
        session, link, _, _ = self.make()
        session.receive(b"\xff" * 3)
        self.assertEqual(link.sent, [])

    def test_crash_report_sent(self) -> None:
        """A failure while handling a frame sends a valid, content-free crash report."""
        session, link, _, _ = self.make()
        session.receive(control(Kind.WELCOME, {"peer": 1, "heartbeat": "CANARY"}).encode())
        session.runner = None  # type: ignore[assignment]
        secret = Envelope(Kind.CMD_START, stream=1, peer=1, payload=b"/secret/path")
        session.receive(secret.encode())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        crash = [e for e in link.sent if e.kind == Kind.CRASH]
        self.assertEqual(len(crash), 1)
        self.assertIsNotNone(sanitize_crash_report(crash[0].json()))
        self.assertNotIn(b"/secret/path", crash[0].payload)

    def test_no_crash_report_without_telemetry(self) -> None:
        """With telemetry off, a failure sends no crash report."""
        session, link, _, _ = self.make(telemetry=False)
        session.runner = None  # type: ignore[assignment]
        session.receive(Envelope(Kind.CMD_START, stream=1, peer=1, payload=b"{}").encode())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual([e for e in link.sent if e.kind == Kind.CRASH], [])
