"""
The bridge's own reading and writing of whole binary messages
(C{coder1_wire.frames}, and the path through
C{coder1_bridge.connection.BridgeClientProtocol} that uses it): the same
messages, limits, closes and heartbeats as Autobahn's path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from typing import Any, cast

import attrs
from autobahn.exception import PayloadExceededError
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as websocket_protocol
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.connection import BridgeClientFactory, BridgeSession
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, decode
from coder1_wire.frames import WAIT_AT_MOST, masked_binary_message
from tests.bridge_sessions import quiet_session

from .test_hostile import frame_mixes, read_frames, ws_frame

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def server_frame(opcode: int, payload: bytes, **kwargs: Any) -> bytes:
    """One WebSocket frame as a server sends it: unmasked, unless C{mask} says otherwise."""
    return ws_frame(opcode, payload, **{"mask": None, **kwargs})


def answers(data: bytes) -> list[tuple[int, bool, bytes]]:
    """What the bridge wrote, unmasked (masks are random), each frame checked masked."""
    frames = read_frames(data)
    assert all(mask is not None for *_, mask in frames), "a client's frame went unmasked"
    return [(opcode, fin, body) for opcode, fin, body, _ in frames]


def output(seq: int, size: int = 24) -> bytes:
    """A sealed-looking frame from a tab, C{size} bytes in all."""
    head = Envelope(Kind.PTY_INPUT, 1, seq, 1).encode()
    return head + os.urandom(size - len(head))


@attrs.define
class _Session:
    """What the protocol tells its session: the messages it received, attaches and detaches."""

    received: list[bytes] = attrs.field(factory=list)
    refused: list[str] = attrs.field(factory=list)
    attached: int = 0
    detached: int = 0

    def receive(self, frame: bytes) -> None:
        self.received.append(frame)

    def attach(self, link: object) -> None:
        self.attached += 1

    def detach(self, link: object) -> None:
        self.detached += 1

    def on_refused(self, reason: str) -> None:
        self.refused.append(reason)

    def pause_output(self, link: object) -> None:
        pass

    def resume_output(self, link: object) -> None:
        pass


class BridgeProtocolCase(SynchronousTestCase):
    """A bridge's connection to the relay in memory, opened with a real handshake."""

    def open(
        self, session: object, logFrames: bool = False, **options: Any
    ) -> tuple[Any, StringTransport]:
        """A connection for C{session}, open, with Autobahn's C{options} besides the bridge's."""
        factory = BridgeClientFactory(
            "wss://relay.test/ws/bridge",
            cast(BridgeSession, session),
            {},
            lambda p: None,
            lambda p: None,
        )
        # No Autobahn timers on the global reactor.
        factory.setProtocolOptions(
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            serverConnectionDropTimeout=0,
            **options,
        )
        factory.logFrames = logFrames  # not one of setProtocolOptions'
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", transport.value())
        assert key is not None
        accept = base64.b64encode(
            hashlib.sha1(key.group(1) + _GUID, usedforsecurity=False).digest()
        )
        transport.clear()
        protocol.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.assertEqual(protocol.state, protocol.STATE_OPEN)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport


class _Server(WebSocketServerProtocol):
    """Autobahn's own server, which keeps the messages it receives."""

    def onConnect(self, request: Any) -> None:
        self.messages: list[bytes] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(payload)


