"""
Flow control of one WebSocket connection: reading it can be stopped and
started (a relay connection held by the hub; a node link and the connection
it carries, holding each other).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


class Reader(Protocol):
    """A connection whose reading can be stopped and started."""

    def pause_reading(self) -> None:
        """Stop reading the socket, and handling what was read of it already."""

    def resume_reading(self) -> None:
        """Read it again."""


@attrs.define
class ReadGate:
    """
    Stops and starts the reading of one Autobahn connection: a held connection
    is not read (its transport stops reading the socket), and the frames
    already read wait in Autobahn's buffer (its C{processData} asks L{closed})
    until it is released.
    """

    protocol: Any  # an Autobahn WebSocket protocol
    clock: IReactorTime
    #: Between L{pause} and L{resume}: frames already read wait.
    closed: bool = False
    #: Handles the frames held while the connection was not read, once released.
    _read_held: IDelayedCall | None = None

    def pause(self) -> None:
        self.closed = True
        transport = self.protocol.transport  # TLS, which tells TCP
        if transport is not None:
            transport.pauseProducing()

    def resume(self) -> None:
        """
        Read the socket again, and the frames held in Autobahn's buffer in a
        moment: not from inside the hub, which is releasing holds.
        """
        self.closed = False
        if not self._readable():
            return
        self.protocol.transport.resumeProducing()
        if self._read_held is None:
            self._read_held = self.clock.callLater(0, self._handle_held)

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

    def resume_reading(self) -> None:
        self._gate.resume()

    def processData(self) -> bool:
        # Autobahn handles the frames it has buffered one per call, until this says no.
        if self._gate.closed:
            return False
        return bool(super().processData())  # type: ignore[misc]
