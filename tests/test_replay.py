"""Tests for L{coder1_bridge.replay}: replay logs, windows, resume; no I/O, a Clock."""

from __future__ import annotations

import base64
import random
import sys

import attrs
import hypothesis
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.replay import (
    CHUNK_OVERHEAD,
    CMD,
    HOT,
    MAX_CHUNK,
    MAX_ENDED,
    PTY,
    BadResume,
    InputLedger,
    Key,
    Outbox,
    ReplayLog,
    parse_client,
    parse_positions,
)
from coder1_wire.envelope import Envelope, Kind

TERMINAL: Key = (PTY, 7)
COMMAND: Key = (CMD, 7)


def output(key: Key, data: bytes) -> Envelope:
    kind = Kind.PTY_OUTPUT if key[0] == PTY else Kind.CMD_STDOUT
    return Envelope(kind, key[1], 0, 1, data)


@attrs.define
class Harness:
    """An outbox whose deliveries, holds and releases are recorded."""

    clock: Clock = attrs.field(factory=Clock)
    sent: list[tuple[int, Envelope]] = attrs.field(factory=list)
    held: list[Key] = attrs.field(factory=list)
    outbox: Outbox = attrs.field(init=False)

    def make(self, **settings: float) -> Outbox:
        self.outbox = Outbox(
            self.clock,
            lambda channel, frame: self.sent.append((channel, frame)),
            self.held.append,
            self.held.remove,
            **settings,  # type: ignore[arg-type]
        )
        return self.outbox

    def to(self, channel: int) -> list[Envelope]:
        return [f for c, f in self.sent if c == channel]

    def bytes_to(self, channel: int, key: Key, start: int = 0) -> bytes:
        """What C{channel} has on C{key} from C{start}: frames taken in by position, as a page."""
        have, position = b"", start
        for frame in self.to(channel):
            if frame.kind == Kind.GAP:
                position = frame.seq
                continue
            if (frame.kind & 0xF0) != (0x20 if key[0] == PTY else 0x10):
                continue
            end = frame.seq + len(frame.payload)
            if end <= position:
                continue
            have += frame.payload[position - frame.seq :]
            position = end
        return have


class OutboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_positions_are_bytes(self) -> None:
        """Sequenced frames are numbered by byte position; small output joins in the log."""
        box = self.h.make()
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        for piece in (b"ab", b"cde", b"f"):
            box.publish(output(TERMINAL, piece))
        self.assertEqual(
            [(f.seq, f.payload) for f in self.h.to(1)], [(0, b"ab"), (2, b"cde"), (5, b"f")]
        )
        self.assertEqual(box.logs[TERMINAL].end, 6)
        self.assertEqual(box.logs[TERMINAL].piece(1, 100).payload, b"bcdef")

    def test_window(self) -> None:
        """At most a window is in flight to a channel; its ACK lets the rest come."""
        box = self.h.make(window=4096)
        box.open(COMMAND, 1)
        box.resume(1, "tab", [(COMMAND, 0)])
        for _ in range(10):
            box.publish(output(COMMAND, b"x" * 1000))
        self.assertEqual(len(self.h.bytes_to(1, COMMAND)), 4096)
        box.ack(1, [(COMMAND, 2000)])
        self.assertEqual(len(self.h.bytes_to(1, COMMAND)), 6096)
        box.ack(1, [(COMMAND, 10_000)])  # more than was sent counts as what was
        self.assertEqual(len(self.h.bytes_to(1, COMMAND)), 10_000)

    def test_resume_sends_the_rest_once(self) -> None:
        """A channel that resumes from a position gets the rest from there, cut mid-frame."""
        box = self.h.make()
        box.open(TERMINAL, 1)
        for piece in (b"hello ", b"world", b"!"):
            box.publish(output(TERMINAL, piece))
        box.resume(2, "tab", [(TERMINAL, 3)])
        box.flush(2)
        self.assertEqual(self.h.bytes_to(2, TERMINAL, start=3), b"hello world!"[3:])
        self.assertEqual(self.h.to(2)[0].seq, 3)

    def test_terminal_without_page_drops_oldest(self) -> None:
        """A terminal nobody follows runs on; its oldest output goes, and a GAP says how much."""
        box = self.h.make(capacity=64 * 1024)
        box.open(TERMINAL, 1)
        for i in range(200):
            box.publish(output(TERMINAL, bytes([i]) * 1000))
        self.assertEqual(self.h.held, [])
        log = box.logs[TERMINAL]
        self.assertLessEqual(log.weight, 64 * 1024)
        self.assertGreater(log.start, 0)
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.flush(1)
        gap = self.h.to(1)[0]
        self.assertEqual((gap.kind, gap.seq), (Kind.GAP, log.start))
        self.assertEqual(gap.json()["bytes"], log.start)
        self.assertEqual(self.h.bytes_to(1, TERMINAL)[-1000:], bytes([199]) * 1000)
        self.assertEqual(len(self.h.bytes_to(1, TERMINAL)), 200_000 - log.start)

    def test_command_without_page_is_held(self) -> None:
        """A command's output is never dropped: with its log full, the command is held."""
        box = self.h.make(capacity=64 * 1024)
        box.open(COMMAND, 1)
        for _ in range(70):
            box.publish(output(COMMAND, b"y" * 1000))
        self.assertEqual(self.h.held, [COMMAND])
        self.assertEqual(box.logs[COMMAND].start, 0)
        box.resume(1, "tab", [(COMMAND, 0)])
        box.flush(1)
        box.ack(1, [(COMMAND, 70_000)])
        self.assertEqual(self.h.held, [])
        self.assertEqual(self.h.bytes_to(1, COMMAND), b"y" * 70_000)
        # What a command printed goes as soon as it is taken in.
        self.assertEqual((box.logs[COMMAND].start, box.logs[COMMAND].weight), (70_000, 0))

    def test_slow_page_holds_a_terminal(self) -> None:
        """A page that follows a terminal but does not acknowledge holds it: nothing is dropped."""
        box = self.h.make(capacity=64 * 1024, window=8 * 1024)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        for _ in range(70):
            box.publish(output(TERMINAL, b"z" * 1000))
        self.assertEqual(self.h.held, [TERMINAL])
        self.assertEqual(box.logs[TERMINAL].start, 0)
        box.drop(1)  # the page went away: now the terminal may drop its oldest
        self.assertEqual(self.h.held, [])

    def test_joined_chunks_count_overhead(self) -> None:
        """Tiny frames cannot hold more than the log's size: each chunk counts an overhead."""
        box = self.h.make(capacity=64 * 1024)
        box.open(COMMAND, 1)
        for i in range(2000):
            kind = Kind.CMD_STDOUT if i % 2 else Kind.CMD_STDERR
            box.publish(Envelope(kind, 7, 0, 1, b"."))
        self.assertEqual(box.logs[COMMAND].weight, 2000 * (1 + CHUNK_OVERHEAD))
        self.assertEqual(self.h.held, [COMMAND])

    def test_ended_log_forgotten_after_grace(self) -> None:
        """An ended stream's log is kept for the grace period, for a page that comes back."""
        box = self.h.make(grace=60)
        box.open(COMMAND, 1)
        box.publish(output(COMMAND, b"done"))
        box.publish(Envelope(Kind.CMD_EXIT, 7, 0, 1, b'{"exit_code":0}'))
        self.h.clock.advance(59)
        self.assertIn(COMMAND, box.logs)
        self.h.clock.advance(1)
        self.assertNotIn(COMMAND, box.logs)
        self.assertEqual(box.resume(1, "tab", [(COMMAND, 0)]), [COMMAND])

    def test_ended_logs_are_few(self) -> None:
        """At most MAX_ENDED ended streams keep their logs: the oldest goes first."""
        box = self.h.make(grace=0)
        for stream in range(MAX_ENDED + 1):
            box.open((CMD, stream), 1)
            box.publish(Envelope(Kind.CMD_EXIT, stream, 0, 1, b"{}"))
        self.assertNotIn((CMD, 0), box.logs)
        self.assertEqual(len(box.logs), MAX_ENDED)

    def test_old_page_gets_everything_live(self) -> None:
        """A channel that never resumed gets every frame as it comes, counted as delivered."""
        box = self.h.make(capacity=64 * 1024)
        box.open(COMMAND, 1)
        box.legacy(3)
        for _ in range(100):
            box.publish(output(COMMAND, b"q" * 1000))
        self.assertEqual(self.h.held, [])
        self.assertEqual(self.h.bytes_to(3, COMMAND), b"q" * 100_000)

    def test_unfollowed_streams_not_sent(self) -> None:
        """A channel gets only the streams its RESUME lists; a later RESUME can leave one out."""
        box = self.h.make()
        other: Key = (PTY, 8)
        box.open(TERMINAL, 1)
        box.open(other, 1)
        box.resume(1, "tab", [(TERMINAL, 0), (other, 0)])
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.publish(output(other, b"not for you"))
        box.publish(output(TERMINAL, b"yours"))
        self.assertEqual([f.payload for f in self.h.to(1)], [b"yours"])

    def test_nothing_sent_while_blocked(self) -> None:
        """
        While the connection to the relay is full (blocked), nothing is sent from
        the logs, even within a window; unblocking sends what each channel is owed.
        """
        box = self.h.make()
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.blocked = True
        box.publish(output(TERMINAL, b"held back"))
        self.assertEqual(self.h.to(1), [])
        box.unblock()
        self.assertEqual(self.h.bytes_to(1, TERMINAL), b"held back")

    def test_close_leaves_no_timer(self) -> None:
        """Closing the outbox forgets the ended logs and cancels their timers."""
        box = self.h.make(grace=60)
        box.open(COMMAND, 1)
        box.publish(Envelope(Kind.CMD_EXIT, 7, 0, 1, b"{}"))
        box.close()
        self.assertEqual(self.h.clock.getDelayedCalls(), [])
        self.assertEqual(box.logs, {})

    def end_terminal(self, box: Outbox) -> None:
        box.publish(Envelope(Kind.PTY_EXIT, 7, 0, 1, b'{"exit_code":0,"signal":null}'))

    def test_closed_terminal_forgotten_once_delivered(self) -> None:
        """
        A terminal a page closed (PTY_CLOSE) has its log forgotten as soon as its
        end (PTY_EXIT) is sent: not kept for the grace period; a RESUME finds it unknown.
        """
        box = self.h.make(grace=600)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.publish(output(TERMINAL, b"x" * 1000))
        box.closed(1, TERMINAL)
        self.assertIn(TERMINAL, box.logs)  # still running
        self.end_terminal(box)
        self.assertEqual(self.h.to(1)[-1].kind, Kind.PTY_EXIT)
        self.assertNotIn(TERMINAL, box.logs)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])
        self.assertEqual(box.resume(2, "other", [(TERMINAL, 0)]), [TERMINAL])

    def test_ended_terminal_kept_unless_closed(self) -> None:
        """
        A terminal whose program ended on its own keeps its log for the grace period;
        a PTY_CLOSE after its end (the page closing the ended tab) lets it go.
        """
        box = self.h.make(grace=600)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.publish(output(TERMINAL, b"x" * 1000))
        self.end_terminal(box)
        box.ack(1, [(TERMINAL, box.logs[TERMINAL].end)])
        self.assertIn(TERMINAL, box.logs)
        box.closed(1, TERMINAL)
        self.assertNotIn(TERMINAL, box.logs)

    def test_closed_terminal_waits_for_other_pages(self) -> None:
        """
        Another channel following the closed terminal keeps its log until it has
        acknowledged the end; one that goes away without doing so lets it go.
        """
        box = self.h.make()
        box.open(TERMINAL, 1)
        box.resume(1, "closer", [(TERMINAL, 0)])
        box.resume(2, "other", [(TERMINAL, 0)])
        box.resume(3, "third", [(TERMINAL, 0)])
        box.publish(output(TERMINAL, b"x" * 1000))
        box.closed(1, TERMINAL)
        self.end_terminal(box)
        end = box.logs[TERMINAL].end
        box.ack(2, [(TERMINAL, end - 1)])
        self.assertIn(TERMINAL, box.logs)
        box.ack(2, [(TERMINAL, end)])
        self.assertIn(TERMINAL, box.logs)  # channel 3 has not acknowledged
        box.drop(3)
        self.assertNotIn(TERMINAL, box.logs)

    def test_closed_terminal_sent_to_its_end_first(self) -> None:
        """
        The channel that closed the terminal is sent its end before the log goes,
        even when its window is full as the terminal ends.
        """
        box = self.h.make(window=4096)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        for _ in range(10):
            box.publish(output(TERMINAL, b"x" * 1000))
        box.closed(1, TERMINAL)
        self.end_terminal(box)
        self.assertIn(TERMINAL, box.logs)
        box.ack(1, [(TERMINAL, 4096)])
        self.assertIn(TERMINAL, box.logs)
        box.ack(1, [(TERMINAL, 8192)])
        self.assertEqual(self.h.to(1)[-1].kind, Kind.PTY_EXIT)
        self.assertEqual(len(self.h.bytes_to(1, TERMINAL)), 10_000 + 29)
        self.assertNotIn(TERMINAL, box.logs)

    def test_closing_a_command_keeps_nothing_new(self) -> None:
        """Only terminals are closed by PTY_CLOSE: a command's stream is not affected."""
        box = self.h.make(grace=600)
        box.open(COMMAND, 1)
        box.publish(Envelope(Kind.CMD_EXIT, 7, 0, 1, b"{}"))
        box.closed(1, COMMAND)
        self.assertIn(COMMAND, box.logs)


