"""
Tests for L{coder1_bridge.writes}: writes that reach the kernel within the call when
nothing is queued before them, and output read until empty into one frame.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge import processes
from coder1_bridge.writes import MAX_READ, MIN_READ_MORE, read_more, send_at_once, write_now
from coder1_wire.envelope import Kind
from coder1_wire.tls import client_tls_options


class _SocketWriter(FileDescriptor):
    """A Twisted file descriptor over one end of a socket pair, on a memory reactor."""

    def __init__(self, sock: socket.socket, reactor: MemoryReactor) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.connected = 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def writeSomeData(self, data: bytes) -> int:
        return self.sock.send(data)


class WriteNowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.reactor = MemoryReactor()
        self.writer = _SocketWriter(self.ours, self.reactor)

    def test_written_within_the_call(self) -> None:
        """
        With nothing queued, the bytes are in the socket when write_now returns: no
        reactor turn (the memory reactor never runs) and no writer registered.
        """
        write_now(self.writer, b"echo")
        self.assertEqual(self.theirs.recv(100), b"echo")
        self.assertNotIn(self.writer, self.reactor.writers)

    def test_queued_behind_what_waits(self) -> None:
        """
        Bytes already queued by the transport's own write go first: write_now then
        queues too, so the order holds once the reactor writes.
        """
        self.writer.write(b"first ")
        write_now(self.writer, b"second")
        self.assertRaises(BlockingIOError, self.theirs.recv, 100)
        self.assertIn(self.writer, self.reactor.writers)
        self.writer.doWrite()
        self.assertEqual(self.theirs.recv(100), b"first second")

    def test_rest_queued_when_the_socket_is_full(self) -> None:
        """What the kernel does not take is queued, in order, and arrives whole."""
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
        write_now(self.writer, data)
        self.assertIn(self.writer, self.reactor.writers)
        received = bytearray()
        while len(received) < len(data):
            try:
                received += self.theirs.recv(1 << 16)
            except BlockingIOError:
                self.writer.doWrite()
        self.assertEqual(bytes(received), data)

    def test_not_a_file_descriptor(self) -> None:
        """A transport whose queue cannot be seen gets its own write, nothing else."""
        written: list[bytes] = []

        class Other:
            def write(self, data: bytes) -> None:
                written.append(data)

        write_now(Other(), b"x")
        self.assertEqual(written, [b"x"])


class SendAtOnceTests(SynchronousTestCase):
    def test_no_call_later_for_tls_writes(self) -> None:
        """
        After send_at_once, a write on Twisted's buffering TLS transport schedules
        no C{callLater(0)} to gather it with others: it goes to TLS within the call.
        """
        clock = Clock()
        pem = _self_signed()
        factory = TLSMemoryBIOFactory(
            client_tls_options("localhost", pem), True, Factory.forProtocol(Protocol), clock
        )
        tls: Any = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        before = tls.write
        tls.write(b"gathered")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        tls2: Any = factory.buildProtocol(None)
        tls2.makeConnection(StringTransport())
        send_at_once(tls2)
        self.assertIsNot(tls2.write, before)
        tls2.write(b"at once")
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # only the first transport's


def _self_signed() -> bytes:
    from coder1_relay import certs

    path = _tmpdir()
    certs.load_or_create(path, tls_cert=None, tls_key=None, hostnames=("localhost",))
    return path.child(certs.DEV_CERT_NAME).getContent()


def _tmpdir() -> Any:
    import tempfile

    from twisted.python.filepath import FilePath

    return FilePath(tempfile.mkdtemp())


class ReadMoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.addCleanup(os.close, self.r)
        self.addCleanup(lambda: _close(self.w))

    def test_burst_read_whole_and_in_order(self) -> None:
        """What waits after the first read comes with it, in order, in one piece."""
        os.write(self.w, b"bc" * 1000)
        first = b"a" * MIN_READ_MORE
        self.assertEqual(read_more(self.r, first), first + b"bc" * 1000)

    def test_lone_read_as_it_is(self) -> None:
        """With nothing more waiting, the first read is returned as it is, at once."""
        self.assertEqual(read_more(self.r, b"x" * 600), b"x" * 600)

    def test_short_read_not_read_again(self) -> None:
        """A read shorter than MIN_READ_MORE (an echo) is taken for all there was."""
        os.write(self.w, b"later")
        self.assertEqual(read_more(self.r, b"e"), b"e")
        self.assertEqual(os.read(self.r, 10), b"later")

    def test_at_most_the_limit(self) -> None:
        """At most the limit in all (MAX_READ unless given); the rest stays for later."""
        os.write(self.w, b"y" * 110)
        first = b"x" * MIN_READ_MORE
        limit = MIN_READ_MORE + 100
        self.assertEqual(read_more(self.r, first, limit=limit), first + b"y" * 100)
        self.assertEqual(os.read(self.r, 100), b"y" * 10)
        self.assertEqual(MAX_READ, 64 * 1024)

    def test_end_of_file_left_for_twisted(self) -> None:
        """An end of file stops the reading; the descriptor still reports it after."""
        os.write(self.w, b"last")
        os.close(self.w)
        self.w = -1
        self.assertEqual(read_more(self.r, b"x" * MIN_READ_MORE), b"x" * MIN_READ_MORE + b"last")
        self.assertEqual(os.read(self.r, 10), b"")


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class _Manager:
    """Records what a child protocol hands on."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []

    def _output(self, child: object, kind: int, data: bytes) -> None:
        self.frames.append((kind, data))


class _Pipe:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class _Transport:
    def __init__(self, pipes: dict[int, _Pipe]) -> None:
        self.pipes = pipes


class _Protocol(processes.ChildProtocol[Any]):
    output_kind = Kind.CMD_STDOUT


class CoalescingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.addCleanup(os.close, self.r)
        self.addCleanup(os.close, self.w)
        self.manager = _Manager()
        self.protocol = _Protocol(self.manager)  # type: ignore[arg-type]
        self.protocol.child = object()
        self.protocol.transport = _Transport({1: _Pipe(self.r)})  # type: ignore[assignment]

    def test_burst_in_fewer_frames(self) -> None:
        """
        A burst the process wrote in many pieces, which Twisted would hand on 8 KiB at
        a time, goes on as one frame, complete and in order.
        """
        pieces = [bytes([65 + i % 26]) * 1000 for i in range(40)]
        for piece in pieces:
            os.write(self.w, piece)
        first = os.read(self.r, 8192)
        self.protocol.childDataReceived(1, first)
        self.assertEqual(self.manager.frames, [(Kind.CMD_STDOUT, b"".join(pieces))])

    def test_lone_read_goes_on_at_once(self) -> None:
        """A lone read (a keystroke's echo) is handed on within the call, as it is."""
        self.protocol.childDataReceived(1, b"e")
        self.assertEqual(self.manager.frames, [(Kind.CMD_STDOUT, b"e")])

    def test_blocking_descriptor_not_read(self) -> None:
        """A descriptor that would block is never read past Twisted's own read."""
        os.set_blocking(self.r, True)
        os.write(self.w, b"more")
        self.protocol.childDataReceived(1, b"e")
        self.assertEqual(self.manager.frames, [(Kind.CMD_STDOUT, b"e")])
        self.assertEqual(os.read(self.r, 10), b"more")
