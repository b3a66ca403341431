"""
What the bridge keeps so that nothing printed is lost and nothing typed is
applied twice across broken connections (docs/protocol.md, section 5.7).

L{Outbox} keeps one L{ReplayLog} per stream: its sequenced frames, numbered by
byte position, until they are known to be delivered, within a size.  It tracks
per browser channel (L{Follower}) which streams the channel follows, what it
was sent and what it acknowledged, and sends within a window per stream.
L{InputLedger} remembers, per page load (client) and stream, the number of the
next input frame, so a frame the page resends after a resume is recognised.

No I/O here: frames go out through C{deliver}, processes are paused and
resumed through C{hold} and C{release}, and time comes from the injected clock.
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from coder1_wire.envelope import Envelope, Kind, control

PTY = "pty"
CMD = "cmd"
#: A stream as the replay logs know it: commands and terminals are counted apart.
Key = tuple[str, int]

#: The frames that are numbered by byte position, kept and replayed.
SEQUENCED: dict[int, str] = {
    Kind.PTY_OPENED: PTY,
    Kind.PTY_OUTPUT: PTY,
    Kind.PTY_EXIT: PTY,
    Kind.CMD_STDOUT: CMD,
    Kind.CMD_STDERR: CMD,
    Kind.CMD_EXIT: CMD,
}
#: The sequenced frames that carry output bytes, which may be joined and cut.
_OUTPUT = frozenset({Kind.PTY_OUTPUT, Kind.CMD_STDOUT, Kind.CMD_STDERR})
_ENDS = frozenset({Kind.PTY_EXIT, Kind.CMD_EXIT})
#: Browser → bridge kinds per type, for numbering input.
INPUT_TYPES: dict[int, str] = {
    Kind.CMD_START: CMD,
    Kind.CMD_STDIN: CMD,
    Kind.CMD_CANCEL: CMD,
    Kind.PTY_OPEN: PTY,
    Kind.PTY_INPUT: PTY,
    Kind.PTY_RESIZE: PTY,
    Kind.PTY_CLOSE: PTY,
}
STARTS = frozenset({Kind.CMD_START, Kind.PTY_OPEN})

#: Frames sent from the logs carry at most this many bytes of output.
MAX_CHUNK = 64 * 1024
#: Output frames shorter than this are joined in the log (a copy, of small frames
#: only), up to L{MAX_CHUNK}; longer ones are kept as the bytes they came in.
JOIN_BELOW = 4 * 1024
#: Bytes each kept chunk is counted for beyond its payload, so that a flood of
#: tiny frames cannot hold more memory than the log's size says.
CHUNK_OVERHEAD = 64
#: Bytes at the end of a log always kept as they came (the hot part): what a page
#: that comes back usually resumes from, and what is in flight, are read again
#: with no decompression, and the newest frame never waits for compression.
HOT = 256 * 1024
#: Output further back that every channel following the stream has acknowledged
#: is compressed (zlib, level 1) in blocks of at least this many bytes of one kind
#: (L{ReplayLog.pack}); the log's size still counts the bytes as they came.
PACK_SIZE = 128 * 1024
#: A block's first bytes are compressed first: unless they shrink to at most
#: L{PACK_RATIO} of their size (compressed or random output does not), the block
#: is kept as it came and no more CPU goes into it, nor into the next
#: L{POOR_SKIP} bytes (such output comes in long runs: a binary, an archive).
PACK_SAMPLE = 8 * 1024
PACK_RATIO = 0.5
POOR_SKIP = 512 * 1024
#: Raw deflate: no header, no checksum (a tenth less CPU); the bytes never leave memory.
_RAW = -15
#: Ended streams whose logs are kept (for a page that comes back) before the oldest goes.
MAX_ENDED = 16
#: Page loads whose input numbers are remembered before the oldest is forgotten.
MAX_CLIENTS = 64
#: Streams whose input numbers are remembered per page load.
MAX_STREAMS_PER_CLIENT = 1024
#: Streams one RESUME may list.
MAX_RESUMED = 256
_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def key_of(envelope: Envelope) -> Key | None:
    """The stream of a sequenced bridge → browser frame; None for any other frame."""
    kind = SEQUENCED.get(envelope.kind)
    return None if kind is None else (kind, envelope.stream)


def input_key(envelope: Envelope) -> Key | None:
    """The stream of a numbered browser → bridge frame; None for any other frame."""
    kind = INPUT_TYPES.get(envelope.kind)
    return None if kind is None else (kind, envelope.stream)


class BadResume(ValueError):
    """A RESUME or ACK whose body is not what section 5.7 says."""


def parse_positions(body: object, field: str) -> list[tuple[Key, int]]:
    """The C{[{"type", "stream", "next"}]} list under C{field} of a JSON body."""
    if not isinstance(body, dict):
        raise BadResume("not a JSON object")
    items = body.get(field)
    if not isinstance(items, list) or len(items) > MAX_RESUMED:
        raise BadResume(f"{field} must be a list of at most {MAX_RESUMED}")
    positions = []
    for item in items:
        if not isinstance(item, dict):
            raise BadResume(f"{field} holds a non-object")
        kind, stream, position = item.get("type"), item.get("stream"), item.get("next")
        if kind not in (PTY, CMD):
            raise BadResume("type must be pty or cmd")
        if not _whole(stream, 2**32) or not _whole(position, 2**64):
            raise BadResume("stream and next must be whole numbers in range")
        positions.append(((str(kind), int(stream)), int(position)))  # type: ignore[arg-type]
    return positions


def parse_client(body: object) -> str:
    """The C{client} of a RESUME body."""
    client = body.get("client") if isinstance(body, dict) else None
    if not isinstance(client, str) or not _CLIENT.fullmatch(client):
        raise BadResume("client must be 1 to 64 characters of A-Z a-z 0-9 _ -")
    return client


def _whole(value: object, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def positions_body(positions: Iterable[tuple[Key, int]]) -> list[dict[str, object]]:
    """The JSON list of section 5.7 for C{positions}."""
    return [{"type": k[0], "stream": k[1], "next": n} for k, n in positions]


@attrs.define(slots=True)
class _Chunk:
    """
    Kept bytes: a frame's own payload (never copied), small output frames
    joined in a C{bytearray} (then C{joined}), or a block of older output
    compressed with zlib (then C{packed} is the length of what it holds).
    """

    kind: int
    position: int
    data: bytes | bytearray
    joined: bool = False
    packed: int = -1

    @property
    def size(self) -> int:
        """The bytes it holds, as they came."""
        return len(self.data) if self.packed < 0 else self.packed

    @property
    def end(self) -> int:
        return self.position + self.size


#: What stands for a dropped chunk in a log's list until the list is compacted.
_GONE = _Chunk(0, 0, b"")


@attrs.define
class ReplayLog:
    """
    The sequenced frames of one stream still kept, from position C{start} to
    C{end}, with what any channel has acknowledged (C{acked}).

    The frames are kept as they came (no copy, whatever their size), small
    output frames joined; the oldest go as whole chunks, but for a chunk larger
    than the log's size, whose start only is cut off.  Older output that every
    channel has taken in is kept compressed (L{pack}); sizes and positions
    always count the bytes as they came.
    """

    key: Key
    peer: int
    start: int = 0
    end: int = 0
    #: The furthest position any channel has acknowledged.
    acked: int = 0
    ended: bool = False
    #: The channels that sent PTY_CLOSE for this terminal: a page closed it, so once
    #: it has ended and been delivered its log is not kept for a page that comes back.
    closers: set[int] = attrs.field(factory=set)
    #: Whether the process's output is left unread because this log is full.
    held: bool = False
    _chunks: list[_Chunk] = attrs.field(factory=list)
    _positions: list[int] = attrs.field(factory=list)
    #: The index of the first kept chunk (those before it are gone).
    _head: int = 0
    #: Bytes counted against the log's size: payloads plus an overhead per chunk.
    weight: int = 0
    #: The index of the first chunk L{pack} has not settled (compressed, or left
    #: as it came because it would not compress).
    _cold: int = 0
    #: Output before this position is kept as it came: it follows output that
    #: did not compress (L{POOR_SKIP}).
    _poor_until: int = 0
    #: The block L{piece} decompressed last, and its bytes: a replay reads a
    #: block in several frames.  Let go once it is read to its end.
    _unpacked: tuple[_Chunk, bytes] | None = None

    @property
    def stored(self) -> int:
        """The bytes its chunks take in memory (compressed ones as compressed)."""
        return sum(len(c.data) for c in self._chunks[self._head :])

    def append(self, kind: int, payload: bytes) -> None:
        """Keep a frame at the end: as it is, or joined to the last chunk if both are small."""
        if not payload:
            return
        if type(payload) is not bytes:
            payload = bytes(payload)  # a view would keep what it views alive, or change
        small = kind in _OUTPUT and len(payload) < JOIN_BELOW
        last = self._chunks[-1] if len(self._chunks) > self._head else None
        if (
            small
            and last is not None
            and last.joined
            and last.kind == kind
            and len(last.data) + len(payload) <= MAX_CHUNK
        ):
            last.data += payload
        else:
            data: bytes | bytearray = bytearray(payload) if small else payload
            self._chunks.append(_Chunk(kind, self.end, data, small))
            self._positions.append(self.end)
            self.weight += CHUNK_OVERHEAD
        self.end += len(payload)
        self.weight += len(payload)
        if kind in _ENDS:
            self.ended = True

    def piece(self, position: int, most: int) -> Envelope:
        """The frame to send from C{position}: the rest of its chunk (output: at most C{most})."""
        at = bisect.bisect_right(self._positions, position, lo=self._head) - 1
        chunk = self._chunks[at]
        offset = position - chunk.position
        kept = chunk.data
        if chunk.packed >= 0:
            if self._unpacked is None or self._unpacked[0] is not chunk:
                self._unpacked = (chunk, zlib.decompress(chunk.data, _RAW))
            kept = self._unpacked[1]
        if type(kept) is bytes and (
            chunk.kind not in _OUTPUT or (not offset and len(kept) <= most)
        ):
            data = kept  # the frame as it came, or a whole block decompressed: no copy
        else:
            # A copy of a part only, or of a joined chunk, which may grow again.
            with memoryview(kept) as view:
                data = bytes(view[offset : offset + max(1, most)])
        if chunk.packed >= 0 and offset + len(data) >= chunk.packed:
            self._unpacked = None
        return Envelope(chunk.kind, self.key[1], chunk.position + offset, self.peer, data)

    def drop_before(self, floor: int, budget: int) -> None:
        """
        Drop whole chunks from the start while over C{budget} and they end by
        C{floor}; of an output chunk larger than C{budget}, drop what is over it.
        """
        while self.weight > budget and self._head < len(self._chunks):
            chunk = self._chunks[self._head]
            over = self.weight - budget
            if (
                chunk.kind in _OUTPUT
                and 0 < budget < chunk.size
                and over < chunk.size + CHUNK_OVERHEAD
            ):
                # Larger than the log's size, and the rest is within it: keep its end.
                cut = min(over, floor - chunk.position)
                if cut > 0:
                    self._cut(chunk, cut)
                break
            if chunk.end > floor:
                break
            # Its bytes go now, not when the list is next compacted (below).
            self._chunks[self._head] = _GONE
            self._head += 1
            self.weight -= chunk.size + CHUNK_OVERHEAD
            self.start = chunk.end
        if self._unpacked is not None and self._unpacked[0].position < self.start:
            self._unpacked = None
        if self._head > 64 and self._head * 2 > len(self._chunks):
            del self._chunks[: self._head], self._positions[: self._head]
            self._cold = max(0, self._cold - self._head)
            self._head = 0

    def _cut(self, chunk: _Chunk, cut: int) -> None:
        """Drop the first C{cut} bytes of the oldest chunk (one copy of what stays)."""
        kept = chunk.data if chunk.packed < 0 else zlib.decompress(chunk.data, _RAW)
        with memoryview(kept) as view:
            rest = bytes(view[cut:])
        chunk.data = bytearray(rest) if chunk.joined else rest
        chunk.packed = -1
        chunk.position += cut
        self._positions[self._head] = chunk.position
        self.weight -= cut
        self.start = chunk.position

    def pack(self, boundary: int) -> bool:
        """
        Compress the output that ends by C{boundary}, in blocks of at least
        L{PACK_SIZE} bytes of one kind (or a shorter run between other kinds);
        keep a block that would not compress well as it came.  At most one block
        is compressed per call (about half a millisecond), so that what the
        bridge does next (another terminal's echo) never waits for more.

        @return: whether there is more to compress below C{boundary}.
        """
        chunks = self._chunks
        at = max(self._cold, self._head)
        while at < len(chunks) and boundary - chunks[at].position >= PACK_SIZE:
            first = chunks[at]
            if first.kind not in _OUTPUT or first.packed >= 0:
                at += 1
                continue
            end, size = at, 0
            while end < len(chunks) and size < PACK_SIZE:
                chunk = chunks[end]
                if chunk.kind != first.kind or chunk.end > boundary:
                    break
                size += len(chunk.data)
                end += 1
            if size < PACK_SIZE and (end == len(chunks) or chunks[end].kind == first.kind):
                break  # the rest of a block is still hot, or not acknowledged
            packed = None
            tried = first.position >= self._poor_until
            if tried:
                packed = _compress(chunks[at:end], size)
                if packed is None:
                    self._poor_until = chunks[end - 1].end + POOR_SKIP
            if packed is not None:
                chunks[at:end] = [_Chunk(first.kind, first.position, packed, packed=size)]
                del self._positions[at + 1 : end]
                self.weight -= (end - at - 1) * CHUNK_OVERHEAD
                end = at + 1
            at = end
            if tried:
                self._cold = at
                # One block per call: an ACK of a whole window waits for no more.
                return at < len(chunks) and boundary - chunks[at].position >= PACK_SIZE
        self._cold = at
        return False


def _compress(run: list[_Chunk], size: int) -> bytes | None:
    """C{run}'s bytes compressed, if they shrink to at most L{PACK_RATIO} of C{size}."""
    sample = bytes(run[0].data[:PACK_SAMPLE])
    if len(zlib.compress(sample, 1, _RAW)) > len(sample) * PACK_RATIO:
        return None
    packer = zlib.compressobj(1, zlib.DEFLATED, _RAW)
    parts = [packer.compress(chunk.data) for chunk in run]
    parts.append(packer.flush())
    packed = b"".join(parts)
    return packed if len(packed) <= size * PACK_RATIO else None


@attrs.define
class Follower:
    """
    One browser channel: the streams it follows, what was sent to it and what it
    acknowledged.  A channel without C{client} is a page older than section 5.7:
    it gets every frame as it comes, with no window.
    """

    channel: int
    client: str | None
    sent: dict[Key, int] = attrs.field(factory=dict)
    acked: dict[Key, int] = attrs.field(factory=dict)
    #: When it last took something in (or resumed), by the outbox's clock.
    heard: float = 0.0

    @property
    def owing(self) -> bool:
        """Whether something sent to it is not acknowledged yet."""
        return any(self.sent[k] > self.acked[k] for k in self.sent)


@attrs.frozen
class ReplaySettings:
    """What the bridge keeps and sends per stream (section 5.7); all in bytes but C{grace}."""

    #: Bytes each stream's log may keep (C{--replay-buffer}).
    capacity: int = attrs.field(default=8 * 1024 * 1024, validator=attrs.validators.ge(64 * 1024))
    #: Bytes of a stream in flight to one channel (C{--send-window}).
    window: int = attrs.field(default=512 * 1024, validator=attrs.validators.ge(4 * 1024))
    #: Seconds without any page before processes stop (C{--grace-period}); 0: never.
    grace: float = attrs.field(default=600.0, validator=attrs.validators.ge(0))


@attrs.define
class Outbox:
    """
    The replay logs and the channels that follow them (section 5.7).

    @ivar capacity: bytes each log may keep (C{--replay-buffer}).
    @ivar window: bytes of a stream in flight to one channel (C{--send-window}).
    @ivar grace: seconds an ended stream's log is kept; 0 keeps it (up to L{MAX_ENDED}).
    """

    clock: IReactorTime
    deliver: Callable[[int, Envelope], None]
    hold: Callable[[Key], None]
    release: Callable[[Key], None]
    capacity: int = 8 * 1024 * 1024
    window: int = 512 * 1024
    grace: float = 600.0
    logs: dict[Key, ReplayLog] = attrs.field(factory=dict)
    followers: dict[int, Follower] = attrs.field(factory=dict)
    #: Set when the bridge stops: nothing is held back any more, logs only keep their size.
    letting_go: bool = False
    #: Set while the connection to the relay has more queued than it should:
    #: nothing is sent from the logs until it has sent it (L{unblock}).
    blocked: bool = False
    _ended: OrderedDict[Key, IDelayedCall | None] = attrs.field(factory=OrderedDict)
    #: Logs with more to compress, each in a later turn of the reactor (L{ReplayLog.pack}).
    _packing: dict[Key, IDelayedCall] = attrs.field(factory=dict)

    # Streams.

    def open(self, key: Key, peer: int) -> None:
        """A process starts on C{key}: what an earlier one there left is forgotten."""
        self.forget(key)
        self.logs[key] = ReplayLog(key, peer)

    def forget(self, key: Key) -> None:
        """Forget the log of C{key}, and that any channel follows it."""
        self.logs.pop(key, None)
        for timer in (self._ended.pop(key, None), self._packing.pop(key, None)):
            if timer is not None and timer.active():
                timer.cancel()
        for follower in self.followers.values():
            follower.sent.pop(key, None)
            follower.acked.pop(key, None)

    def publish(self, envelope: Envelope) -> None:
        """A sequenced frame from a process: keep it, number it and send it where it may go."""
        key = key_of(envelope)
        assert key is not None, envelope.kind
        log = self.logs.get(key)
        if log is None or log.ended:
            self.forget(key)
            log = self.logs[key] = ReplayLog(key, envelope.peer)
        position = log.end
        log.append(envelope.kind, envelope.payload)
        for follower in list(self.followers.values()):
            if follower.client is None:
                # Sent as it comes, with no window: counted as delivered.
                self.deliver(follower.channel, attrs.evolve(envelope, seq=position))
                log.acked = log.end
            elif key in follower.sent:
                self._pump(follower, log)
        if self._let_closed_go(log):
            return
        if log.ended:
            self._keep_ended(key)
        self._trim(log)

    def closed(self, channel: int, key: Key) -> None:
        """C{channel} sent PTY_CLOSE for the terminal on C{key} (running or ended)."""
        log = self.logs.get(key)
        if log is not None and key[0] == PTY:
            log.closers.add(channel)
            self._let_closed_go(log)

    def _let_closed_go(self, log: ReplayLog) -> bool:
        """
        Forget a terminal's log at once if a page closed it, it has ended, every
        channel that follows it was sent it to its end, and every one of them
        but those that closed it has acknowledged that end; whether it did.
        """
        if not (log.closers and log.ended):
            return False
        key = log.key
        for follower in self.followers.values():
            sent = follower.sent.get(key)
            if follower.client is None or sent is None:
                continue  # an old page got everything as it came; or not following
            if sent < log.end:
                return False
            if follower.channel not in log.closers and follower.acked[key] < log.end:
                return False
        self.forget(key)
        return True

    def _keep_ended(self, key: Key) -> None:
        timer = None
        if self.grace > 0:
            timer = self.clock.callLater(self.grace, self.forget, key)
        self._ended[key] = timer
        while len(self._ended) > MAX_ENDED:
            self.forget(next(iter(self._ended)))

    # Channels.

    def follower(self, channel: int) -> Follower | None:
        return self.followers.get(channel)

    def legacy(self, channel: int) -> None:
        """C{channel} sent something before any RESUME: every frame goes to it, as it comes."""
        self.followers.setdefault(channel, Follower(channel, None))

    def resume(self, channel: int, client: str, streams: list[tuple[Key, int]]) -> list[Key]:
        """
        C{channel} follows exactly C{streams}, each from the position given;
        answers the streams there is no log of.  Call L{flush} once the RESUMED
        has gone, to send what it is owed.
        """
        before = self.followers.get(channel)
        follower = self.followers[channel] = Follower(channel, client, heard=self.clock.seconds())
        unknown = []
        for key, position in streams:
            log = self.logs.get(key)
            if log is None:
                unknown.append(key)
                continue
            position = min(position, log.end)
            follower.sent[key] = follower.acked[key] = position
            log.acked = max(log.acked, position)
        # A RESUME acknowledges what the page has: that may leave the logs, and a
        # process held for it must read again (no ACK for it will follow).
        self._retrim([*before.sent, *follower.sent] if before is not None else follower.sent)
        return unknown

    def subscribe(self, channel: int, key: Key) -> None:
        """C{channel} started the process on C{key}: it follows it from the start."""
        follower = self.followers.get(channel)
        if follower is None or follower.client is None:
            return
        follower.sent[key] = follower.acked[key] = 0
        log = self.logs.get(key)
        if log is not None:
            self._pump(follower, log)

    def flush(self, channel: int) -> None:
        """Send C{channel} what it is owed on every stream it follows."""
        follower = self.followers.get(channel)
        if follower is None:
            return
        for key in list(follower.sent):
            log = self.logs.get(key)
            if log is not None:
                self._pump(follower, log)
                self._let_closed_go(log)

    def ack(self, channel: int, positions: list[tuple[Key, int]]) -> None:
        """C{channel} has taken in each stream up to its position."""
        follower = self.followers.get(channel)
        if follower is None or follower.client is None:
            return
        for key, position in positions:
            log = self.logs.get(key)
            if log is None or key not in follower.sent:
                continue
            position = min(position, follower.sent[key])
            if position <= follower.acked[key]:
                continue
            follower.acked[key] = position
            follower.heard = self.clock.seconds()
            log.acked = max(log.acked, position)
            self._trim(log)
            self._pump(follower, log)
            self._let_closed_go(log)

    def drop(self, channel: int) -> None:
        """C{channel} is gone."""
        follower = self.followers.pop(channel, None)
        if follower is not None:
            self._retrim(follower.sent)

    def drop_all(self) -> None:
        """Every channel is gone (the connection to the relay is)."""
        gone = list(self.followers.values())
        self.followers.clear()
        for follower in gone:
            self._retrim(follower.sent)

    def silent(self, age: float) -> list[int]:
        """
        The channels owed an acknowledgement that have not taken anything in for
        C{age} seconds while a log they follow is held: tabs that are gone
        without a word (the relay does not tell the bridge) or hung.
        """
        now = self.clock.seconds()
        held = {key for key, log in self.logs.items() if log.held}
        return [
            f.channel
            for f in self.followers.values()
            if f.client is not None
            and f.owing
            and now - f.heard >= age
            and any(key in held for key in f.sent)
        ]

    def of_client(self, client: str) -> list[int]:
        """The channels that resumed as C{client}."""
        return [f.channel for f in self.followers.values() if f.client == client]

    def close(self) -> None:
        """The bridge has stopped: forget every log (and the timers that would)."""
        for key in list(self.logs):
            self.forget(key)
        for timer in [*self._ended.values(), *self._packing.values()]:
            if timer is not None and timer.active():
                timer.cancel()
        self._ended.clear()
        self._packing.clear()

    def let_go(self) -> None:
        """The bridge is stopping: hold nothing back, keep at most each log's size."""
        self.letting_go = True
        for log in list(self.logs.values()):
            self._trim(log)

    # Within.

    def _retrim(self, keys: Iterable[Key]) -> None:
        for key in list(keys):
            log = self.logs.get(key)
            if log is not None and not self._let_closed_go(log):
                self._trim(log)

    def unblock(self) -> None:
        """The connection has sent what it had queued: send what each channel is owed."""
        self.blocked = False
        for channel in list(self.followers):
            if not self.blocked:
                self.flush(channel)

    def _pump(self, follower: Follower, log: ReplayLog) -> None:
        if self.blocked:
            return
        key = log.key
        sent, acked = follower.sent[key], follower.acked[key]
        if sent < log.start:
            gap = {"type": key[0], "stream": key[1], "from": sent, "to": log.start}
            gap["bytes"] = log.start - sent
            self.deliver(
                follower.channel,
                control(Kind.GAP, gap, stream=key[1], peer=log.peer, seq=log.start),
            )
            sent = log.start
            acked = max(acked, log.start)
        while sent < log.end and sent - acked < self.window and not self.blocked:
            frame = log.piece(sent, min(MAX_CHUNK, self.window - (sent - acked)))
            self.deliver(follower.channel, frame)
            sent = frame.seq + len(frame.payload)
        follower.sent[key], follower.acked[key] = sent, acked

    def _trim(self, log: ReplayLog) -> None:
        """
        Drop what may go (a terminal's while its log is over its size); hold the
        process while the log still is.
        """
        floor = self._floor(log)
        # A terminal's log is its scrollback, kept up to its size for a page that
        # re-attaches; what a command printed is not wanted again once taken in.
        log.drop_before(floor, self.capacity if log.key[0] == PTY else 0)
        self._pack(log, floor)
        full = log.weight > self.capacity and not log.ended and not self.letting_go
        if full and not log.held:
            log.held = True
            self.hold(log.key)
        elif not full and log.held:
            log.held = False
            self.release(log.key)

    def _floor(self, log: ReplayLog) -> int:
        """Where the output every channel following C{log} has taken in ends."""
        following = [
            f.acked[log.key] for f in self.followers.values() if log.key in f.sent and f.client
        ]
        if following:
            return min(following)
        if log.key[0] == PTY or self.letting_go:
            return log.end
        return log.acked

    def _pack(self, log: ReplayLog, floor: int) -> None:
        """Compress a block of C{log}'s older output; any more in later turns."""
        if log.key in self._packing:
            return
        if log.pack(min(floor, log.end - HOT)):
            self._packing[log.key] = self.clock.callLater(0, self._pack_later, log.key)

    def _pack_later(self, key: Key) -> None:
        del self._packing[key]
        log = self.logs.get(key)
        if log is not None:
            self._pack(log, self._floor(log))


@attrs.define
class InputLedger:
    """Per page load and stream, the number of the next input frame (section 5.7)."""

    _clients: OrderedDict[str, dict[Key, int]] = attrs.field(factory=OrderedDict)

    def accept(self, client: str, key: Key, seq: int) -> bool:
        """Whether to act on input frame C{seq}: not if it was acted on already."""
        streams = self._clients.get(client)
        if streams is None:
            streams = self._clients[client] = {}
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        if seq < streams.get(key, 0):
            return False
        streams.pop(key, None)
        streams[key] = seq + 1
        while len(streams) > MAX_STREAMS_PER_CLIENT:
            del streams[next(iter(streams))]
        return True

    def next(self, client: str, key: Key) -> int | None:
        """The next number expected from C{client} on C{key}; None if none was seen."""
        return self._clients.get(client, {}).get(key)
