"""
The envelope: the only part of a frame the relay reads.

Every WebSocket message (binary) is a 20-byte header followed by a payload::

    version  u8   WIRE_VERSION
    kind     u8   see Kind
    flags    u16  reserved, 0
    peer     u32  which bridge of the browser session (the bridge's own number)
    stream   u32  command or terminal id, chosen by the browser
    seq      u64  per (stream, direction) sequence number, from 0

Kinds below 0x10 are *control* frames between a party and the relay: their
payload is small JSON the relay reads and writes.  Kinds 0x10-0x7F are
*end-to-end* frames between the browser and the bridge: the relay forwards
their payload untouched and never parses, logs or keeps it.  Their direction
is bit 3 of the kind, so the relay needs no table of kinds and does not change
when new end-to-end kinds are added.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

import attrs

WIRE_VERSION = 1
HEADER = struct.Struct("!BBHIIQ")
HEADER_SIZE = HEADER.size

#: Bit 3 of an end-to-end kind: set for frames travelling bridge -> browser.
TO_BROWSER_BIT = 0x08
FIRST_END_TO_END = 0x10
LAST_END_TO_END = 0x7F


class Kind(enum.IntEnum):
    """Every kind this version knows.  The relay only needs the ranges."""

    # control: party <-> relay, JSON payload
    WELCOME = 0x02
    PRESENCE = 0x03
    ERROR = 0x04
    PING = 0x05
    PONG = 0x06
    CRASH = 0x07
    PAIRED = 0x08
    #: relay -> bridge: the IDE connection that offered these channels is gone
    GONE = 0x09

    # end to end, browser -> bridge
    CMD_START = 0x10
    CMD_STDIN = 0x11
    CMD_CANCEL = 0x12
    # end to end, bridge -> browser
    CMD_STDOUT = 0x18
    CMD_STDERR = 0x19
    CMD_EXIT = 0x1A
    CMD_ERROR = 0x1B

    # end to end, browser -> bridge
    PTY_OPEN = 0x20
    PTY_INPUT = 0x21
    PTY_RESIZE = 0x22
    PTY_CLOSE = 0x23
    PTY_LIST = 0x24
    # end to end, bridge -> browser
    PTY_OUTPUT = 0x28
    PTY_EXIT = 0x29
    PTY_OPENED = 0x2A
    PTY_ERROR = 0x2B
    PTY_LISTING = 0x2C

    # end to end, key agreement (docs/e2e.md); browser -> bridge, then bridge -> browser
    KEY_OFFER = 0x30
    KEY_ANSWER = 0x38
    KEY_ERROR = 0x39

    # end to end, resume and acknowledgements (docs/protocol.md, section 5.7)
    RESUME = 0x40
    ACK = 0x41
    RESUMED = 0x48
    INPUT_ACK = 0x49
    GAP = 0x4A

    # end to end, bridge -> browser: "I do not know that kind" (an older bridge)
    UNSUPPORTED = 0x7F


class EnvelopeError(ValueError):
    """A frame whose header is not one this version accepts."""


def is_end_to_end(kind: int) -> bool:
    """Whether frames of this kind go between browser and bridge, opaque to the relay."""
    return FIRST_END_TO_END <= kind <= LAST_END_TO_END


def is_to_browser(kind: int) -> bool:
    """Whether an end-to-end kind travels from the bridge to the browser."""
    return bool(kind & TO_BROWSER_BIT)


@attrs.frozen
class Envelope:
    """One frame: the routing header and its payload."""

    kind: int
    stream: int = 0
    seq: int = 0
    peer: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        """The frame as sent on the WebSocket."""
        return HEADER.pack(WIRE_VERSION, self.kind, 0, self.peer, self.stream, self.seq) + (
            self.payload
        )

    def json(self) -> Any:
        """The payload decoded as JSON (for control and structured frames)."""
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            # RecursionError: nested deeper than the parser goes ("[[[[...").
            raise EnvelopeError("payload is not JSON") from e


def decode(frame: bytes) -> Envelope:
    """
    Read a frame's header.  The payload is sliced off, never looked at.

    @raise EnvelopeError: for a short frame, another version, a reserved flag or
        a kind outside both ranges.
    """
    if len(frame) < HEADER_SIZE:
        raise EnvelopeError("frame shorter than the header")
    version, kind, flags, peer, stream, seq = HEADER.unpack_from(frame)
    if version != WIRE_VERSION:
        raise EnvelopeError("unsupported wire version")
    if flags != 0:
        raise EnvelopeError("reserved flags set")
    if not (is_end_to_end(kind) or kind in _CONTROL_KINDS):
        raise EnvelopeError("unknown kind")
    return Envelope(kind, stream, seq, peer, frame[HEADER_SIZE:])


_CONTROL_KINDS = frozenset(k.value for k in Kind if not is_end_to_end(k.value))


def control(
    kind: Kind, body: dict[str, Any], *, stream: int = 0, peer: int = 0, seq: int = 0
) -> Envelope:
    """A control or structured frame with a compact JSON payload."""
    return Envelope(
        kind=kind,
        stream=stream,
        peer=peer,
        seq=seq,
        payload=json.dumps(body, separators=(",", ":")).encode(),
    )
