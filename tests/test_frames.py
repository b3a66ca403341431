"""
The relay's own reading and writing of whole binary messages
(C{coder1_wire.frames}, and the path through C{coder1_relay.websocket} that
uses it): the same messages, limits, rates and holds as Autobahn's path.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor

from coder1_relay.context import Limits
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, decode
from coder1_wire.frames import binary_message, unmask

from .test_flow import _TLS, RelayProtocolCase, _AdmittedBridge, _AdmittedTab, held, producer
from .test_hostile import frame_mixes, read_frames, ws_frame


def server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """The frames in C{data}, a server's (unmasked): (opcode, fin, payload) each."""
    frames = read_frames(data)
    assert all(mask is None for *_, mask in frames), "a server's frame went masked"
    return [(opcode, fin, body) for opcode, fin, body, _ in frames]


def messages(data: bytes) -> list[bytes]:
    """The binary messages in C{data} (each in one frame), PRESENCE aside."""
    return [
        payload
        for opcode, _, payload in server_frames(data)
        if opcode == 0x2 and payload[1] != Kind.PRESENCE
    ]


def close_code(data: bytes) -> int | None:
    """The code of the close frame in C{data}, if there is one."""
    for opcode, _, payload in server_frames(data):
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")
    return None


def output(seq: int, size: int = 24) -> bytes:
    """A bridge's CMD_STDOUT envelope of C{size} bytes in all."""
    head = Envelope(Kind.CMD_STDOUT, 1, seq, 1).encode()
    return head + os.urandom(size - len(head))


def keystroke(seq: int) -> bytes:
    """A tab's PTY_INPUT envelope for bridge 1."""
    return Envelope(Kind.PTY_INPUT, 2, seq, 1, b"k").encode()


class FrameTests(RelayProtocolCase):
    """The frames themselves, against Autobahn's."""

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
    @example(bytes(1024), b"\x01\x02\x03\x04")
    @example(bytes(1025), b"\x01\x02\x03\x04")
    def test_unmask_is_autobahns(self, payload: bytes, mask: bytes) -> None:
        """L{unmask} gives what Autobahn's masker gives, either side of the size it switches at."""
        self.assertEqual(
            unmask(payload, mask), create_xor_masker(mask, len(payload)).process(payload)
        )

    def test_sent_frame_is_autobahns(self) -> None:
        """
        A message the relay sends is the frame Autobahn's C{sendMessage} would
        write, with each length encoding (7, 16 and 64 bits).
        """
        tab, transport = self.open(_AdmittedTab)
        self.assertTrue(tab._frames_out)
        for size in (0, 1, 125, 126, 65535, 65536, 70000):
            payload = os.urandom(size)
            tab.send(payload)
            ours = transport.value()
            transport.clear()
            tab.sendMessage(payload, isBinary=True)
            self.assertEqual(ours, transport.value(), size)
            self.assertEqual(binary_message(payload), ours)
            transport.clear()

    def test_fragment_size_left_to_autobahn(self) -> None:
        """
        With Autobahn's C{autoFragmentSize}, a longer message is sent in
        fragments as Autobahn sends it, and a shorter one whole.
        """
        tab, transport = self.open(_AdmittedTab, autoFragmentSize=64)
        payload = os.urandom(200)
        tab.send(payload)
        ours = transport.value()
        transport.clear()
        tab.sendMessage(payload, isBinary=True)
        self.assertEqual(ours, transport.value())
        self.assertEqual(
            [(opcode, fin) for opcode, fin, _ in server_frames(ours)],
            [(0x2, False), (0x0, False), (0x0, False), (0x0, True)],
        )
        transport.clear()
        tab.send(payload[:64])
        self.assertEqual(transport.value(), binary_message(payload[:64]))


