"""Tests for L{coder1_relay.routing}: the hub, with fake links and an injected clock."""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay.routing import Hub, HubSettings
from coder1_relay.store import MemoryStore
from coder1_relay.telemetry import Telemetry
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, control, decode


@attrs.define(eq=False)
class FakeLink:
    """Records what the hub sends and how it closes."""

    sent: list[bytes] = attrs.field(factory=list)
    closed: tuple[int, str] | None = None
    aborted: bool = False

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted = True

    def kinds(self) -> list[int]:
        return [decode(f).kind for f in self.sent]


class HubTests(SynchronousTestCase):
    """Frames go where their session says, untouched; bad frames close their sender."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.telemetry = Telemetry(None, self.clock)
        self.telemetry.startService()
        self.addCleanup(self.telemetry.stopService)
        self.hub = Hub(MemoryStore(), self.telemetry, self.clock, HubSettings(15.0, 45.0))
        self.ide_link, self.bridge_link = FakeLink(), FakeLink()
        self.ide = self.hub.attach_ide("alice", self.ide_link, "c1")
        self.bridge = self.hub.attach_bridge(
            "alice",
            1,
            self.bridge_link,
            "c2",
            version="0.1.0",
            label="laptop",
            telemetry=True,
            expires_at=3600.0,
            bridge_key="K" * 87,
        )

    def test_welcome_and_presence(self) -> None:
        """Each party is welcomed; the IDE hears when its bridge arrives."""
        self.assertEqual(decode(self.bridge_link.sent[0]).json(), {"peer": 1, "heartbeat": 15.0})
        presence = [decode(f).json() for f in self.ide_link.sent if decode(f).kind == Kind.PRESENCE]
        self.assertEqual(presence[0], {"bridges": []})
        self.assertEqual(presence[-1]["bridges"][0]["label"], "laptop")

    def test_forwards_bytes_untouched(self) -> None:
        """An end-to-end frame reaches the bridge as the very bytes that were sent."""
        frame = Envelope(
            Kind.CMD_START, stream=9, seq=0, peer=1, payload=b"\x00opaque\xff"
        ).encode()
        self.ide.receive(frame)
        self.assertIs(self.bridge_link.sent[-1], frame)

    def test_bridge_output_to_every_tab_of_session(self) -> None:
        """Bridge output goes to each IDE tab of its session and to no other session."""
        second, stranger = FakeLink(), FakeLink()
        self.hub.attach_ide("alice", second, "c3")
        self.hub.attach_ide("mallory", stranger, "c4")
        frame = Envelope(Kind.CMD_STDOUT, stream=1, peer=1, payload=b"x").encode()
        self.bridge.receive(frame)
        self.assertIn(frame, self.ide_link.sent)
        self.assertIn(frame, second.sent)
        self.assertNotIn(frame, stranger.sent)

    def test_no_fallback_route(self) -> None:
        """A frame for a bridge number not connected in this session gets an error, not a route."""
        mallory = FakeLink()
        intruder = self.hub.attach_ide("mallory", mallory, "c5")
        before = len(self.bridge_link.sent)
        intruder.receive(Envelope(Kind.CMD_START, stream=3, peer=1, payload=b"{}").encode())
        self.assertEqual(len(self.bridge_link.sent), before)
        error = decode(mallory.sent[-1])
        self.assertEqual(
            (error.kind, error.stream, error.json()["error"]), (Kind.ERROR, 3, "bridge-offline")
        )

    def test_bridge_cannot_claim_other_peer(self) -> None:
        """A bridge sending frames under another bridge's number is closed."""
        self.bridge.receive(Envelope(Kind.CMD_STDOUT, stream=1, peer=2).encode())
        self.assertEqual(
            self.bridge_link.closed, (closecodes.PROTOCOL_ERROR, "frame names another bridge")
        )

    def test_direction_enforced(self) -> None:
        """An IDE sending a bridge-to-browser kind is closed with a reason."""
        self.ide.receive(Envelope(Kind.CMD_EXIT, peer=1).encode())
        assert self.ide_link.closed is not None
        self.assertEqual(self.ide_link.closed[0], closecodes.PROTOCOL_ERROR)

    def test_malformed(self) -> None:
        """Short frames, unknown versions, flags and kinds close the sender with 4000."""
        for junk in [
            b"",
            b"\x01",
            b"\x02" + bytes(19),
            b"\x01\x10\x00\x01" + bytes(16),
            b"\x01\x99" + bytes(18),
        ]:
            link = FakeLink()
            self.hub.attach_ide("alice", link, "x").receive(junk)
            assert link.closed is not None, junk
            self.assertEqual(link.closed[0], closecodes.PROTOCOL_ERROR)

    def test_control_from_ide_refused(self) -> None:
        """An IDE may not send relay-only control kinds like CRASH or WELCOME."""
        self.ide.receive(control(Kind.CRASH, {}).encode())
        self.assertIsNotNone(self.ide_link.closed)

    def test_closed_when_token_expires(self) -> None:
        """A bridge connection ends when its token expires, with a reason that says so."""
        for _ in range(359):
            self.clock.advance(10)
            self.bridge.receive(Envelope(Kind.PONG).encode())
        self.assertIsNone(self.bridge_link.closed)
        self.clock.advance(10)
        self.assertEqual(
            self.bridge_link.closed, (closecodes.EXPIRED, "token has expired; pair again")
        )

    def test_ping_pong(self) -> None:
        """A PING from either party is answered with a PONG."""
        self.bridge.receive(Envelope(Kind.PING).encode())
        self.assertEqual(decode(self.bridge_link.sent[-1]).kind, Kind.PONG)

    def test_heartbeat_timeout(self) -> None:
        """A party silent for the timeout is closed; one that keeps talking is not."""
        for _ in range(10):
            self.clock.advance(10)
            self.bridge.receive(Envelope(Kind.PONG).encode())
        self.assertIsNone(self.bridge_link.closed)
        self.assertEqual(
            self.ide_link.closed, (closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you")
        )
        self.assertIn(Kind.PING, self.bridge_link.kinds())

    def test_replaced_bridge(self) -> None:
        """The same bridge connecting again replaces the old connection, which is closed."""
        newer = FakeLink()
        self.hub.attach_bridge(
            "alice",
            1,
            newer,
            "c6",
            version="0.1.0",
            label="l",
            telemetry=True,
            expires_at=9e9,
            bridge_key="K",
        )
        assert self.bridge_link.closed is not None
        self.assertEqual(self.bridge_link.closed[0], closecodes.REPLACED)
        self.ide.receive(Envelope(Kind.CMD_STDIN, stream=1, peer=1).encode())
        self.assertEqual(decode(newer.sent[-1]).kind, Kind.CMD_STDIN)

    def test_detach_stops_timers(self) -> None:
        """After both parties leave no timer is left behind."""
        self.hub.detach(self.bridge)
        self.hub.detach(self.ide)
        self.hub.detach(self.ide)
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if "Telemetry" not in repr(c)], []
        )

    def test_telemetry_counts_kinds_only(self) -> None:
        """CMD_START and CMD_EXIT are counted from their kinds."""
        self.ide.receive(Envelope(Kind.CMD_START, stream=1, peer=1, payload=b"secret").encode())
        self.bridge.receive(Envelope(Kind.CMD_EXIT, stream=1, peer=1, payload=b"{}").encode())
        names = [c["name"] for c in self.telemetry.snapshot()["pending"]["counts"]]  # type: ignore[index]
        self.assertIn("command_started", names)
        self.assertIn("command_completed", names)

    def test_crash_report_validated(self) -> None:
        """A crash report with free text is refused; a clean one is kept."""
        bad = control(
            Kind.CRASH, {"type": "ValueError", "frames": [], "version": "0.1.0", "message": "x"}
        )
        self.bridge.receive(bad.encode())
        good = control(Kind.CRASH, {"type": "ValueError", "frames": [], "version": "0.1.0"})
        self.bridge.receive(good.encode())
        pending = self.telemetry.snapshot()["pending"]
        self.assertEqual(pending["crash_reports"], 1)  # type: ignore[index]