class StorageTests(SynchronousTestCase):
    """How a log keeps what a process printed: as it came, trimmed by whole chunks."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_frames_kept_and_sent_without_copy(self) -> None:
        """A large output frame is kept and sent as the very bytes it came in."""
        box = self.h.make()
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        data = bytes(range(256)) * 256  # 64 KiB
        box.publish(output(TERMINAL, data))
        self.assertIs(self.h.to(1)[0].payload, data)
        box.resume(2, "tab", [(TERMINAL, 0)])  # a page that comes back gets the same bytes
        box.flush(2)
        self.assertIs(self.h.to(2)[0].payload, data)

    def test_dropped_frames_let_go(self) -> None:
        """
        A frame that leaves a terminal's scrollback is no longer referenced by
        the log at once, so that the log holds only its size, not up to twice it.
        """
        box = self.h.make(capacity=64 * 1024)
        box.open(TERMINAL, 1)
        first = bytes(range(256)) * 128  # 32 KiB
        alone = sys.getrefcount(first)
        box.publish(output(TERMINAL, first))
        self.assertGreater(sys.getrefcount(first), alone)
        for _ in range(3):
            box.publish(output(TERMINAL, b"-" * 32 * 1024))
        self.assertGreater(box.logs[TERMINAL].start, 0)
        self.assertEqual(sys.getrefcount(first), alone)

    def test_small_frames_joined(self) -> None:
        """Small output frames are joined in the log: one chunk's overhead, one frame on replay."""
        box = self.h.make()
        box.open(TERMINAL, 1)
        for piece in (b"a" * 100, b"b" * 100, b"c" * 100):
            box.publish(output(TERMINAL, piece))
        self.assertEqual(box.logs[TERMINAL].weight, 300 + CHUNK_OVERHEAD)
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.flush(1)
        self.assertEqual([f.payload for f in self.h.to(1)], [b"a" * 100 + b"b" * 100 + b"c" * 100])

    def test_trim_at_chunk_boundaries(self) -> None:
        """A terminal's scrollback loses whole frames from its start, never part of one."""
        box = self.h.make(capacity=64 * 1024)
        box.open(TERMINAL, 1)
        sizes = [20_000, 30_000, 10_000, 25_000]
        for i, size in enumerate(sizes):
            box.publish(output(TERMINAL, bytes([i]) * size))
        log = box.logs[TERMINAL]
        self.assertEqual(log.start, 20_000)  # the first frame went whole; the second stays
        self.assertEqual(log.weight, 65_000 + 3 * CHUNK_OVERHEAD)
        box.resume(1, "tab", [(TERMINAL, 20_000)])
        box.flush(1)
        self.assertEqual(
            self.h.bytes_to(1, TERMINAL, start=20_000),
            b"\1" * 30_000 + b"\2" * 10_000 + b"\3" * 25_000,
        )

    def test_chunk_larger_than_the_scrollback(self) -> None:
        """Of a frame larger than a terminal's scrollback, its end is kept, up to the size."""
        box = self.h.make(capacity=64 * 1024)
        box.open(TERMINAL, 1)
        data = bytes(range(256)) * 400  # 100 KiB
        box.publish(output(TERMINAL, data))
        log = box.logs[TERMINAL]
        # Exactly the log's size is kept: the frame's last 64 KiB, less its overhead.
        self.assertEqual((log.start, log.end, log.weight), (36_928, len(data), 64 * 1024))
        self.assertEqual(self.h.held, [])
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.flush(1)
        gap = self.h.to(1)[0]
        self.assertEqual((gap.kind, gap.json()["bytes"]), (Kind.GAP, log.start))
        self.assertEqual(self.h.bytes_to(1, TERMINAL, start=log.start), data[log.start :])

    def test_chunk_larger_than_the_scrollback_followed(self) -> None:
        """A page that follows keeps all of a large frame until it acknowledges it."""
        box = self.h.make(capacity=64 * 1024, window=1024 * 1024)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        data = bytes(range(256)) * 400
        box.publish(output(TERMINAL, data))
        log = box.logs[TERMINAL]
        self.assertEqual((log.start, self.h.held), (0, [TERMINAL]))
        box.ack(1, [(TERMINAL, 20_000)])  # part of it: only that part may go, still held
        self.assertEqual((log.start, self.h.held), (20_000, [TERMINAL]))
        box.ack(1, [(TERMINAL, 50_000)])  # past what is over the size: released
        self.assertEqual((log.start, log.weight, self.h.held), (36_928, 64 * 1024, []))
        box.resume(2, "tab", [(TERMINAL, log.start + 10)])
        box.flush(2)
        self.assertEqual(self.h.bytes_to(2, TERMINAL, start=log.start + 10), data[log.start + 10 :])

    def test_replay_from_inside_a_chunk(self) -> None:
        """A page resuming from inside a kept frame gets the rest of it, then the next."""
        box = self.h.make()
        box.open(TERMINAL, 1)
        first, second = b"x" * 40_000, b"y" * 30_000
        box.publish(output(TERMINAL, first))
        box.publish(output(TERMINAL, second))
        box.resume(1, "tab", [(TERMINAL, 12_345)])
        box.flush(1)
        frames = self.h.to(1)
        self.assertEqual(
            [(f.seq, len(f.payload)) for f in frames], [(12_345, 27_655), (40_000, 30_000)]
        )
        self.assertIs(frames[1].payload, second)

    def test_window_cuts_inside_a_chunk(self) -> None:
        """A window smaller than a frame sends it in parts, each where the last ended."""
        box = self.h.make(window=16 * 1024)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        data = bytes(range(256)) * 160  # 40 KiB
        box.publish(output(TERMINAL, data))
        for _ in range(3):
            box.ack(1, [(TERMINAL, box.follower(1).sent[TERMINAL])])  # type: ignore[union-attr]
        self.assertEqual([f.seq for f in self.h.to(1)], [0, 16_384, 32_768])
        self.assertEqual(self.h.bytes_to(1, TERMINAL), data)