def autobahn_server() -> _Server:
    """An Autobahn server protocol, open, to decode what the bridge writes."""
    factory = WebSocketServerFactory("wss://relay.test")
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    factory.protocol = _Server
    server: Any = factory.buildProtocol(None)
    server.makeConnection(StringTransport())
    server.dataReceived(
        b"GET /ws/bridge HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert server.state == server.STATE_OPEN
    return cast(_Server, server)


@attrs.frozen
class _Drawn:
    """In place of Autobahn's C{random}: the mask it draws is C{mask}."""

    mask: bytes

    def getrandbits(self, bits: int) -> int:
        return int.from_bytes(self.mask, "big")


class SentFrameTests(BridgeProtocolCase):
    """The frames the bridge writes, against Autobahn's."""

    def test_sent_frame_is_autobahns_with_its_mask(self) -> None:
        """
        A message the bridge sends is written by the bridge itself (Autobahn
        counts no frame), masked, with a mask of its own for each frame, as
        the very bytes Autobahn's C{sendMessage} writes with that mask, with each
        length encoding (7, 16 and 64 bits); Autobahn's server decodes each to
        the message sent.
        """
        protocol, transport = self.open(_Session())
        self.assertTrue(protocol._frames_out)
        server = autobahn_server()
        sizes = [0, 1, 4, 5, 125, 126, 1024, 1025, 65535, 65536, 70000]
        masks = []
        for size in sizes:
            payload = os.urandom(size)
            protocol.send(payload)
            ours = transport.value()
            transport.clear()
            [(opcode, fin, body, mask)] = read_frames(ours)
            self.assertEqual((opcode, fin, body), (0x2, True, payload))
            assert mask is not None
            masks.append(mask)
            self.assertEqual(ours, masked_binary_message(payload, mask))
            self.patch(websocket_protocol, "random", _Drawn(mask))
            protocol.sendMessage(payload, isBinary=True)
            self.assertEqual(ours, transport.value(), size)
            transport.clear()
            server.dataReceived(ours)
        # Autobahn counts the frames it writes: those of sendMessage only.
        self.assertEqual(protocol.trafficStats.outgoingWebSocketFrames, len(sizes))
        self.assertEqual([len(m) for m in server.messages], sizes)
        self.assertEqual(len(set(masks)), len(masks))

    def test_fragment_size_left_to_autobahn(self) -> None:
        """
        With Autobahn's C{autoFragmentSize}, a longer message is sent in
        masked fragments as Autobahn sends it, and a shorter one whole.
        """
        protocol, transport = self.open(_Session(), autoFragmentSize=64)
        payload = os.urandom(200)
        protocol.send(payload)
        self.assertEqual(
            answers(transport.value()),
            [
                (0x2, False, payload[:64]),
                (0x0, False, payload[64:128]),
                (0x0, False, payload[128:192]),
                (0x0, True, payload[192:]),
            ],
        )
        transport.clear()
        protocol.send(payload[:64])
        self.assertEqual(answers(transport.value()), [(0x2, True, payload[:64])])
        self.assertEqual(protocol.trafficStats.outgoingWebSocketFrames, 4)  # the fragments

    def test_refused_and_dropped_as_before(self) -> None:
        """
        A message up to the size limit is written by the bridge; past it,
        Autobahn refuses it, as before, and nothing is written; once the
        bridge has sent its close, a message is dropped.
        """
        protocol, transport = self.open(_Session(), maxMessagePayloadSize=100)
        protocol.send(b"x" * 100)
        self.assertEqual(answers(transport.value()), [(0x2, True, b"x" * 100)])
        self.assertEqual(protocol.trafficStats.outgoingWebSocketFrames, 0)
        transport.clear()
        self.assertRaises(PayloadExceededError, protocol.send, b"x" * 101)
        self.assertEqual(transport.value(), b"")
        protocol.sendClose(closecodes.NORMAL)
        transport.clear()
        protocol.send(b"late")
        self.assertEqual(transport.value(), b"")

    def test_logging_left_to_autobahn(self) -> None:
        """With Autobahn's frame logging on, Autobahn writes every frame (and logs it)."""
        protocol, transport = self.open(_Session(), logFrames=True)
        self.assertFalse(protocol._frames_out)
        self.assertFalse(protocol._frames_in)
        protocol.send(b"hello")
        self.assertEqual(answers(transport.value()), [(0x2, True, b"hello")])
        self.assertEqual(protocol.trafficStats.outgoingWebSocketFrames, 1)


class WholeMessageTests(BridgeProtocolCase):
    """Whole binary messages read by the bridge, and the frames it leaves to Autobahn."""

    def test_one_read_many_messages(self) -> None:
        """
        The messages of one read, with each length encoding, reach the
        session in order, each as the very bytes that were sent, read by the
        bridge itself (Autobahn counts no frame).
        """
        session = _Session()
        protocol, _ = self.open(session)
        sent = [output(0, 30), output(1, 300), output(2, 70000)]
        protocol.dataReceived(b"".join(server_frame(0x2, frame) for frame in sent))
        self.assertEqual(session.received, sent)
        self.assertEqual(protocol.data, b"")
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 0)

    def test_message_across_reads(self) -> None:
        """
        A message cut between reads (even in its header) waits in the buffer
        and reaches the session once all there, through the bridge's own path
        as the ones around it do: Autobahn's parser never takes it in pieces.
        """
        session = _Session()
        protocol, _ = self.open(session)
        sent = [output(0, 40), output(1, 5000), output(2, 40)]
        wire = b"".join(server_frame(0x2, frame) for frame in sent)
        first = len(server_frame(0x2, sent[0]))
        protocol.dataReceived(wire[: first + 3])
        self.assertEqual(session.received, sent[:1])
        protocol.dataReceived(wire[first + 3 : first + 100])
        self.assertEqual(session.received, sent[:1])
        self.assertIsNone(protocol.current_frame)
        self.assertEqual(protocol.data, wire[first : first + 100])
        protocol.dataReceived(wire[first + 100 :])
        self.assertEqual(session.received, sent)
        self.assertEqual(protocol.data, b"")
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 0)

    def test_large_message_across_reads_left_to_autobahn(self) -> None:
        """
        A message larger than L{WAIT_AT_MOST} cut between reads goes to
        Autobahn's parser, which takes it in pieces (so no read copies all
        that waits), and reaches the session once all there.
        """
        session = _Session()
        protocol, _ = self.open(session)
        sent = output(0, WAIT_AT_MOST + 1)
        wire = server_frame(0x2, sent)
        protocol.dataReceived(wire[:1000])
        self.assertIsNotNone(protocol.current_frame)
        protocol.dataReceived(wire[1000:])
        self.assertEqual(session.received, [sent])
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 1)

    def test_other_frames_among_them(self) -> None:
        """
        A ping, a message in fragments and a text message between whole
        messages in one read: the ping is answered (masked), the fragments
        make one message, the text is ignored, all in order; Autobahn parses
        all but the whole binary messages.
        """
        session = _Session()
        protocol, transport = self.open(session)
        fragmented = output(1, 50)
        protocol.dataReceived(
            server_frame(0x2, output(0))
            + server_frame(0x9, b"hi")
            + server_frame(0x2, fragmented[:30], fin=False)
            + server_frame(0x0, fragmented[30:])
            + server_frame(0x1, b"{}")
            + server_frame(0x2, output(2))
        )
        self.assertEqual([decode(m).seq for m in session.received], [0, 1, 2])
        self.assertEqual(session.received[1], fragmented)
        self.assertEqual(answers(transport.value()), [(0xA, True, b"hi")])
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 3)

    def test_broken_frames_left_to_autobahn(self) -> None:
        """
        A whole binary frame past the size limit, masked (a server's must not
        be), with a length not in its shortest form, or with an RSV bit, after
        a good one: the bridge hears the good one, and the connection fails as
        Autobahn fails it, the broken message unheard.
        """
        cases = [
            server_frame(0x2, output(0, 1024 * 1024 + 1)),
            server_frame(0x2, output(0), mask=b"\x01\x02\x03\x04"),
            server_frame(0x2, output(0), length="16"),
            server_frame(0x2, output(0, 300), length="64"),
            server_frame(0x2, output(0), rsv=4),
        ]
        for wire in cases:
            session = _Session()
            protocol, transport = self.open(session)
            protocol.dataReceived(server_frame(0x2, output(9)) + wire)
            self.assertEqual(len(session.received), 1, wire[:2])
            self.assertTrue(transport.disconnecting, wire[:2])
            self.assertTrue(protocol.wasNotCleanReason, wire[:2])
            self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 0)

    def test_close_after_a_message(self) -> None:
        """
        A close frame after a message in one read: the message is heard, and
        the close answered (masked).
        """
        session = _Session()
        protocol, transport = self.open(session)
        protocol.dataReceived(
            server_frame(0x2, output(0))
            + server_frame(0x8, closecodes.REVOKED.to_bytes(2, "big") + b"revoked")
        )
        self.assertEqual(len(session.received), 1)
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 0)
        [(opcode, _, body)] = answers(transport.value())
        self.assertEqual((opcode, body[:2]), (0x8, closecodes.NORMAL.to_bytes(2, "big")))
        self.assertEqual(protocol.remoteCloseCode, closecodes.REVOKED)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((session.detached, session.refused), (1, ["revoked"]))

    def test_heartbeat_fed(self) -> None:
        """
        Messages the bridge reads itself keep the connection alive, as
        Autobahn's did: with one heard every 40 s, the 45 s watchdog never
        fires; with none, it drops the connection.
        """
        reactor: Any = MemoryReactorClock()
        session = quiet_session(reactor)
        protocol, transport = self.open(session)
        self.assertIs(session.link, protocol)
        for _ in range(5):
            reactor.advance(40)
            protocol.dataReceived(server_frame(0x2, Envelope(Kind.PONG).encode()))
        self.assertFalse(transport.disconnecting)
        self.assertIn((0x2, True, Envelope(Kind.PING).encode()), answers(transport.value()))
        self.assertEqual(protocol.trafficStats.incomingWebSocketFrames, 0)
        reactor.advance(45)
        self.assertTrue(transport.disconnecting)


