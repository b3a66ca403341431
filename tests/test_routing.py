"""Tests for L{coder1_relay.routing}: the hub, with fake links and an injected clock."""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay import routing
from coder1_relay.routing import Endpoint, Hub, HubSettings
from coder1_relay.store import MemoryStore
from coder1_relay.telemetry import Telemetry
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, EnvelopeError, Kind, control, decode


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


def make_hub(case: SynchronousTestCase, clock: Clock) -> Hub:
    """A hub on C{clock}, telemetry in memory (stopped when C{case} ends), 15/45 s heartbeats."""
    telemetry = Telemetry(None, clock)
    telemetry.startService()
    case.addCleanup(telemetry.stopService)
    return Hub(MemoryStore(), telemetry, clock, HubSettings(15.0, 45.0))


class HubCase(SynchronousTestCase):
    """A hub with one tab and bridge 1 of session alice attached (no tests of its own)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = make_hub(self, self.clock)
        self.telemetry = self.hub.telemetry
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


class HubTests(HubCase):
    """Frames go where their session says, untouched; bad frames close their sender."""

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

    def test_gone_tells_the_bridge(self) -> None:
        """
        When a tab's connection goes, the bridges it offered channels to hear
        which (GONE), so that they stop holding output for them; the offer
        itself was forwarded untouched, and a malformed one is only forwarded.
        """
        for channel in (7, 8, 7):
            offer = control(Kind.KEY_OFFER, {"channel": channel, "x": 1}, peer=1).encode()
            self.ide.receive(offer)
            self.assertIs(self.bridge_link.sent[-1], offer)
        self.ide.receive(Envelope(Kind.KEY_OFFER, peer=1, payload=b"{not json").encode())
        self.hub.detach(self.ide)
        gone = decode(self.bridge_link.sent[-1])
        self.assertEqual((gone.kind, gone.peer, gone.json()), (Kind.GONE, 1, {"channels": [7, 8]}))

    def test_deeply_nested_json(self) -> None:
        """
        JSON nested deeper than the parser goes is "not JSON" (EnvelopeError),
        not a RecursionError: a KEY_OFFER of it is forwarded and noted as
        naming no channel, and a bridge's CRASH of it is refused quietly.
        """
        deep = b"[" * 100_000
        self.assertRaises(EnvelopeError, Envelope(Kind.CRASH, payload=deep).json)
        offer = Envelope(Kind.KEY_OFFER, peer=1, payload=deep).encode()
        self.ide.receive(offer)
        self.assertIs(self.bridge_link.sent[-1], offer)
        self.bridge.receive(Envelope(Kind.CRASH, peer=1, payload=deep).encode())
        self.assertIsNone(self.bridge_link.closed)
        self.hub.detach(self.ide)
        self.assertNotEqual(decode(self.bridge_link.sent[-1]).kind, Kind.GONE)

    def test_gone_is_not_for_parties(self) -> None:
        """A party that sends GONE itself is closed, like any control frame not its to send."""
        self.bridge.receive(control(Kind.GONE, {"channels": [1]}, peer=1).encode())
        self.assertEqual(
            self.bridge_link.closed, (closecodes.PROTOCOL_ERROR, "control frame not allowed here")
        )

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
        self.ide.receive(Envelope(Kind.PING).encode())
        self.assertEqual(decode(self.ide_link.sent[-1]).kind, Kind.PONG)

    def test_ping_other_forms(self) -> None:
        """
        A PING that is not the bare heartbeat (a payload, a stream) is checked
        and answered as well; one with flags set is refused, as any frame.
        """
        self.bridge.receive(Envelope(Kind.PING, payload=b"x").encode())
        self.assertEqual(decode(self.bridge_link.sent[-1]).kind, Kind.PONG)
        self.ide.receive(Envelope(Kind.PING, stream=7).encode())
        self.assertEqual(decode(self.ide_link.sent[-1]).kind, Kind.PONG)
        frame = bytearray(Envelope(Kind.PING).encode())
        frame[2] = 0x80  # a flag no frame may carry
        self.ide.receive(bytes(frame))
        self.assertEqual(
            self.ide_link.closed and self.ide_link.closed[0], closecodes.PROTOCOL_ERROR
        )

    def test_heartbeat_timeout(self) -> None:
        """A party silent for the timeout is closed; one that keeps talking is not."""
        for _ in range(10):
            self.clock.advance(10)
            self.bridge.receive(Envelope(Kind.PONG).encode())
        self.assertIsNone(self.bridge_link.closed)
        self.assertEqual(
            self.ide_link.closed, (closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you")
        )
        self.assertIn(Kind.PING, self.ide_link.kinds())

    def test_talking_party_not_pinged(self) -> None:
        """A party that PINGs every interval is only answered, never PINGed itself."""
        for _ in range(8):
            self.clock.advance(15)
            self.bridge.receive(Envelope(Kind.PING).encode())
        self.assertNotIn(Kind.PING, self.bridge_link.kinds())
        self.assertIsNone(self.bridge_link.closed)

    def test_silent_party_pinged_before_timeout(self) -> None:
        """A party that only answers PINGs is PINGed in time and stays open."""
        pongs = 0
        for _ in range(12):
            self.clock.advance(5)
            if self.bridge_link.kinds().count(Kind.PING) > pongs:
                pongs += 1
                self.bridge.receive(Envelope(Kind.PONG).encode())
        self.assertEqual(pongs, 2)
        self.assertIsNone(self.bridge_link.closed)

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


class FastPathTests(HubCase):
    """End-to-end frames are routed on their header alone; liveness is a timestamp per frame."""

    def timers(self) -> list[IDelayedCall]:
        return [c for c in self.clock.getDelayedCalls() if "_heartbeat" in repr(c)]

    def test_end_to_end_frames_not_decoded(self) -> None:
        """
        An end-to-end frame is forwarded (the same bytes object), and the bare
        heartbeat PING answered, without decoding an envelope; other control
        frames still are decoded.
        """
        decoded: list[bytes] = []

        def counting_decode(frame: bytes) -> Envelope:
            decoded.append(frame)
            return decode(frame)

        self.patch(routing, "decode", counting_decode)
        big = Envelope(Kind.PTY_INPUT, stream=2, peer=1, payload=b"k" * 65536).encode()
        self.ide.receive(big)
        out = Envelope(Kind.PTY_OUTPUT, stream=2, peer=1, payload=b"o").encode()
        self.bridge.receive(out)
        self.assertIs(self.bridge_link.sent[-1], big)
        self.assertIs(self.ide_link.sent[-1], out)
        self.assertEqual(decoded, [])
        self.ide.receive(Envelope(Kind.PING).encode())
        self.assertEqual(decoded, [])
        self.assertEqual(decode(self.ide_link.sent[-1]).kind, Kind.PONG)
        self.ide.receive(Envelope(Kind.PING, payload=b"x").encode())
        self.assertEqual(len(decoded), 1)
        self.assertEqual(decode(self.ide_link.sent[-1]).kind, Kind.PONG)

    def test_refusals_unchanged(self) -> None:
        """Frames the fast path does not take are refused with the checked path's reasons."""
        cases = [
            (Envelope(Kind.PTY_OUTPUT, peer=1).encode(), "frame kind travels the other way"),
            (b"\x01\x21\x00\x01" + bytes(16), "reserved flags set"),
            (b"\x02\x21" + bytes(18), "unsupported wire version"),
            (b"\x01\x21" + bytes(17), "frame shorter than the header"),
        ]
        for frame, reason in cases:
            link = FakeLink()
            self.hub.attach_ide("alice", link, "x").receive(frame)
            self.assertEqual(link.closed, (closecodes.PROTOCOL_ERROR, reason))

    def test_frames_move_no_timer(self) -> None:
        """
        Each connection has one heartbeat timer, and frames do not move it:
        hearing a frame only notes the time.
        """
        self.assertEqual(len(self.timers()), 2)
        before = {id(c): c.getTime() for c in self.timers()}
        frame = Envelope(Kind.PTY_INPUT, stream=2, peer=1, payload=b"k").encode()
        for _ in range(5):
            self.clock.advance(1)
            self.ide.receive(frame)
        self.assertEqual({id(c): c.getTime() for c in self.timers()}, before)
        self.assertEqual(self.ide.heard, 5.0)

    def test_silence_counts_from_the_last_frame(self) -> None:
        """
        A tab last heard at 44 s is pinged once its silence reaches 30 s (at
        74 s) and closed for silence at 89 s, no earlier, though its timer had
        first come due at 45 s.
        """
        self.clock.pump([1.0] * 44)
        self.ide.receive(Envelope(Kind.PONG).encode())
        pings_before = self.ide_link.kinds().count(Kind.PING)
        self.clock.pump([1.0] * 44)  # to 88 s
        self.assertIsNone(self.ide_link.closed)
        self.assertEqual(self.ide_link.kinds().count(Kind.PING) - pings_before, 1)  # 74
        self.clock.advance(1)  # 89 s
        self.assertEqual(
            self.ide_link.closed, (closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you")
        )
        self.assertEqual(self.ide_link.kinds().count(Kind.PING) - pings_before, 1)

    def test_subclass_hooks_see_every_frame(self) -> None:
        """A hub that overrides C{_from_ide} (a tampering test relay) still gets every frame."""
        seen: list[int] = []

        @attrs.define
        class Watching(Hub):
            def _from_ide(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
                seen.append(envelope.kind)
                super()._from_ide(source, envelope, frame)

        hub = Watching(MemoryStore(), self.telemetry, self.clock)
        bridge_link = FakeLink()
        ide = hub.attach_ide("bob", FakeLink(), "c3")
        hub.attach_bridge(
            "bob",
            1,
            bridge_link,
            "c4",
            version="0.1.0",
            label="l",
            telemetry=False,
            expires_at=9e9,
            bridge_key="K",
        )
        frame = Envelope(Kind.PTY_INPUT, stream=1, peer=1).encode()
        ide.receive(frame)
        self.assertEqual(seen, [Kind.PTY_INPUT])
        self.assertIs(bridge_link.sent[-1], frame)
