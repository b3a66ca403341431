"""
The relay's TLS server layer (C{coder1_relay.tls_server}): in memory against
a client C{ssl.SSLObject} for its logic, and over loopback TCP against real
clients.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import tempfile
import threading
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer, providedBy

from coder1_relay.certs import load_or_create, server_ssl_context
from coder1_relay.context import RelayContext
from coder1_relay.reload import ServerTLS
from coder1_relay.tls_server import RECORD, TLSServerFactory, TLSServerProtocol, WriteBatch
from coder1_relay.web import JSONEndpoint
from coder1_wire.direct_write import queued

#: A TLS record's header: type, legacy version, length.
_HEADER = struct.Struct("!BHH")
_APPLICATION_DATA = 23


def _records(wire: bytes) -> list[tuple[int, int]]:
    """The (type, length) of each TLS record in C{wire}."""
    found, at = [], 0
    while at < len(wire):
        kind, _, length = _HEADER.unpack_from(wire, at)
        found.append((kind, length))
        at += _HEADER.size + length
    return found


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    """Keeps what it hears; C{on_data} (if set) runs on each delivery."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.handshakes = 0
        self.lost: list[Failure] = []
        self.on_data: Any = None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.on_data is not None:
            self.on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class _CountingTransport(StringTransport):
    """A StringTransport that counts the writes it is given."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.writes += 1
        super().writeSequence(data)


def _keys() -> Any:
    keys, _ = load_or_create(
        FilePath(tempfile.mkdtemp()),
        tls_cert=None,
        tls_key=None,
        hostnames=["localhost"],
    )
    return keys


_KEYS = _keys()
_CONTEXT = server_ssl_context(_KEYS)


def _client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=_KEYS.tls_cert_pem.decode())
    if maximum is not None:
        context.maximum_version = maximum
    return context


class _Connection:
    """A L{TLSServerProtocol} on a StringTransport, and a client SSLObject to talk to it."""

    def __init__(
        self, maximum: ssl.TLSVersion | None = None, wrapped: IProtocolFactory | None = None
    ) -> None:
        self.app = _Recorder()
        self.factory = TLSServerFactory(
            lambda: _CONTEXT, wrapped or Factory.forProtocol(lambda: self.app)
        )
        if wrapped is None:
            self.factory.batch = WriteBatch()
        self.server: TLSServerProtocol = self.factory.buildProtocol(None)
        self.transport = _CountingTransport()
        self.server.makeConnection(self.transport)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = _client_context(maximum).wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )

    def to_server(self) -> None:
        """Hand what the client sent to the server, as TCP would."""
        data = self.outgoing.read()
        if data:
            self.server.dataReceived(data)

    def to_client(self) -> bytes:
        """Hand what the server sent to the client; return it."""
        data = self.transport.value()
        self.transport.clear()
        self.incoming.write(data)
        return data

    def handshake(self) -> None:
        for _ in range(4):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.to_server()
                self.to_client()
        self.to_server()

    def read(self) -> bytes:
        """Everything the client can decrypt now."""
        out = b""
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                return out
            if not chunk:
                return out
            out += chunk


class MemoryTests(SynchronousTestCase):
    """The layer's logic, against a client in memory."""

    def test_handshake_and_data(self) -> None:
        """
        A TLS 1.3 handshake completes, the wrapped protocol hears
        C{handshakeCompleted} once, and data flows both ways.
        """
        c = _Connection()
        c.handshake()
        self.assertEqual(c.client.version(), "TLSv1.3")
        self.assertEqual(c.app.handshakes, 1)
        c.client.write(b"hello")
        c.to_server()
        self.assertEqual(c.app.received, [b"hello"])
        c.server.write(b"world")
        c.to_client()
        self.assertEqual(c.read(), b"world")

    def test_writes_while_receiving_share_one_record(self) -> None:
        """
        What the wrapped protocol writes while handling received data goes
        out as one record, in one transport write, in order.
        """
        c = _Connection()
        c.handshake()
        c.to_client()
        before = c.transport.writes

        def answer(data: bytes) -> None:
            c.server.write(b"one ")
            c.server.writeSequence([b"two ", b"three"])

        c.app.on_data = answer
        c.client.write(b"go")
        c.to_server()
        self.assertEqual(c.transport.writes - before, 1)
        self.assertEqual(_records(c.to_client()), [(_APPLICATION_DATA, 13 + 17)])
        self.assertEqual(c.read(), b"one two three")

    def test_api_answer_after_a_wait_is_one_record(self) -> None:
        """
        An API endpoint's answer written after its handler waited (on the
        store, say: no read under way) goes out as one record, in one
        transport write, though Twisted Web writes its headers and body apart.
        """
        waiting: Deferred[None] = Deferred()

        async def post(request: Request) -> tuple[int, dict[str, Any]]:
            await waiting
            return 201, {"code": "123456"}

        root = Resource()
        root.putChild(b"api", JSONEndpoint(cast(RelayContext, None), post=post))
        c = _Connection(wrapped=Site(root, timeout=None, reactor=Clock()))
        c.handshake()
        c.to_client()
        c.client.write(b"POST /api HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n")
        c.to_server()
        self.assertEqual(c.transport.value(), b"")
        before = c.transport.writes
        waiting.callback(None)
        self.assertEqual(c.transport.writes - before, 1)
        self.assertEqual([kind for kind, _ in _records(c.to_client())], [_APPLICATION_DATA])
        head, _, body = c.read().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 201 "), head)
        self.assertEqual(json.loads(body), {"code": "123456"})

    def test_batch_spans_connections(self) -> None:
        """
        A write to another connection of the same batch, made while this one's
        data is handled, waits for the end of it too, then goes as one record.
        """
        a, b = _Connection(), _Connection()
        b.factory.batch = a.factory.batch
        a.handshake()
        b.handshake()
        b.to_client()

        def forward(data: bytes) -> None:
            b.server.write(b"x")
            b.server.write(b"y")

        a.app.on_data = forward
        a.client.write(b"forward")
        before = b.transport.writes
        a.to_server()
        self.assertEqual(b.transport.writes - before, 1)
        self.assertEqual(len(_records(b.to_client())), 1)
        self.assertEqual(b.read(), b"xy")

    def test_writes_while_resumed_share_one_record(self) -> None:
        """
        What a streaming producer registered on the connection writes when
        TCP resumes it (the relay handling what it held) goes out as one
        record, in one transport write; pausing and stopping reach it as they are.
        """
        c = _Connection()
        c.handshake()
        c.to_client()
        calls: list[str] = []

        @implementer(IPushProducer)
        class Forwarder:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")
                c.server.write(b"one ")
                c.server.write(b"two")

            def stopProducing(self) -> None:
                calls.append("stop")

        c.server.registerProducer(Forwarder(), True)
        tcp = c.transport.producer
        assert tcp is not None
        tcp.pauseProducing()
        before = c.transport.writes
        tcp.resumeProducing()  # as TCP does once its buffer has drained
        self.assertEqual(c.transport.writes - before, 1)
        self.assertEqual(len(_records(c.to_client())), 1)
        self.assertEqual(c.read(), b"one two")
        tcp.stopProducing()
        self.assertEqual(calls, ["pause", "resume", "stop"])
        c.server.write(b"after")  # outside: at once
        self.assertEqual(c.transport.writes - before, 2)

    def test_writes_outside_a_batch_go_at_once(self) -> None:
        """A write made outside received data's handling (a timer's) is sent at once."""
        c = _Connection()
        c.handshake()
        c.to_client()
        c.server.write(b"ping")
        self.assertNotEqual(c.transport.value(), b"")
        c.to_client()
        self.assertEqual(c.read(), b"ping")

    def test_large_write(self) -> None:
        """
        A 1 MiB write arrives whole, in full records, in one transport call.
        """
        c = _Connection()
        c.handshake()
        c.to_client()
        data = bytes(range(256)) * 4096
        before = c.transport.writes
        c.server.write(data)
        self.assertEqual(c.transport.writes - before, 1)
        wire = c.to_client()
        self.assertEqual(len(_records(wire)), len(data) // RECORD)
        self.assertEqual(c.read(), data)

    def test_large_held_write_is_not_held(self) -> None:
        """
        While handling received data, once a record's worth is held for a
        connection it is sent at once: its TCP transport sees it (and can pause
        its producer) without waiting for the batch's end.
        """
        c = _Connection()
        c.handshake()
        c.to_client()

        def write(data: bytes) -> None:
            c.server.write(b"a" * RECORD)
            self.assertNotEqual(c.transport.value(), b"")

        c.app.on_data = write
        c.client.write(b"go")
        c.to_server()
        c.to_client()
        self.assertEqual(c.read(), b"a" * RECORD)

    def test_written_before_the_handshake(self) -> None:
        """What the wrapped protocol writes before the handshake is sent once it is done."""
        c = _Connection()
        c.server.write(b"early")
        self.assertEqual(c.transport.value(), b"")
        c.handshake()
        c.to_client()
        self.assertEqual(c.read(), b"early")

    def test_lose_connection_sends_close_notify(self) -> None:
        """
        C{loseConnection} sends what was written, then close_notify, then
        closes TCP; the client sees a clean end.
        """
        c = _Connection()
        c.handshake()
        c.to_client()

        def finish(data: bytes) -> None:
            c.server.write(b"bye")
            c.server.loseConnection()

        c.app.on_data = finish
        c.client.write(b"done")
        c.to_server()
        self.assertTrue(c.transport.disconnecting)
        c.to_client()
        self.assertEqual(c.read(), b"bye")
        self.assertEqual(c.client.read(10), b"")  # b"": close_notify arrived
        c.server.write(b"late")
        self.assertEqual(c.transport.value(), b"")

    def test_peer_close_notify_is_answered(self) -> None:
        """The client's close_notify is answered with the server's, and TCP closed."""
        c = _Connection()
        c.handshake()
        c.to_client()
        with self.assertRaises(ssl.SSLWantReadError):
            c.client.unwrap()
        c.to_server()
        self.assertTrue(c.transport.disconnecting)
        c.to_client()
        c.client.unwrap()  # would raise without the server's close_notify

    def test_abort_connection(self) -> None:
        """C{abortConnection} sends nothing more, and nothing more is delivered."""
        c = _Connection()
        c.handshake()
        c.to_client()
        c.server.abortConnection()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.transport.value(), b"")
        c.client.write(b"after")
        c.to_server()
        self.assertEqual(c.app.received, [])

    def test_lose_connection_during_handshake_aborts(self) -> None:
        """A connection closed before its handshake ends is aborted: no TLS to close."""
        c = _Connection()
        c.server.loseConnection()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.transport.value(), b"")

    def test_garbage(self) -> None:
        """
        Bytes that are not TLS end the connection with an alert; the wrapped
        protocol hears why when TCP is gone, and nothing is logged.
        """
        c = _Connection()
        c.server.dataReceived(b"\x16\x03\x01\x00\x05hello, not TLS at all")
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(_records(c.transport.value())[0][0], 21)  # an alert
        c.server.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(c.app.lost), 1)
        self.assertTrue(c.app.lost[0].check(ssl.SSLError))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_tls12_client_refused(self) -> None:
        """A client capped at TLS 1.2 gets a protocol_version alert and the connection closes."""
        c = _Connection(maximum=ssl.TLSVersion.TLSv1_2)
        with self.assertRaises(ssl.SSLWantReadError):
            c.client.do_handshake()
        c.to_server()
        self.assertTrue(c.transport.disconnecting)
        c.to_client()
        with self.assertRaises(ssl.SSLError) as caught:
            c.client.do_handshake()
        self.assertIn("PROTOCOL_VERSION", str(caught.exception).upper())

    def test_half_handshake_then_gone(self) -> None:
        """Half a ClientHello, then TCP gone: the wrapped protocol hears it once, no error."""
        c = _Connection()
        with self.assertRaises(ssl.SSLWantReadError):
            c.client.do_handshake()
        c.server.dataReceived(c.outgoing.read()[:40])
        c.server.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(c.app.lost), 1)
        self.assertEqual(c.app.handshakes, 0)

    def test_pause_while_records_are_pending(self) -> None:
        """
        The wrapped protocol pausing its transport while handling data stops
        TCP's reading; what had already arrived (three records) is delivered
        all the same, at once; resuming reads again.
        """
        c = _Connection()
        c.handshake()
        c.to_client()
        for each in (b"1", b"2", b"3"):
            c.client.write(each)
        c.app.on_data = lambda data: c.server.pauseProducing()
        c.to_server()
        self.assertEqual(c.app.received, [b"123"])
        self.assertEqual(c.transport.producerState, "paused")
        c.server.resumeProducing()
        self.assertEqual(c.transport.producerState, "producing")

    def test_producer_and_addresses_pass_through(self) -> None:
        """
        The layer provides what its transport does (twisted.web pauses it as
        an L{IPushProducer}); a producer registered on it is registered on
        TCP, which pauses and resumes it (a streaming one inside the write
        batch); C{getPeer}/C{getHost} are TCP's.
        """
        c = _Connection()
        for interface in providedBy(c.transport):
            self.assertTrue(interface.providedBy(c.server), interface)
        self.assertTrue(IPushProducer.providedBy(c.server))
        producer = _Producer()
        c.server.registerProducer(producer, False)
        self.assertIs(c.transport.producer, producer)
        c.server.unregisterProducer()
        c.server.registerProducer(producer, True)
        tcp = c.transport.producer
        assert tcp is not None
        self.assertTrue(c.transport.streaming)
        tcp.pauseProducing()
        tcp.resumeProducing()
        self.assertEqual((producer.pauses, producer.resumes), (1, 1))
        c.server.unregisterProducer()
        self.assertIsNone(c.transport.producer)
        self.assertEqual(c.server.getPeer(), c.transport.getPeer())
        self.assertEqual(c.server.getHost(), c.transport.getHost())

    def test_new_connections_get_the_current_context(self) -> None:
        """
        A connection gets the context current when it arrives (a reloaded
        certificate), and keeps it.
        """
        tls = ServerTLS(_CONTEXT)
        factory = TLSServerFactory(tls, Factory.forProtocol(Protocol))
        first = factory.buildProtocol(None)
        first.makeConnection(StringTransport())
        tls.current = other = server_ssl_context(_keys())
        second = factory.buildProtocol(None)
        second.makeConnection(StringTransport())
        assert first._tls is not None and second._tls is not None
        self.assertIs(first._tls.context, _CONTEXT)
        self.assertIs(second._tls.context, other)