class WholeMessageTests(RelayProtocolCase):
    """Whole binary messages read by the relay, and the frames it leaves to Autobahn."""

    limits = Limits(
        max_message_size=100_000,
        messages_per_second=1.0,
        message_burst=3,
        bridge_messages_per_second=10.0,
        bridge_message_burst=10,
    )

    def test_one_read_many_messages(self) -> None:
        """
        The messages of one read, with each length encoding, go on in order,
        each as the very bytes that arrived.
        """
        _, tab = self.open(_AdmittedTab)
        bridge, _ = self.open(_AdmittedBridge)
        sent = [output(0, 30), output(1, 300), output(2, 70000)]
        bridge.dataReceived(b"".join(ws_frame(0x2, frame) for frame in sent))
        self.assertEqual(messages(tab.value()), sent)

    def test_message_across_reads(self) -> None:
        """
        A message cut between reads (a 64 KiB one always is) waits in the
        buffer and goes on once it has all arrived, in its place, through the
        relay's own path: Autobahn's parser never takes it in pieces.
        """
        _, tab = self.open(_AdmittedTab)
        bridge, _ = self.open(_AdmittedBridge)
        sent = [output(0, 40), output(1, 65536), output(2, 40)]
        wire = b"".join(ws_frame(0x2, frame) for frame in sent)
        first = len(ws_frame(0x2, sent[0]))
        cuts = [0, first + 5, first + 100, first + 40000]  # in its header, then its payload
        for start, end in itertools.pairwise(cuts):
            bridge.dataReceived(wire[start:end])
            self.assertEqual(messages(tab.value()), sent[:1])
            self.assertIsNone(bridge.current_frame)
        bridge.dataReceived(wire[cuts[-1] :])
        self.assertEqual(messages(tab.value()), sent)
        self.assertEqual(bridge.data, b"")
        self.assertEqual(bridge.trafficStats.incomingWebSocketFrames, 0)

    def test_other_frames_among_them(self) -> None:
        """
        A ping, and a message in fragments, between whole messages in one
        read: the ping is answered, the fragments make one message, in order.
        """
        _, tab = self.open(_AdmittedTab)
        bridge, to_bridge = self.open(_AdmittedBridge)
        fragmented = output(1, 50)
        bridge.dataReceived(
            ws_frame(0x2, output(0))
            + ws_frame(0x9, b"hi")
            + ws_frame(0x2, fragmented[:30], fin=False)
            + ws_frame(0x0, fragmented[30:])
            + ws_frame(0x2, output(2))
        )
        self.assertEqual([decode(m).seq for m in messages(tab.value())], [0, 1, 2])
        self.assertEqual(messages(tab.value())[1], fragmented)
        self.assertIn((0xA, True, b"hi"), server_frames(to_bridge.value()))

    def test_text_frame_closes_after_the_messages_before_it(self) -> None:
        """A text frame after a whole message: the message goes on, then the connection closes."""
        _, tab = self.open(_AdmittedTab)
        bridge, to_bridge = self.open(_AdmittedBridge)
        bridge.dataReceived(
            ws_frame(0x2, output(0)) + ws_frame(0x1, b"{}") + ws_frame(0x2, output(1))
        )
        self.assertEqual(len(messages(tab.value())), 1)
        self.assertEqual(close_code(to_bridge.value()), closecodes.PROTOCOL_ERROR)

    def test_broken_frames_left_to_autobahn(self) -> None:
        """
        A whole binary frame past the size limit (1009), unmasked, or with a
        length not in its shortest form (1002): closed as Autobahn closes it,
        and not forwarded.
        """
        cases = [
            (ws_frame(0x2, output(0, 100_001)), 1009),
            (ws_frame(0x2, output(0), mask=None), 1002),
            (ws_frame(0x2, output(0), length="16"), 1002),
            (ws_frame(0x2, output(0, 300), length="64"), 1002),
        ]
        for wire, code in cases:
            _, tab = self.open(_AdmittedTab)
            bridge, to_bridge = self.open(_AdmittedBridge)
            bridge.dataReceived(wire)
            self.assertEqual(messages(tab.value()), [])
            self.assertEqual(close_code(to_bridge.value()), code, wire[:2])

    def test_tab_rate_per_message(self) -> None:
        """
        Each whole message of a read takes a token: a tab past its burst is
        closed (4029), and what it sent past it is not forwarded.
        """
        tab, to_tab = self.open(_AdmittedTab)
        _, bridge = self.open(_AdmittedBridge)
        tab.dataReceived(b"".join(ws_frame(0x2, keystroke(seq)) for seq in range(5)))
        self.assertEqual(len(messages(bridge.value())), 3)
        self.assertEqual(close_code(to_tab.value()), closecodes.RATE_LIMITED)

    def test_bridge_rate_per_message(self) -> None:
        """
        A bridge past its burst is held: the message that went into debt
        goes on, the ones after it wait until the debt is paid.
        """
        _, tab = self.open(_AdmittedTab)
        bridge, _ = self.open(_AdmittedBridge)
        sent = [output(seq) for seq in range(12)]
        bridge.dataReceived(b"".join(ws_frame(0x2, frame) for frame in sent))
        self.assertEqual(messages(tab.value()), sent[:11])
        self.assertTrue(held(bridge))
        self.clock.advance(1.0)
        self.clock.advance(0)
        self.assertEqual(messages(tab.value()), sent)

    def test_held_in_the_middle_of_a_read(self) -> None:
        """
        A message that fills the tab's send buffer holds the bridge at once:
        the rest of the read waits, and goes on in order once the tab drains.
        """
        self.filling = True
        _, tab = self.open(_AdmittedTab)
        self.filling = False
        bridge, _ = self.open(_AdmittedBridge)
        sent = [output(seq, 1000) for seq in range(4)]
        bridge.dataReceived(b"".join(ws_frame(0x2, frame) for frame in sent))
        self.assertEqual(messages(tab.value()), sent[:1])
        self.assertTrue(held(bridge))
        tab.clear()
        producer(tab).resumeProducing()  # drained; the next message fills it again
        self.assertEqual(messages(tab.value()), sent[1:2])
        tab.clear()
        producer(tab).resumeProducing()
        producer(tab).resumeProducing()
        self.assertEqual(messages(tab.value()), sent[2:])

    filling = False

    def transport(self) -> _TLS:
        return _Filling(FileDescriptor()) if self.filling else super().transport()


