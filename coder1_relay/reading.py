"""
Flow control of one WebSocket connection: reading it can be stopped and
started (a relay connection held by the hub; a node link and the connection
it carries, holding each other).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import attrs
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


class Reader(Protocol):
    """A connection whose reading can be stopped and started."""

    def pause_reading(self) -> None:
        """Stop reading the socket, and handling what was read of it already."""

    def resume_reading(self, later: bool = True) -> None:
        """Read it again (see L{ReadGate.resume})."""

    def handle_held(self) -> None:
        """Handle what was read while it was held (see L{ReadGate.handle_held})."""


def _weakly(protocol: Any) -> Any:
    """A proxy that does not keep C{protocol} alive."""
    return weakref.proxy(protocol)


# The converter runs at creation only (no on_setattr hook): the gate's flags
# change at every hold and release, and attrs' hook costs each set 0.35 us.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class ReadGate:
    """
    Stops and starts the reading of one Autobahn connection: a held connection
    is not read, and the frames already read wait in Autobahn's buffer (its
    C{processData} is shadowed by one that says no) until it is released.

    The socket is stopped lazily: a hold only closes the gate, and the
    transport stops reading once more data arrives while it is closed
    (L{arrived}).  A hold that ends before the next read (a send buffer
    that one write drained, as with every 64 KiB message) then costs no
    C{epoll_ctl} either way; one that lasts has let in one read more.
    """

    #: An Autobahn WebSocket protocol, which owns the gate: held weakly (a
    #: proxy), so that a closed connection is freed without the garbage collector.
    protocol: Any = attrs.field(converter=_weakly)
    clock: IReactorTime
    #: Between L{pause} and L{resume}: frames already read wait.
    closed: bool = False
    #: Whether the transport was told to stop reading (L{arrived}).
    _stopped: bool = False
    #: Handles the frames held while the connection was not read, once released.
    _read_held: IDelayedCall | None = None

    def pause(self) -> None:
        self.closed = True
        # Autobahn handles its buffered frames one per processData call, until
        # one says no: this one, on the instance while closed, so that an open
        # connection's frames pay no call layer for the check.
        self.protocol.processData = _no_more

    def arrived(self) -> None:
        """Data arrived while closed: stop reading the socket until L{resume}."""
        if not self._stopped:
            self._stopped = True
            transport = self.protocol.transport  # TLS, which tells TCP
            if transport is not None:
                transport.pauseProducing()

    def resume(self, later: bool = True) -> None:
        """
        Read the socket again.  The frames held in Autobahn's buffer are
        handled in a moment (not from inside the hub, which is releasing
        holds), or, with C{later} false, when the caller calls L{handle_held}.
        """
        self.closed = False
        self.protocol.__dict__.pop("processData", None)
        if not self._readable():
            return
        if self._stopped:
            self._stopped = False
            self.protocol.transport.resumeProducing()
        if later and self._read_held is None and self.protocol.data:
            self._read_held = self.clock.callLater(0, self._handle_held)

    def handle_held(self) -> None:
        """Handle the frames read while closed, now (if it is open)."""
        held = not self.closed and self._read_held is None and self.protocol.data
        if held and self._readable():
            self.protocol.consumeData()

    def _readable(self) -> bool:
        state = self.protocol.state
        return state in (WebSocketProtocol.STATE_OPEN, WebSocketProtocol.STATE_CLOSING)

    def _handle_held(self) -> None:
        self._read_held = None
        if self._readable():
            self.protocol.consumeData()

    def stop(self) -> None:
        """The connection is gone: nothing more to handle."""
        if self._read_held is not None and self._read_held.active():
            self._read_held.cancel()
        self._read_held = None


@implementer(IPushProducer)
@attrs.frozen
class Backpressure:
    """
    Registered on one connection's transport, it holds another: while more
    than the send buffer waits to go out on the first, the second is not read
    (a node link and the connection it carries, both ways).
    """

    other: Reader

    def pauseProducing(self) -> None:
        self.other.pause_reading()

    def resumeProducing(self) -> None:
        self.other.resume_reading()

    def stopProducing(self) -> None:
        self.other.resume_reading()


class GatedReading:
    """
    What an Autobahn protocol that a L{ReadGate} reads for (C{_gate}, made in
    its C{connectionMade}) adds: reading paused and resumed by the gate, and
    no frame handled while it is closed.  Mixed in before the protocol class.
    """

    _gate: ReadGate

    def pause_reading(self) -> None:
        self._gate.pause()

    def resume_reading(self, later: bool = True) -> None:
        self._gate.resume(later)

    def handle_held(self) -> None:
        self._gate.handle_held()

    # Autobahn's Twisted adapter formats the arguments of a debug line (the
    # method's qualified name, the peer) for every read and every write,
    # logged or not: about a tenth of an idle relay's CPU (heartbeats).  These
    # go to the same code without that line.
    _dataReceived: Any
    send_queue: Any
    transport: Any

    def dataReceived(self, data: bytes) -> None:
        if self._gate.closed:
            self._gate.arrived()
        self._dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            self.transport.write(data)


def _no_more() -> bool:
    """A closed gate's C{processData}: handle no more frames now."""
    return False
