"""
The relay's TLS server layer: Python's C{ssl} module (an C{ssl.SSLObject} on
two C{ssl.MemoryBIO}s) under each connection of its listeners, in place of
Twisted's L{twisted.protocols.tls.TLSMemoryBIOProtocol} (pyOpenSSL).

Why (issue 14, docs/performance.md): an idle TLS 1.3 server connection holds
about 17 KiB of memory this way against 33 KiB through pyOpenSSL, and a
session has two; the context can send no session tickets (C{num_tickets});
and a record costs one C call instead of several through cffi.

What it keeps of Twisted's layer: the wrapped protocol's transport is this
wrapper (C{getPeer}, C{getHost}, producers and pausing pass through to TCP,
and it provides whatever the TCP transport provides); C{handshakeCompleted}
for an L{IHandshakeListener}; C{loseConnection} sends close_notify after
what was written, C{abortConnection} does not.  A TLS error (garbage, a
client without TLS 1.3) sends OpenSSL's alert and closes the connection; the
wrapped protocol's C{connectionLost} gets the error, nothing is logged.

Writes made while a connection's received data is handled (any connection
of these listeners: a frame forwarded from one party to the other), or while
a producer registered on one is resumed (its TCP transport drained: the
relay then handles what it held, C{coder1_relay.routing}), are held until
it has been, then encrypted together: one record and one transport write
for what one read or one resume brought, with no reactor turn added.  Writes
made elsewhere (timers) go out at once.  Records go to the socket within the
call when nothing is queued before them (C{coder1_wire.direct_write}), not on
the reactor's next turn.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_wire.direct_write import write_now

#: The most plaintext one record holds (TLS 1.3): C{SSLObject.read} returns at most one.
RECORD = 16384
#: Bytes moved through a memory BIO at a time: it keeps the largest amount it
#: ever held allocated, so slices bound what a connection keeps after a bulk
#: transfer (measured: 71 KiB after 1 MiB out and 64 KiB in, 1,120 KiB unsliced).
SLICE = RECORD
#: Held writes to one connection past this are encrypted without waiting
#: for the batch's end: a full record gains nothing by waiting, and its TCP
#: transport sees them (and can pause its producer) at once.
HOLD_AT_MOST = RECORD


class WriteBatch:
    """
    Holds writes made while received data is handled (L{open} to L{close},
    nested), and sends them, per connection and in order, at the end.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.waiting: list[TLSServerProtocol] = []

    def open(self) -> None:
        self.depth += 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Writes made inside go out together at its end, as between L{open} and L{close}."""
        self.open()
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        if self.depth > 1:
            self.depth -= 1
            return
        # Still open while sending: what is written meanwhile (by a producer
        # that a TCP transport paused, say) queues behind, in order.
        try:
            while self.waiting:
                waiting, self.waiting = self.waiting, []
                for each in waiting:
                    each.send_held()
        finally:
            self.depth = 0


#: The batch every listener's connections share: a frame read on one is
#: forwarded to another, and both are the relay's.
SHARED_BATCH = WriteBatch()


@implementer(IPushProducer)
class _ResumedInBatch:
    """A streaming producer whose C{resumeProducing} runs inside a write batch."""

    def __init__(self, producer: IPushProducer, batch: WriteBatch) -> None:
        self.producer = producer
        self.batch = batch

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.batch.open()
        try:
            self.producer.resumeProducing()
        finally:
            self.batch.close()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


class TLSServerProtocol(ProtocolWrapper):
    """TLS (server side) between a TCP transport and the protocol it wraps."""

    factory: TLSServerFactory
    #: TCP's (or a UNIX socket's) transport.
    transport: Any
    _tls: ssl.SSLObject | None = None
    _incoming: ssl.MemoryBIO
    _outgoing: ssl.MemoryBIO
    _handshake_done = False
    #: No more TLS: closed, aborted or failed; nothing more is read or written.
    _finished = False
    _aborted = False
    #: The peer sent close_notify.
    _peer_closed = False
    #: Plaintext written but not yet encrypted (before the handshake ends, or
    #: while a batch is open); None when there is none.
    _held: list[bytes] | None = None
    _held_size = 0
    #: Why TLS failed, for the wrapped protocol's C{connectionLost}.
    _reason: Failure | None = None

    def makeConnection(self, transport: Any) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = self.factory.tls_context().wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        super().makeConnection(transport)

    # Received: TCP -> TLS -> the wrapped protocol.

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        batch = self.factory.batch
        batch.open()
        try:
            self._received(data)
        finally:
            batch.close()

    def _received(self, data: bytes) -> None:
        plain: list[bytes] = []
        view = memoryview(data) if len(data) > SLICE else None
        for start in range(0, len(data), SLICE):
            self._incoming.write(data if view is None else view[start : start + SLICE])
            if not self._handshake_done and not self._handshake():
                if self._finished:
                    return
                continue
            if not self._read(plain):
                break
        if plain and not self._aborted:
            self.wrappedProtocol.dataReceived(plain[0] if len(plain) == 1 else b"".join(plain))
        if self._reason is not None:
            self._fail()
        elif self._peer_closed:
            # Answer the peer's close_notify with ours, then close.
            self.disconnecting = True
            self._shutdown()

    def _handshake(self) -> bool:
        """Go on with the handshake; whether it is done."""
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return False
        except ssl.SSLError:
            self._reason = Failure()
            self._fail()
            return False
        self._handshake_done = True
        self._send_records()
        self.send_held()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        return not self._finished

    def _read(self, plain: list[bytes]) -> bool:
        """Decrypt what has arrived into C{plain}; whether TLS goes on."""
        tls = self._tls
        assert tls is not None
        while True:
            try:
                chunk = tls.read(RECORD)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify, after ours
                chunk = b""
            except ssl.SSLError:
                self._reason = Failure()
                return False
            if not chunk:  # the peer's close_notify
                self._peer_closed = True
                return False
            plain.append(chunk)
        if self._outgoing.pending:  # a post-handshake message's answer
            self._send_records()
        return True

    # Written: the wrapped protocol -> TLS -> TCP.

    def write(self, data: bytes) -> None:
        if self.disconnecting or self._finished or not data:
            return
        if self._handshake_done and not self.factory.batch.depth:
            self._encrypt(data)
            return
        if self._held is None:
            self._held = [data]
            self._held_size = len(data)
            if self._handshake_done:
                self.factory.batch.waiting.append(self)
        else:
            self._held.append(data)
            self._held_size += len(data)
        if self._held_size >= HOLD_AT_MOST and self._handshake_done:
            self.send_held()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Register C{producer} on TCP; a streaming one is resumed inside the
        write batch, so what it writes then goes out as what a read brings.
        """
        if streaming:
            producer = _ResumedInBatch(producer, self.factory.batch)
        super().registerProducer(producer, streaming)

    def send_held(self) -> None:
        """Encrypt and send what was held, if the handshake is done."""
        held = self._held
        if held is None or not self._handshake_done:
            return
        self._held = None
        if not self._finished:
            self._encrypt(held[0] if len(held) == 1 else b"".join(held))

    def _encrypt(self, data: bytes) -> None:
        tls = self._tls
        assert tls is not None
        try:
            if len(data) <= SLICE:
                tls.write(data)
                self._send_records()
                return
            view = memoryview(data)
            records = []
            for start in range(0, len(data), SLICE):
                tls.write(view[start : start + SLICE])
                records.append(self._outgoing.read())
            self.transport.writeSequence(records)
        except ssl.SSLError:
            self._reason = Failure()
            self._fail()

    def _send_records(self) -> None:
        records = self._outgoing.read()
        if records:
            # To the socket at once when nothing waits before them: no turn of
            # the reactor (and its two epoll_ctl calls) per write.
            write_now(self.transport, records)

    # Closing.

    def loseConnection(self) -> None:
        """Send what was written, then close_notify, then close TCP."""
        if self.disconnecting:
            return
        self.disconnecting = True
        if not self._handshake_done:
            self.abortConnection()
            return
        self.send_held()
        self._shutdown()

    def abortConnection(self) -> None:
        """Close at once: nothing more is sent or handed to the wrapped protocol."""
        self._aborted = self._finished = True
        self.disconnecting = True
        self._held = None
        self.transport.abortConnection()

    def _shutdown(self) -> None:
        """Send close_notify (unless TLS already ended) and close TCP once it is out."""
        if not self._finished:
            self._finished = True
            assert self._tls is not None
            # SSLWantReadError: the peer's close_notify, which is not awaited.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._send_records()
        self.transport.loseConnection()

    def _fail(self) -> None:
        """A TLS error: send OpenSSL's alert and close."""
        self._finished = self.disconnecting = True
        self._held = None
        self._send_records()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finished = True
        self._held = None
        self._tls = None
        reason, self._reason = self._reason or reason, None
        super().connectionLost(reason)


class TLSServerFactory(WrappingFactory[TLSServerProtocol]):
    """
    Wraps C{wrapped}'s protocols in L{TLSServerProtocol}; each new connection
    gets the context C{tls_context()} returns then (L{coder1_relay.reload}: a
    reloaded certificate is for new connections only).
    """

    protocol: type[TLSServerProtocol] = TLSServerProtocol
    noisy = False

    def __init__(
        self,
        tls_context: Callable[[], ssl.SSLContext],
        wrapped: IProtocolFactory,
        batch: WriteBatch = SHARED_BATCH,
    ) -> None:
        super().__init__(wrapped)
        self.tls_context = tls_context
        self.batch = batch
