"""
The WebSocket frames the relay and the bridge read and write themselves,
beside Autobahn: a whole binary message in one frame (RFC 6455, section 5.2),
which is what every party sends and the relay forwards.  A server's frames
are unmasked (L{binary_message}); a client's are masked (L{masked_binary_message}).
"""

from __future__ import annotations

import math
import struct
from typing import Any

from autobahn.websocket.xormasker import create_xor_masker

#: A frame's first byte when it is a whole binary message: FIN, no RSV bits, opcode 2.
WHOLE_BINARY = 0x82
#: The bit of the second byte that says the payload is masked (a client's frames).
MASKED = 0x80
#: Largest payload Python's integers unmask faster than Autobahn's C masker,
#: which costs about 3 us to set up (measured: 0.6 us against 3.7 at 100 B,
#: 2.2 against 2.8 at 1,000 B, 38 against 4 at 16 KiB).
_BY_INTEGERS = 1024
#: The largest frame whose rest is waited for in the buffer (L{WholeMessages}).
#: Autobahn adds each read to what waits there, copying it, so a larger one
#: goes to Autobahn's parser, which takes it in pieces: no read copies more
#: than this, however small the reads a sender cuts a message into.
WAIT_AT_MOST = 128 * 1024
#: The headers of a whole binary message of 0 to 125 bytes, made once.
_SHORT = [bytes((WHOLE_BINARY, size)) for size in range(126)]
_SHORT_MASKED = [bytes((WHOLE_BINARY, MASKED | size)) for size in range(126)]
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def unmask(payload: bytes, mask: bytes) -> bytes:
    """
    C{payload} XORed with the 4-byte C{mask}, repeated (RFC 6455, section 5.3):
    unmasked if it was masked, masked if it was not.
    """
    size = len(payload)
    if size > _BY_INTEGERS:
        masker = create_xor_masker(mask, size)
        result: bytes = masker.process(payload)
        return result
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


def binary_message(payload: bytes) -> bytes:
    """An unmasked frame (a server's) holding C{payload} as one whole binary message."""
    size = len(payload)
    if size < 126:
        return _SHORT[size] + payload
    if size < 0x10000:
        return _MEDIUM.pack(WHOLE_BINARY, 126, size) + payload
    return _LONG.pack(WHOLE_BINARY, 127, size) + payload


def masked_binary_message(payload: bytes, mask: bytes) -> bytes:
    """
    A frame masked with the 4-byte C{mask} (a client's, which must be fresh
    and random for each frame) holding C{payload} as one whole binary message.
    """
    size = len(payload)
    if size < 126:
        head = _SHORT_MASKED[size]
    elif size < 0x10000:
        head = _MEDIUM.pack(WHOLE_BINARY, MASKED | 126, size)
    else:
        head = _LONG.pack(WHOLE_BINARY, MASKED | 127, size)
    return b"".join((head, mask, unmask(payload, mask)))


def binary_frame_bounds(data: bytes, at: int, masked: bool) -> tuple[int, int] | None:
    """
    Where the payload of the frame at C{data[at:]} lies, C{(start, end)}, if that
    frame is a whole binary message, masked as C{masked} says (a client's) or
    not (a server's), with its length in the shortest encoding and its header
    read; None for any other frame, left to Autobahn.  Its payload is all read
    when C{end <= len(data)}.  A masked frame's mask is the 4 bytes before C{start}.
    """
    size = len(data)
    if size - at < 2 or data[at] != WHOLE_BINARY:
        return None
    length = data[at + 1]
    if masked:
        if not length & MASKED:
            return None
        length ^= MASKED
    elif length & MASKED:
        return None
    start = at + 2
    if length == 126:
        length = int.from_bytes(data[start : start + 2], "big")
        start += 2
        if length < 126 or start > size:
            return None
    elif length == 127:
        length = int.from_bytes(data[start : start + 8], "big")
        start += 8
        if length < 0x10000 or length >= 1 << 63 or start > size:
            return None
    if masked:
        start += 4
    return start, start + length


