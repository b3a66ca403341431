"""Tests for L{coder1_bridge.connection.BridgeSession}: no network, an injected clock."""

from __future__ import annotations

import json
from typing import Any

import attrs
import hypothesis
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.commands import CommandRunner
from coder1_bridge.connection import MAX_CHANNELS, SILENT_CHANNEL, BridgeSession
from coder1_bridge.terminals import TerminalManager
from coder1_wire.crash import sanitize_crash_report
from coder1_wire.e2e import Identity, Initiator, SecureChannel
from coder1_wire.envelope import Envelope, Kind, control, decode
from coder1_wire.heartbeat import MAX_INTERVAL, MIN_INTERVAL


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
        self.browser = Identity.generate()
        session = BridgeSession(
            reactor,
            CommandRunner(reactor, lambda e: session.send(e)),
            TerminalManager(reactor, lambda e: session.send(e)),
            "0.1.0",
            telemetry,
            refused.append,
            Identity.generate(),
            self.browser.public_raw,
            1,
        )
        link = FakeLink()
        session.attach(link)
        return session, link, reactor, refused

    def channel(self, session: BridgeSession, link: FakeLink) -> SecureChannel:
        """Open a channel to the session as a browser tab does."""
        initiator = Initiator(self.browser, session.identity.public_raw, 1)
        session.receive(initiator.offer().encode())
        return initiator.accept(link.sent[-1])

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

    def test_welcome_too_short_clamped(self) -> None:
        """
        A WELCOME asking for a heartbeat shorter than MIN_INTERVAL (the audit sent
        1e-6 s, and got 182,000 PINGs in 5 s) gets PINGs every MIN_INTERVAL.
        """
        for asked in (b"1e-06", b"0", b"-1"):
            session, link, clock, _ = self.make()
            session.receive(Envelope(Kind.WELCOME, payload=b'{"heartbeat":%s}' % asked).encode())
            clock.advance(0.01)
            self.assertEqual([e.kind for e in link.sent].count(Kind.PING), 0, asked)
            clock.advance(MIN_INTERVAL)
            self.assertEqual([e.kind for e in link.sent].count(Kind.PING), 1, asked)

    def test_welcome_too_long_clamped(self) -> None:
        """
        A WELCOME asking for a huge heartbeat (1e308, Infinity) does not switch
        off the watch on the relay: silence for 3 x MAX_INTERVAL drops the connection.
        """
        for asked in (b"1e308", b"Infinity", b"3600"):
            session, link, clock, _ = self.make()
            session.receive(Envelope(Kind.WELCOME, payload=b'{"heartbeat":%s}' % asked).encode())
            clock.advance(3 * MAX_INTERVAL - 1)
            self.assertEqual(link.aborts, 0, asked)
            clock.advance(1)
            self.assertEqual(link.aborts, 1, asked)

    def test_welcome_without_a_number_ignored(self) -> None:
        """A WELCOME whose heartbeat is not a number (NaN, text, true, none) changes nothing."""
        for payload in (
            b'{"heartbeat":NaN}',
            b'{"heartbeat":"15"}',
            b'{"heartbeat":true}',
            b'{"peer":1}',
            b"[15]",
            b"not json",
        ):
            session, link, clock, _ = self.make()
            session.receive(Envelope(Kind.WELCOME, payload=payload).encode())
            for _ in range(44):
                clock.advance(1)
            pings = [e.kind for e in link.sent].count(Kind.PING)
            self.assertEqual((link.aborts, pings), (0, 2), payload)
            clock.advance(1)
            self.assertEqual(link.aborts, 1, payload)

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
        channel = self.channel(session, link)
        session.receive(channel.seal(Envelope(0x44, stream=4, peer=1)).encode())
        reply = channel.open(link.sent[-1])
        self.assertEqual((reply.kind, reply.stream), (Kind.UNSUPPORTED, 4))
        self.assertEqual(reply.json()["error"], "unsupported")

    def test_plaintext_refused(self) -> None:
        """An unsealed command is refused and never reaches the runner."""
        session, link, _, _ = self.make()
        self.channel(session, link)
        session.runner = None  # type: ignore[assignment]
        session.receive(control(Kind.CMD_START, {"argv": ["true"]}, stream=1, peer=1).encode())
        self.assertEqual(link.sent[-1].kind, Kind.KEY_ERROR)

    def test_nothing_leaves_without_a_channel(self) -> None:
        """With no channel open, end-to-end frames (output) are not sent at all."""
        session, link, _, _ = self.make()
        session.send(Envelope(Kind.CMD_STDOUT, stream=1, peer=1, payload=b"secret"))
        self.assertEqual(link.sent, [])

    def test_sealed_per_channel(self) -> None:
        """Output goes once to every channel that follows its stream, sealed for each."""
        session, link, _, _ = self.make()
        first, second = self.channel(session, link), self.channel(session, link)
        session.outbox.open(("cmd", 1), 1)
        for n, channel in enumerate((first, second)):
            body = {"client": f"tab{n}", "streams": [{"type": "cmd", "stream": 1, "next": 0}]}
            session.receive(channel.seal(control(Kind.RESUME, body, peer=1)).encode())
            self.assertEqual(channel.open(link.sent[-1]).kind, Kind.RESUMED)
        session.send(Envelope(Kind.CMD_STDOUT, stream=1, peer=1, payload=b"secret"))
        out = link.sent[-2:]
        self.assertNotIn(b"secret", out[0].payload + out[1].payload)
        self.assertEqual(first.open(out[0]).payload, b"secret")
        self.assertEqual(second.open(out[1]).payload, b"secret")

    def resume(self, session: BridgeSession, link: FakeLink, channel: SecureChannel) -> Envelope:
        """Send a RESUME following nothing yet; the RESUMED."""
        body = {"client": "tab", "streams": []}
        session.receive(channel.seal(control(Kind.RESUME, body, peer=1)).encode())
        return channel.open(link.sent[-1])

    def test_resumed(self) -> None:
        """A RESUME is answered with the window, the input numbers, and the unknown streams."""
        session, link, _, _ = self.make()
        channel = self.channel(session, link)
        session.outbox.open(("pty", 5), 1)
        body = {
            "client": "tab",
            "streams": [
                {"type": "pty", "stream": 5, "next": 0},
                {"type": "cmd", "stream": 9, "next": 3},
            ],
        }
        session.receive(channel.seal(control(Kind.RESUME, body, peer=1)).encode())
        answer = channel.open(link.sent[-1])
        self.assertEqual(answer.kind, Kind.RESUMED)
        self.assertEqual(
            answer.json(),
            {
                "window": session.replay.window,
                "input": [{"type": "pty", "stream": 5, "next": 0}],
                "unknown": [{"type": "cmd", "stream": 9}],
            },
        )

    def test_resent_input_acted_on_once(self) -> None:
        """Input resent after a resume (same numbers) is not applied twice; INPUT_ACK says so."""
        session, link, clock, _ = self.make()
        channel = self.channel(session, link)
        self.resume(session, link, channel)
        written: list[bytes] = []
        session.terminals.handle = lambda envelope: written.append(envelope.payload)  # type: ignore[method-assign]
        for seq, data in ((1, b"a"), (2, b"b"), (1, b"a"), (3, b"c"), (2, b"b")):
            frame = Envelope(Kind.PTY_INPUT, stream=5, seq=seq, peer=1, payload=data)
            session.receive(channel.seal(frame).encode())
        self.assertEqual(written, [b"a", b"b", b"c"])
        clock.advance(0.05)
        ack = channel.open(link.sent[-1])
        self.assertEqual(ack.kind, Kind.INPUT_ACK)
        self.assertEqual(ack.json(), {"input": [{"type": "pty", "stream": 5, "next": 4}]})

    def test_silent_channel_ended(self) -> None:
        """
        A channel that holds a stream without acknowledging anything for a minute
        is taken for gone (the relay does not tell the bridge when a tab goes):
        it is ended with KEY_ERROR no-channel, and the stream is no longer held.
        """
        session, link, clock, _ = self.make()
        session.outbox.capacity = 64 * 1024
        channel = self.channel(session, link)
        session.outbox.open(("cmd", 1), 1)
        body = {"client": "tab", "streams": [{"type": "cmd", "stream": 1, "next": 0}]}
        session.receive(channel.seal(control(Kind.RESUME, body, peer=1)).encode())
        for _ in range(70):
            session.send(Envelope(Kind.CMD_STDOUT, stream=1, peer=1, payload=b"x" * 1000))
        self.assertTrue(session.outbox.logs[("cmd", 1)].held)
        clock.advance(SILENT_CHANNEL - 1)
        self.assertIn(channel.channel, session.channels)
        clock.advance(1)
        self.assertNotIn(channel.channel, session.channels)
        self.assertEqual(link.sent[-1].kind, Kind.KEY_ERROR)
        self.assertEqual(link.sent[-1].json()["error"], "no-channel")

    def test_resume_replaces_the_page_loads_earlier_channel(self) -> None:
        """A RESUME from a client ends that client's earlier channel: one page load, one channel."""
        session, link, _, _ = self.make()
        first, second = self.channel(session, link), self.channel(session, link)
        self.resume(session, link, first)
        self.resume(session, link, second)
        self.assertEqual(list(session.channels), [second.channel])

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(
        kind=st.sampled_from([Kind.RESUME, Kind.ACK]),
        body=st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["client", "streams", "type", "stream", "next", "x"]),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=20,
        ),
    )
    def test_malformed_resume_and_ack(self, kind: Kind, body: object) -> None:
        """
        RESUME and ACK bodies of any shape (JSON of any type, wrong keys, values
        out of range) never raise out of the session: a bad one is ignored, and
        the channel goes on (a PTY_LIST still gets its listing).
        """
        session, link, _, _ = self.make()
        channel = self.channel(session, link)
        payload = json.dumps(body).encode()
        before = len(link.sent)
        session.receive(channel.seal(Envelope(kind, 0, 0, 1, payload)).encode())
        session.receive(channel.seal(Envelope(Kind.PTY_LIST, 0, 0, 1)).encode())
        replies = [channel.open(frame) for frame in link.sent[before:]]
        self.assertEqual(replies[-1].kind, Kind.PTY_LISTING)
        self.assertNotIn(Kind.KEY_ERROR, [r.kind for r in replies])

    def test_gone_forgets_channels(self) -> None:
        """GONE from the relay ends the channels it names (their tab's connection is gone)."""
        session, link, _, _ = self.make()
        first, second = self.channel(session, link), self.channel(session, link)
        body = {"channels": [first.channel, 12345, "junk"]}
        session.receive(control(Kind.GONE, body).encode())
        self.assertEqual(list(session.channels), [second.channel])
        session.receive(control(Kind.GONE, {"channels": "all"}).encode())
        session.receive(Envelope(Kind.GONE, payload=b"\xff").encode())
        self.assertEqual(list(session.channels), [second.channel])

    def test_grace_period(self) -> None:
        """
        With no channel for the grace period, every process is stopped; a channel
        that comes in time saves them.
        """
        session, link, clock, _ = self.make()
        stopped: list[str] = []

        def stopper(what: str) -> Any:
            def stop() -> Any:
                stopped.append(what)
                return succeed(None)

            return stop

        session.runner._processes[1] = None  # type: ignore[assignment]  # one "runs"
        session.runner.stop_all = stopper("commands")  # type: ignore[method-assign]
        session.terminals.stop_all = stopper("terminals")  # type: ignore[method-assign]
        session.detach(link)
        clock.advance(session.replay.grace - 1)
        session.attach(link)
        self.channel(session, link)
        clock.advance(10)
        self.assertEqual(stopped, [])
        session.detach(link)
        clock.advance(session.replay.grace)
        self.assertEqual(stopped, ["commands", "terminals"])

    def test_tampered_frame_refused_channel_kept(self) -> None:
        """
        A tampered frame is refused with its verdict; the channel stays, so the
        genuine frame still opens (junk cannot kill a tab's channel).
        """
        session, link, _, _ = self.make()
        channel = self.channel(session, link)
        frame = channel.seal(Envelope(Kind.PTY_LIST, stream=1, peer=1)).encode()
        session.receive(frame[:-1] + bytes([frame[-1] ^ 1]))
        self.assertEqual(link.sent[-1].json()["error"], "tampered")
        session.receive(frame)
        self.assertEqual(channel.open(link.sent[-1]).kind, Kind.PTY_LISTING)

    def test_gap_forgets_channel(self) -> None:
        """A frame after a missing one is refused as dropped, and the channel is forgotten."""
        session, link, _, _ = self.make()
        channel = self.channel(session, link)
        channel.seal(Envelope(Kind.PTY_LIST, stream=1, peer=1))
        session.receive(channel.seal(Envelope(Kind.PTY_LIST, stream=2, peer=1)).encode())
        self.assertEqual(link.sent[-1].json()["error"], "dropped")
        self.assertEqual(session.channels, {})

    def test_forged_offer_does_not_name_a_live_channel(self) -> None:
        """A badly signed offer reusing a live channel's number is refused without naming it."""
        session, link, _, _ = self.make()
        live = self.channel(session, link)
        forged = Initiator(Identity.generate(), session.identity.public_raw, 1, live.channel)
        session.receive(forged.offer().encode())
        refusal = link.sent[-1].json()
        self.assertEqual((refusal["error"], refusal["channel"]), ("bad-offer", 0))
        self.assertIn(live.channel, session.channels)

    def test_channels_capped(self) -> None:
        """Replayed or endless offers cannot grow the channels (and the traffic) without bound."""
        session, link, _, _ = self.make()
        initiator = Initiator(self.browser, session.identity.public_raw, 1)
        offer = initiator.offer().encode()
        for _ in range(3):
            session.receive(offer)
        self.assertEqual(len(session.channels), 1)
        for _ in range(MAX_CHANNELS + 5):
            self.channel(session, link)
        self.assertEqual(len(session.channels), MAX_CHANNELS)

    def test_detach_forgets_channels(self) -> None:
        """Channels do not outlive the connection to the relay."""
        session, link, _, _ = self.make()
        self.channel(session, link)
        session.detach(link)
        self.assertEqual(session.channels, {})

    def test_malformed_ignored(self) -> None:
        """Garbage from the relay is ignored, not a crash."""
        session, link, _, _ = self.make()
        session.receive(b"\xff" * 3)
        self.assertEqual(link.sent, [])

    def test_crash_report_sent(self) -> None:
        """A failure while handling a frame sends a valid, content-free crash report."""
        session, link, _, _ = self.make()
        session.receive(control(Kind.WELCOME, {"peer": 1, "heartbeat": "CANARY"}).encode())
        channel = self.channel(session, link)
        session.runner = None  # type: ignore[assignment]
        secret = Envelope(Kind.CMD_START, stream=1, peer=1, payload=b"/secret/path")
        session.receive(channel.seal(secret).encode())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        crash = [e for e in link.sent if e.kind == Kind.CRASH]
        self.assertEqual(len(crash), 1)
        self.assertIsNotNone(sanitize_crash_report(crash[0].json()))
        self.assertNotIn(b"/secret/path", crash[0].payload)

    def test_no_crash_report_without_telemetry(self) -> None:
        """With telemetry off, a failure sends no crash report."""
        session, link, _, _ = self.make(telemetry=False)
        channel = self.channel(session, link)
        session.runner = None  # type: ignore[assignment]
        session.receive(channel.seal(Envelope(Kind.CMD_START, stream=1, peer=1)).encode())
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual([e for e in link.sent if e.kind == Kind.CRASH], [])