#: Frames a relay might send, right and wrong.
_frames = frame_mixes(
    server_frame,
    output,
    b"\x5a\xa5\x3c\xc3",
    server_frame(0x2, b""),
    server_frame(0x8, closecodes.NORMAL.to_bytes(2, "big")),
    server_frame(0x3, output(0)),
)


class SameAsAutobahnTests(BridgeProtocolCase):
    """Whatever a relay sends, the bridge's path ends as Autobahn's alone would."""

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(st.lists(_frames, min_size=1, max_size=6), st.lists(st.integers(1, 2000), max_size=3))
    @example([server_frame(0x2, output(0, 700))], [])
    @example([server_frame(0x2, output(0, 40)), server_frame(0x2, output(1, 513))], [50])
    @example([server_frame(0x2, output(0, 200), length="64"), server_frame(0x2, output(1))], [])
    @example([server_frame(0x2, output(0, 40), length="16")], [3])
    @example([server_frame(0x2, output(0, 300))], [1, 2, 3])
    def test_any_frames_any_reads(self, frames: list[bytes], cuts: list[int]) -> None:
        """
        Any frames, cut into reads anywhere: the session hears the same
        messages, the relay gets the same answers (pongs, close), and the
        connection ends in the same state, with the bridge's whole-message
        path as with Autobahn's parser alone.
        """
        wire = b"".join(frames)
        points = sorted({min(cut, len(wire)) for cut in cuts})
        reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
        outcomes = []
        for own_path in (True, False):
            session = _Session()
            protocol, transport = self.open(session, maxMessagePayloadSize=512)
            self.assertTrue(protocol._frames_in)
            protocol._frames_in = own_path
            for data in reads:
                if data:
                    protocol.dataReceived(data)
            outcomes.append(
                (
                    session.received,
                    answers(transport.value()),
                    protocol.state,
                    transport.disconnecting,
                    protocol.remoteCloseCode,
                )
            )
        self.assertEqual(outcomes[0], outcomes[1])
