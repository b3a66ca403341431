"""
A write to a Twisted file descriptor (a socket, a pipe, a terminal) that goes to
the kernel at once when nothing is queued before it, instead of on the reactor's
next turn (an C{epoll_ctl}, another C{epoll_wait}, another C{epoll_ctl}).  What
the kernel does not take is queued with the transport's own C{write}, so order,
flow control (its producer) and error handling stay Twisted's.  Used by the
bridge (C{coder1_bridge.writes}) and the relay's TLS layer (C{coder1_relay.tls_server}).
"""

from __future__ import annotations

from typing import Any


def queued(transport: Any) -> bool | None:
    """
    Whether a Twisted file descriptor has bytes queued; None if C{transport} is not
    one whose queue can be seen (then nothing is written past it).
    """
    try:
        pending = transport._tempDataBuffer
        remaining = len(transport.dataBuffer) - transport.offset
    except AttributeError:
        return None
    return bool(pending) or remaining > 0


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport} (a Twisted file descriptor: TCP, a pipe, a
    terminal) at once if nothing is queued before it; queue the rest (or all of it,
    if the transport is not one whose queue can be seen) with its own C{write}.
    """
    if (
        data
        and queued(transport) is False
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
    ):
        written = transport.writeSomeData(data)
        if isinstance(written, int) and written > 0:
            data = data[written:]
        # An exception (the connection is lost) is Twisted's to handle: queue it all.
    if data:
        type(transport).write(transport, data)