#: Frames a bridge might send, right and wrong.
_frames = frame_mixes(
    ws_frame,
    output,
    None,
    ws_frame(0x2, b"\x01\x02"),
    ws_frame(0x2, keystroke(0)),  # the hub closes a bridge that sends it
)


class SameAsAutobahnTests(RelayProtocolCase):
    """Whatever a bridge sends, the relay's path ends as Autobahn's alone would."""

    limits = Limits(max_message_size=512, bridge_message_burst=100)

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(st.lists(_frames, min_size=1, max_size=6), st.lists(st.integers(1, 2000), max_size=3))
    @example([ws_frame(0x2, output(0, 700))], [])
    @example([ws_frame(0x2, output(0, 40)), ws_frame(0x2, output(1, 513))], [50])
    @example([ws_frame(0x2, output(0, 200), length="64"), ws_frame(0x2, output(1))], [])
    @example([ws_frame(0x2, output(0, 40), length="16")], [3])
    @example([ws_frame(0x2, keystroke(0)), ws_frame(0x2, output(1))], [])
    def test_any_frames_any_reads(self, frames: list[bytes], cuts: list[int]) -> None:
        """
        Any frames, cut into reads anywhere: the tab gets the same messages,
        the bridge the same answers (pongs, close code), with the relay's
        whole-message path as with Autobahn's parser alone.
        """
        wire = b"".join(frames)
        points = sorted({min(cut, len(wire)) for cut in cuts})
        reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
        outcomes = []
        for own_path in (True, False):
            self.setUp()
            _, tab = self.open(_AdmittedTab)
            bridge, to_bridge = self.open(_AdmittedBridge)
            tab.clear()
            bridge._frames_in = own_path
            for data in reads:
                if data:
                    bridge.dataReceived(data)
            outcomes.append((tab.value(), to_bridge.value(), bridge.state))
        self.assertEqual(outcomes[0], outcomes[1])


class _Filling(_TLS):
    """Pauses its producer, as TCP past its high-water mark, at each write of 1,000 B or more."""

    def write(self, data: Any) -> None:
        super().write(data)
        if len(data) >= 1000 and self.producer is not None:
            self.producer.pauseProducing()