@implementer(IPushProducer)
class _Producer:
    """Counts pauses and resumes; C{paused} fires at the first pause."""

    def __init__(self) -> None:
        self.pauses = self.resumes = 0
        self.paused: Deferred[None] = Deferred()
        self.resumed: Deferred[None] = Deferred()

    def pauseProducing(self) -> None:
        self.pauses += 1
        if not self.paused.called:
            self.paused.callback(None)

    def resumeProducing(self) -> None:
        self.resumes += 1
        if not self.resumed.called:
            self.resumed.callback(None)

    def stopProducing(self) -> None:
        pass


class _Server(Protocol):
    """
    On C{b"send N"}: writes N bytes, with a push producer registered, and
    closes once TCP has resumed it; on C{b"later X"}: writes X from a timer;
    on anything else: echoes it.
    """

    def __init__(self, owner: SocketTests) -> None:
        self.owner = owner
        self.producer = _Producer()
        self.queued_after_write: bool | None = None

    def connectionMade(self) -> None:
        self.owner.servers.append(self)
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if data.startswith(b"later "):
            reactor.callLater(0, self._write_later, data[len(b"later ") :])
        elif data.startswith(b"send "):
            transport.registerProducer(self.producer, True)
            self.producer.resumed.addCallback(lambda _: self._close())
            size = int(data.split()[1])
            for start in range(0, size, 65536):
                transport.write(b"z" * min(65536, size - start))
        else:
            transport.write(data)

    def _write_later(self, data: bytes) -> None:
        """Write from a timer (no read under way); note whether TCP queued it."""
        transport: Any = self.transport
        transport.write(data)
        self.queued_after_write = queued(transport.transport)

    def _close(self) -> None:
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class SocketTests(TestCase):
    """The layer over loopback TCP, against Python's own TLS client."""

    async def _listen(self) -> int:
        self.servers: list[_Server] = []
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            TLSServerFactory(lambda: _CONTEXT, Factory.forProtocol(lambda: _Server(self)))
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(self._closed)
        number: int = port.getHost().port
        return number

    async def _closed(self) -> None:
        for each in self.servers:
            await each.done

    async def test_large_write_then_close_notify(self) -> None:
        """
        4 MiB written while the client does not read: the producer is paused
        (TCP's buffer fills), resumed once the client reads, every byte
        arrives, and the end is close_notify (a truncation would raise).
        """
        port = await self._listen()
        size = 4 * 1024 * 1024
        reading = threading.Event()

        def client() -> int:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                _client_context().wrap_socket(
                    raw, server_hostname="localhost", suppress_ragged_eofs=False
                ) as tls,
            ):
                tls.sendall(b"send %d" % size)
                reading.wait(30)
                got = 0
                while chunk := tls.recv(65536):
                    got += len(chunk)
                return got

        received = deferToThread(client)
        while not self.servers:
            await _turn()
        producer = self.servers[0].producer
        await producer.paused
        reading.set()
        await producer.resumed
        self.assertEqual(await received, size)

    async def test_small_write_goes_to_the_socket_at_once(self) -> None:
        """
        A record written with nothing queued before it is in the socket when the
        write returns (TCP queues nothing for the reactor's next turn), and arrives.
        """
        port = await self._listen()

        def client() -> bytes:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                _client_context().wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"later pong")
                return tls.recv(10)

        self.assertEqual(await deferToThread(client), b"pong")
        self.assertIs(self.servers[0].queued_after_write, False)

    async def test_tls13_only(self) -> None:
        """A TLS 1.3 client is served; one capped at TLS 1.2 is refused with an alert."""
        port = await self._listen()

        def client(maximum: ssl.TLSVersion | None) -> str:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                _client_context(maximum).wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"echo")
                tls.recv(10)
                return str(tls.version())

        self.assertEqual(await deferToThread(client, None), "TLSv1.3")
        with self.assertRaises(ssl.SSLError) as caught:
            await deferToThread(client, ssl.TLSVersion.TLSv1_2)
        self.assertIn("PROTOCOL_VERSION", str(caught.exception).upper())

    async def test_garbage_closed(self) -> None:
        """Garbage instead of a ClientHello: the relay sends an alert and closes the socket."""
        port = await self._listen()

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"\x16\x03\x01\x00\x04junk and more junk\r\n\r\n")
                raw.settimeout(10)
                answer = b""
                while chunk := raw.recv(4096):
                    answer += chunk
                return answer

        answer = await deferToThread(client)
        self.assertEqual(answer[:1], b"\x15")  # an alert, then the end
        self.assertEqual(self.flushLoggedErrors(), [])


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