#: What a page and its process do, one step at a time, in L{ResumeProperties}.
_STEPS = st.one_of(
    st.tuples(st.just("print"), st.integers(1, 2 * MAX_CHUNK)),
    st.tuples(st.just("ack"), st.integers(0, 100)),
    st.tuples(st.just("drop"), st.just(0)),
    st.tuples(st.just("resume"), st.integers(0, 100)),
)


@attrs.define
class _Page:
    """One page load following one stream over channels in turn, as the IDE page does."""

    h: Harness
    key: Key
    channel: int = 0
    connected: bool = False
    #: The end of what it has received, and where the current channel's frames start.
    has: int = 0
    seen: int = 0

    def take(self) -> None:
        """Take in what arrived on the current channel, by byte position."""
        for channel, frame in self.h.sent[self.seen :]:
            if channel != self.channel or frame.stream != self.key[1]:
                continue
            if frame.kind == Kind.GAP:
                self.has = max(self.has, frame.seq)
                continue
            assert frame.seq <= self.has, (frame.seq, self.has)  # no hole
            self.has = max(self.has, frame.seq + len(frame.payload))
        self.seen = len(self.h.sent)

    def resume(self, box: Outbox, back: int) -> None:
        """
        A new channel, resuming from what it has (or from up to C{back}% before
        it); the page load's earlier channel ends, as the bridge's session does.
        """
        box.drop(self.channel)
        self.channel += 1
        self.connected = True
        self.seen = len(self.h.sent)
        box.resume(self.channel, "page", [(self.key, self.has * (100 - back) // 100)])
        box.flush(self.channel)


class ResumeProperties(SynchronousTestCase):
    """Whatever the sizes and the order of events, a resume never leaves a stream stuck."""

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(
        capacity=st.integers(64 * 1024, 1024 * 1024),
        window=st.integers(4 * 1024, 1024 * 1024),
        kind=st.sampled_from([PTY, CMD]),
        steps=st.lists(_STEPS, max_size=40),
    )
    def test_resume_releases(
        self, capacity: int, window: int, kind: str, steps: list[tuple[str, int]]
    ) -> None:
        """
        A process prints (while not held), the page acknowledges part of what it
        has, connections drop and the page resumes on a new channel, from what it
        has or from before it.  After every step the log is as trimmed as it can
        be (trimming again changes nothing), and a held process always has a way
        out: some output is in flight to the page, whose ACK will release it, or
        no page follows it (a command then waits for one).  Then, with the page
        acknowledging all it has, every byte printed arrives.
        """
        h = Harness()
        box = h.make(capacity=capacity, window=window)
        key: Key = (kind, 7)
        box.open(key, 1)
        page = _Page(h, key)
        printed = 0

        def check() -> None:
            page.take()
            log = box.logs[key]
            state = (log.held, log.weight, log.start, list(h.held))
            box._trim(log)
            self.assertEqual((log.held, log.weight, log.start, list(h.held)), state)
            follower = box.follower(page.channel) if page.connected else None
            if log.held and follower is not None:
                self.assertGreater(follower.sent[key], follower.acked[key])

        for step, amount in steps:
            if step == "print" and key not in h.held:
                box.publish(output(key, b"x" * amount))
                printed += amount
            elif step == "ack" and page.connected:
                box.ack(page.channel, [(key, page.has * amount // 100)])
            elif step == "drop" and page.connected:
                box.drop_all()
                page.connected = False
            elif step == "resume":
                page.resume(box, amount if kind == PTY else 0)
            check()
        page.resume(box, 0)
        check()
        for _ in range(printed // window + 2):
            box.ack(page.channel, [(key, page.has)])
            check()
        self.assertEqual(page.has, printed)
        self.assertEqual(h.held, [])


class InputLedgerTests(SynchronousTestCase):
    def test_duplicates_refused(self) -> None:
        """A frame numbered below the next expected one is a duplicate; numbers are per client."""
        ledger = InputLedger()
        self.assertTrue(ledger.accept("a", TERMINAL, 0))
        self.assertTrue(ledger.accept("a", TERMINAL, 1))
        self.assertFalse(ledger.accept("a", TERMINAL, 1))
        self.assertFalse(ledger.accept("a", TERMINAL, 0))
        self.assertTrue(ledger.accept("b", TERMINAL, 0))
        self.assertEqual(ledger.next("a", TERMINAL), 2)
        self.assertIsNone(ledger.next("a", COMMAND))


class ParseTests(SynchronousTestCase):
    def test_positions(self) -> None:
        """A RESUME's streams parse; wrong types, ranges and sizes are refused."""
        good = {"streams": [{"type": "pty", "stream": 1, "next": 5}]}
        self.assertEqual(parse_positions(good, "streams"), [((PTY, 1), 5)])
        bad: object
        for bad in (
            [],
            {"streams": {}},
            {"streams": [{"type": "tty", "stream": 1, "next": 0}]},
            {"streams": [{"type": "pty", "stream": -1, "next": 0}]},
            {"streams": [{"type": "pty", "stream": 1, "next": 2**64}]},
            {"streams": [{"type": "pty", "stream": True, "next": 0}]},
            {"streams": [1]},
            {"streams": [{"type": "pty", "stream": 1, "next": 0}] * 257},
        ):
            self.assertRaises(BadResume, parse_positions, bad, "streams")

    def test_client(self) -> None:
        """A client id is 1 to 64 URL-safe characters."""
        self.assertEqual(parse_client({"client": "Ab_-9"}), "Ab_-9")
        for bad in ({}, {"client": ""}, {"client": "x" * 65}, {"client": "a b"}, {"client": 3}):
            self.assertRaises(BadResume, parse_client, bad)


def listing(size: int) -> bytes:
    """C{size} bytes of terminal output that compress as a real listing does (about 5 times)."""
    rng = random.Random(size)
    lines = []
    total = 0
    while total < size:
        line = b"-rw-r--r-- 1 dev dev %7d Dec  5 %02d:%02d src/%s/module_%05d.py\n" % (
            rng.randrange(10**6),
            rng.randrange(24),
            rng.randrange(60),
            rng.choice([b"relay", b"bridge", b"wire", b"tests"]),
            rng.randrange(10**5),
        )
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def noise(size: int) -> bytes:
    """C{size} bytes of output that does not compress well (random bytes, base64)."""
    return base64.b64encode(random.Random(size).randbytes(size))[:size]


def frames(data: bytes, sizes: tuple[int, ...] = (64 * 1024, 700, 4096, 30_000)) -> list[bytes]:
    """C{data} cut into frames of the sizes given, in turn (as a terminal's reads come)."""
    cut, at, turn = [], 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)]
        cut.append(data[at : at + size])
        at, turn = at + size, turn + 1
    return cut


def read_from(log: ReplayLog, position: int) -> bytes:
    """What a log gives from C{position} to its end, frame by frame as a replay sends it."""
    have = []
    while position < log.end:
        frame = log.piece(position, MAX_CHUNK)
        assert frame.seq == position and frame.payload, (frame.seq, position)
        have.append(frame.payload)
        position += len(frame.payload)
    return b"".join(have)


class PackTests(SynchronousTestCase):
    """Older output of a log is kept compressed; what it gives back is exactly what came."""

    def setUp(self) -> None:
        self.h = Harness()

    def printed(self, data: bytes, **settings: float) -> ReplayLog:
        """A terminal no page follows that printed C{data}: its log."""
        box = self.h.make(**settings)
        box.open(TERMINAL, 1)
        for frame in frames(data):
            box.publish(output(TERMINAL, frame))
        return box.logs[TERMINAL]

    def followed(self, data: bytes) -> Outbox:
        """A terminal a tab follows that printed C{data}, none of it acknowledged yet."""
        box = self.h.make(window=4 * 1024 * 1024)
        box.open(TERMINAL, 1)
        box.resume(1, "tab", [(TERMINAL, 0)])
        for frame in frames(data):
            box.publish(output(TERMINAL, frame))
        return box

    def test_old_output_kept_compressed(self) -> None:
        """
        Output older than the hot part is kept compressed: a listing of 3 MiB
        takes less than a third of that, and gives back every byte.
        """
        data = listing(3 * 1024 * 1024)
        log = self.printed(data)
        self.assertEqual((log.start, log.end), (0, len(data)))
        self.assertLess(log.stored, len(data) // 3)
        self.assertGreaterEqual(log.stored, HOT)
        self.assertEqual(read_from(log, 0), data)

    def test_resume_from_any_position(self) -> None:
        """
        A page resuming from any position, within a compressed block, at its
        edges or in the hot part, gets exactly the rest, through the outbox.
        """
        data = listing(2 * 1024 * 1024)
        box = self.h.make()
        box.open(TERMINAL, 1)
        for frame in frames(data):
            box.publish(output(TERMINAL, frame))
        log = box.logs[TERMINAL]
        self.assertLess(log.stored, len(data) // 3)
        positions = (0, 1, 64 * 1024, 128 * 1024 - 1, 128 * 1024, 200_001)
        for channel, position in enumerate(
            (*positions, len(data) - HOT - 5, len(data) - 1), start=1
        ):
            box.resume(channel, f"tab{channel}", [(TERMINAL, position)])
            box.flush(channel)
            while (sent := box.followers[channel].sent[TERMINAL]) < len(data):
                box.ack(channel, [(TERMINAL, sent)])
            self.assertEqual(self.h.bytes_to(channel, TERMINAL, start=position), data[position:])
            box.drop(channel)
        self.assertEqual(read_from(log, 0), data)

    def test_log_size_counts_bytes_as_they_came(self) -> None:
        """
        Compressed or not, the log keeps its size in bytes as they came: of 4 MiB
        printed into a 1 MiB log, the last 1 MiB or so stays (whole blocks go), a
        page from the start gets a GAP to it and then exactly the bytes kept.
        """
        data = listing(4 * 1024 * 1024)
        log = self.printed(data, capacity=1024 * 1024)
        self.assertLessEqual(log.weight, 1024 * 1024)
        self.assertGreater(log.end - log.start, 1024 * 1024 - 256 * 1024)
        self.assertLess(log.stored, (log.end - log.start) // 2)
        self.assertEqual(read_from(log, log.start), data[log.start :])
        box = self.h.outbox
        box.resume(1, "tab", [(TERMINAL, 0)])
        box.flush(1)
        self.assertEqual(self.h.to(1)[0].kind, Kind.GAP)
        while (sent := box.followers[1].sent[TERMINAL]) < len(data):
            box.ack(1, [(TERMINAL, sent)])
        self.assertEqual(self.h.bytes_to(1, TERMINAL), data[log.start :])

    def test_incompressible_output_kept_as_it_came(self) -> None:
        """Output that does not compress (random, base64) is kept as it came, byte for byte."""
        data = noise(2 * 1024 * 1024)
        log = self.printed(data)
        self.assertEqual(log.stored, len(data))
        self.assertEqual(read_from(log, 0), data)

    def test_mixed_output(self) -> None:
        """
        Compressible and incompressible stretches in turn: each kept as suits it
        (after output that did not compress, the next 512 KiB are kept as they
        come without trying), and every byte given back exactly.
        """
        mib = 1024 * 1024
        data = noise(3 * mib // 2) + listing(3 * mib) + noise(3 * mib // 2) + listing(3 * mib)
        log = self.printed(data, capacity=16 * mib)
        self.assertLess(log.stored, len(data) * 2 // 3)
        self.assertGreater(log.stored, 3 * mib)
        for position in (0, 3 * mib // 2 - 1, 3 * mib // 2, 5 * mib + 3, len(data) - 1):
            self.assertEqual(read_from(log, position), data[position:])

    def test_unacknowledged_output_not_compressed(self) -> None:
        """
        What a following channel has not acknowledged stays as it came (it is
        sent soon).  Once acknowledged, one block is compressed at once and the
        rest one block per turn of the reactor, not all within the ACK.
        """
        data = listing(2 * 1024 * 1024)
        box = self.followed(data)
        log = box.logs[TERMINAL]
        self.assertEqual(log.stored, len(data))
        box.ack(1, [(TERMINAL, len(data))])
        self.assertGreater(log.stored, len(data) - 256 * 1024)
        self.assertLess(log.stored, len(data) - 64 * 1024)
        self.h.clock.advance(0)
        self.assertLess(log.stored, len(data) // 3)
        self.assertEqual(read_from(log, 0), data)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_forgotten_log_stops_compressing(self) -> None:
        """A log forgotten (the bridge stops) leaves no compression pending."""
        data = listing(2 * 1024 * 1024)
        box = self.followed(data)
        box.ack(1, [(TERMINAL, len(data))])
        self.assertEqual(len(self.h.clock.getDelayedCalls()), 1)
        box.close()
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_newest_frame_kept_as_it_came(self) -> None:
        """
        The newest output is neither compressed nor copied: the frame a replay
        sends of it is the very payload the process gave.
        """
        data = listing(2 * 1024 * 1024)
        log = self.printed(data)
        last = frames(data)[-1]
        box = self.h.outbox
        box.publish(output(TERMINAL, last))
        self.assertIs(log.piece(log.end - len(last), MAX_CHUNK).payload, last)