class WholeMessages:
    """
    Mixed in before Autobahn's protocol class: its frame parser, after the
    class's own C{_whole_messages(data)} for what nearly every frame is, a
    whole binary message in one frame, within the limits.  Such a frame not
    all read yet, up to L{WAIT_AT_MOST}, waits in Autobahn's buffer for the
    rest (a 64 KiB message spans two socket reads), rather than going to
    Autobahn in pieces.
    Autobahn parses the rest as always: control frames, text, fragments, a
    frame past a limit, and every protocol error.  Not while anything listens
    for Autobahn's C{message} event, which that path does not fire (nor does
    it count Autobahn's per-message traffic statistics, which nothing here
    reads).  Each frame is found by L{binary_frame_bounds}.
    """

    #: Whether the frames this side reads are masked (a server reads a client's).
    _masked_in: bool

    #: Whether the class's C{send} writes a message's frame itself, and the
    #: largest it does: past it, Autobahn fragments it or refuses it (L{_choose_paths}).
    _frames_out = False
    _out_limit: float = 0.0
    #: Whether C{processData} reads whole messages itself, and the largest it
    #: does: past it, Autobahn refuses it (L{_choose_paths}).
    _frames_in = False
    _in_limit: float = 0.0
    # Autobahn's, on the class this is mixed into.
    data: bytes
    current_frame: Any
    inside_message: bool
    state: int
    STATE_OPEN: int
    _listeners: Any
    _perMessageCompress: Any
    trackedTimings: Any
    maxMessagePayloadSize: int
    maxFramePayloadSize: int
    autoFragmentSize: int
    autoPingInterval: float
    logFrames: bool
    logOctets: bool

    def _may_write_frames(self) -> bool:
        """Whether this side's options let it write its frames itself (masking)."""
        raise NotImplementedError

    def _may_read_frames(self) -> bool:
        """Whether this side's options let it read frames itself (unmasking)."""
        raise NotImplementedError

    def _choose_paths(self) -> None:
        """
        Open: whether frames are read and written here.  Not with compression
        (never offered or accepted, but an option could), Autobahn's frame or
        octet logging or its timings, nor what the side's own options rule
        out; reading not with automatic pings; and only up to the message size
        limit and the fragment size (writing) or the message and frame size
        limits (reading), past which Autobahn refuses or fragments.
        """
        plain = (
            self._perMessageCompress is None
            and not self.logFrames
            and not self.logOctets
            and self.trackedTimings is None
        )
        self._frames_out = plain and self._may_write_frames()
        self._frames_in = plain and not self.autoPingInterval and self._may_read_frames()
        limits = [n for n in (self.maxMessagePayloadSize, self.autoFragmentSize) if n > 0]
        self._out_limit = min(limits, default=math.inf)
        limits = [n for n in (self.maxMessagePayloadSize, self.maxFramePayloadSize) if n > 0]
        self._in_limit = min(limits, default=math.inf)

    def _whole_messages(self, data: bytes) -> int:
        """Handle the whole messages at the front of C{data}; how many bytes it took."""
        raise NotImplementedError

    def processData(self) -> bool:
        if (
            self._frames_in
            and self.current_frame is None
            and not self.inside_message
            and self.state == self.STATE_OPEN
            and self._listeners is None
        ):
            data = self.data
            done = self._whole_messages(data)
            if done:
                self.data = data[done:]
                # Called again (by consumeData) for what is left, unless held or closed.
                return len(data) > done
            frame = binary_frame_bounds(data, 0, self._masked_in)
            if (
                frame is not None
                and len(data) < frame[1] <= WAIT_AT_MOST
                and frame[1] - frame[0] <= self._in_limit
            ):
                return False  # the rest of a whole message: read here once it is all in
        return bool(super().processData())  # type: ignore[misc]
