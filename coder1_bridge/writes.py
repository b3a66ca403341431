"""
Output and input without waiting for the reactor's next turn.

Twisted queues every write to a socket, pipe or terminal and performs it on the
reactor's next turn (an C{epoll_ctl}, another C{epoll_wait}, another C{epoll_ctl}),
and its TLS layer adds a C{callLater(0)} to gather small writes.  For a keystroke
and its echo that is two turns in the bridge, each way.  Here, a write goes to the
kernel at once when nothing is queued before it; what the kernel does not take is
queued as before, so order, flow control (the transports' producers) and error
handling stay Twisted's.

Reading: L{read_more} takes what else is waiting on a descriptor after Twisted's
read, so that output that is flowing goes out in one frame per turn, up to
L{MAX_READ}, while a short read (a keystroke's echo) goes out as it is, with no
further system call.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

from coder1_wire.direct_write import queued, write_now

__all__ = ["MAX_READ", "MIN_READ_MORE", "read_more", "send_at_once", "write_now"]

#: The most bytes of a process's output taken in one turn and sent as one frame.
MAX_READ = 64 * 1024
#: A read shorter than this is taken for all there was (a keystroke's echo, a
#: prompt): reading again would find nothing and cost a system call.
MIN_READ_MORE = 512


def send_at_once(transport: Any) -> None:
    """
    Make what is written to C{transport} (a TLS connection over TCP, as the bridge's
    to the relay) reach the socket within the call: one TLS record per write, with no
    C{callLater(0)} to gather small ones, and the socket written to at once when
    nothing is queued.  A transport of another shape is left as it is.
    """
    if isinstance(transport, BufferingTLSTransport):
        # Twisted's own way of choosing the write (BufferingTLSTransport.__init__).
        transport.write = functools.partial(TLSMemoryBIOProtocol.write, transport)  # type: ignore[method-assign]
    below = getattr(transport, "transport", None)
    if below is not None and queued(below) is not None:
        below.write = functools.partial(write_now, below)


def read_more(fd: int | None, first: bytes, limit: int = MAX_READ) -> bytes:
    """
    C{first} (just read from C{fd}) and what else is waiting on C{fd} now, up to
    C{limit} bytes in all; C{first} alone if it is shorter than L{MIN_READ_MORE}.
    Stops at the first read that would block; an end of file or an error is left
    for Twisted's next read of C{fd} to find.
    """
    if fd is None or not MIN_READ_MORE <= len(first) < limit:
        return first
    chunks = [first]
    size = len(first)
    while size < limit:
        try:
            more = os.read(fd, limit - size)
        except OSError:  # EAGAIN: nothing more now; EIO: the terminal is closed
            break
        if not more:
            break
        chunks.append(more)
        size += len(more)
    return first if len(chunks) == 1 else b"".join(chunks)
