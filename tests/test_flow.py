"""
Flow control: a reader that stops reading pauses the producer all the way back.

The unit tests drive the pause counting with fakes: the hub with fake
connections, the relay's protocols on string transports (which record the
producer registered on them and whether they were told to stop reading), the
bridge's session with fake processes.  Real processes check that paused
output is kept, not lost; a loopback test that a paused bridge still stops.
The end-to-end test runs the relay and the bridge each in a process of its
own and measures them while a browser tab stops reading a 200 MB output.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import attrs
import autobahn.twisted.websocket as autobahn_twisted_websocket
import autobahn.websocket.protocol as autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from coder1_bridge.commands import CommandRunner
from coder1_bridge.connection import SendBuffer
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.terminals import TerminalManager, TerminalSettings
from coder1_relay.context import Limits, RelayContext
from coder1_relay.routing import RATE, Endpoint, Hub, HubSettings
from coder1_relay.store import MemoryStore
from coder1_relay.tap import Options
from coder1_relay.telemetry import Telemetry
from coder1_relay.websocket import BridgeProtocol, IDEProtocol, RelayWebSocketFactory
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, control, decode
from coder1_wire.tls import client_tls_options
from tests.bridge_sessions import quiet_session

from .loopback import (
    Browser,
    ChildRelay,
    IDEClientFactory,
    IDEConnection,
    bytes_written,
    descendants,
    memory,
    pair_bridge,
    process_name,
    reactor,
    start_child_bridge,
    start_child_relay,
)
from .processes import RealProcessTestCase, alive
from .test_bridge_frames import BridgeProtocolCase
from .test_end_to_end import LoopbackTestCase
from .test_hostile import ws_frame
from .test_routing import make_hub

_log = Logger()


# --- the hub: pause counting, with fake connections -------------------------------------------


@attrs.define(eq=False)
class FakeConnection:
    """A link and a reader: records frames, closes, and whether it is being read."""

    sent: list[bytes] = attrs.field(factory=list)
    closed: tuple[int, str] | None = None
    reading: bool = True
    pauses: int = 0
    #: The C{later} of each resume_reading.
    resumed_later: list[bool] = attrs.field(factory=list)
    #: How many times handle_held was called.
    handled: int = 0
    #: Called by handle_held, as handling the held frames would.
    on_handle: Callable[[], object] | None = None

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.closed = (0, "aborted")

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self, later: bool = True) -> None:
        assert not self.reading, "resumed twice"
        self.reading = True
        self.resumed_later.append(later)

    def handle_held(self) -> None:
        assert self.reading, "handled while held"
        self.handled += 1
        if self.on_handle is not None:
            self.on_handle()


class HubFlowTests(SynchronousTestCase):
    """The hub holds what feeds a congested connection, counting holds by reason."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = make_hub(self, self.clock)

    def tab(self, session: str = "alice") -> tuple[Endpoint, FakeConnection]:
        connection = FakeConnection()
        return self.hub.attach_ide(session, connection, "t", reader=connection), connection

    def bridge(self, peer: int = 1, session: str = "alice") -> tuple[Endpoint, FakeConnection]:
        connection = FakeConnection()
        endpoint = self.hub.attach_bridge(
            session,
            peer,
            connection,
            "b",
            version="1",
            label="laptop",
            telemetry=False,
            expires_at=86400.0,
            bridge_key="K" * 87,
            reader=connection,
        )
        return endpoint, connection

    def test_congested_tab_holds_bridges_and_itself(self) -> None:
        """
        A tab whose send buffer passes the mark (its transport pauses its
        producer, the endpoint) holds every bridge of its session and itself,
        until it drains (resumes).
        """
        tab, tab_conn = self.tab()
        _, first = self.bridge(1)
        _, second = self.bridge(2)
        tab.pauseProducing()
        self.assertEqual([c.reading for c in (tab_conn, first, second)], [False] * 3)
        tab.resumeProducing()
        self.assertEqual([c.reading for c in (tab_conn, first, second)], [True] * 3)

    def test_congested_bridge_holds_tabs_and_itself(self) -> None:
        """The other way: a bridge that does not read holds every tab of its session."""
        _, tab1 = self.tab()
        _, tab2 = self.tab()
        bridge, bridge_conn = self.bridge()
        bridge.pauseProducing()
        self.assertEqual([c.reading for c in (tab1, tab2, bridge_conn)], [False] * 3)
        bridge.resumeProducing()
        self.assertEqual([c.reading for c in (tab1, tab2, bridge_conn)], [True] * 3)

    def test_drained_handles_held_frames_once_every_hold_is_released(self) -> None:
        """
        A tab that drains releases its bridge and itself with their held frames
        handled at once, after the last release (no reactor turn later); a
        detached tab releases them with the frames handled later.
        """
        tab, tab_conn = self.tab()
        _, bridge = self.bridge()
        handled_while_holding: list[bool] = []
        bridge.on_handle = lambda: handled_while_holding.append(
            tab.congested or not tab_conn.reading
        )
        tab.pauseProducing()
        tab.resumeProducing()
        self.assertEqual((tab_conn.resumed_later, bridge.resumed_later), ([False], [False]))
        self.assertEqual((tab_conn.handled, bridge.handled), (1, 1))
        self.assertEqual(handled_while_holding, [False])
        tab.pauseProducing()
        self.hub.detach(tab)
        self.assertEqual(bridge.resumed_later, [False, True])
        self.assertEqual(bridge.handled, 1)

    def test_held_again_by_a_handled_frame_waits(self) -> None:
        """
        When the frames one released connection had read congest the tab again,
        the others it releases are not handled until it drains once more.
        """
        tab, tab_conn = self.tab()
        _, first = self.bridge(1)
        _, second = self.bridge(2)
        tab.pauseProducing()
        first.on_handle = tab.pauseProducing
        tab.resumeProducing()
        self.assertEqual(second.handled, 0)
        self.assertEqual([c.reading for c in (tab_conn, first, second)], [False] * 3)

    def test_bridge_held_while_any_tab_is_congested(self) -> None:
        """With two tabs, the bridge is read again only once both have drained."""
        tab1, conn1 = self.tab()
        tab2, conn2 = self.tab()
        _, bridge = self.bridge()
        tab1.pauseProducing()
        tab2.pauseProducing()
        tab1.resumeProducing()
        self.assertFalse(bridge.reading)
        self.assertEqual((conn1.reading, conn2.reading), (True, False))
        tab2.resumeProducing()
        self.assertTrue(bridge.reading)
        self.assertEqual(bridge.pauses, 1)

    def test_repeated_pauses_count_once(self) -> None:
        """A pause repeated without a resume between is one hold; one resume ends it."""
        tab, _ = self.tab()
        bridge, bridge_conn = self.bridge()
        tab.pauseProducing()
        tab.pauseProducing()
        self.assertEqual(bridge.holds, {tab})
        tab.resumeProducing()
        tab.resumeProducing()
        self.assertTrue(bridge_conn.reading)

    def test_rate_and_congestion_held_apart(self) -> None:
        """
        The bridge's rate hold and a tab's congestion are separate reasons:
        whichever ends first, the bridge stays held until the other ends too.
        """
        tab, _ = self.tab()
        bridge, conn = self.bridge()
        for first, second in [("rate", "tab"), ("tab", "rate")]:
            bridge.hold(RATE)
            tab.pauseProducing()
            ends = {"rate": lambda: bridge.release(RATE), "tab": tab.resumeProducing}
            ends[first]()
            self.assertFalse(conn.reading, first)
            ends[second]()
            self.assertTrue(conn.reading, second)

    def test_other_sessions_untouched(self) -> None:
        """A congested tab holds its own session's bridges only."""
        tab, _ = self.tab("alice")
        _, mine = self.bridge(1, "alice")
        _, theirs = self.bridge(1, "bob")
        _, their_tab = self.tab("bob")
        tab.pauseProducing()
        self.assertFalse(mine.reading)
        self.assertTrue(theirs.reading)
        self.assertTrue(their_tab.reading)

    def test_newcomers_start_held(self) -> None:
        """A bridge connecting while a tab is congested starts held, and the other way."""
        tab, _ = self.tab()
        tab.pauseProducing()
        bridge, bridge_conn = self.bridge()
        self.assertFalse(bridge_conn.reading)
        tab.resumeProducing()
        self.assertTrue(bridge_conn.reading)
        bridge.pauseProducing()
        _, late_tab = self.tab()
        self.assertFalse(late_tab.reading)
        bridge.resumeProducing()
        self.assertTrue(late_tab.reading)

    def test_gone_tab_releases(self) -> None:
        """
        A congested tab that goes holds nothing any more, whether its transport
        stops its producer first (connection lost) or the hub detaches it first.
        """
        for stopped_first in (True, False):
            tab, _ = self.tab()
            bridge, conn = self.bridge()
            tab.pauseProducing()
            if stopped_first:
                tab.stopProducing()
                self.assertTrue(conn.reading)
            self.hub.detach(tab)
            self.assertTrue(conn.reading)
            self.assertEqual(bridge.holds, set())
            tab.pauseProducing()  # late news from a detached connection: ignored
            self.assertTrue(conn.reading)
            self.hub.detach(bridge)

    def test_held_connection_read_again_to_close(self) -> None:
        """A held bridge that is detached (replaced, revoked) is read again, to finish closing."""
        tab, _ = self.tab()
        old, old_conn = self.bridge()
        tab.pauseProducing()
        _, new_conn = self.bridge()  # replaces the old connection of bridge 1
        self.assertTrue(old_conn.reading)
        self.assertFalse(new_conn.reading)
        self.assertEqual(old.holds, set())

    def test_heartbeat_waits_for_the_held(self) -> None:
        """
        A bridge held for a congested tab is not closed for silence (the relay
        is not reading it); the tab, congested for the heartbeat timeout, is,
        and once it is gone the bridge is read again.
        """
        tab, tab_conn = self.tab()
        _, bridge_conn = self.bridge()
        tab.pauseProducing()
        self.clock.pump([15.0] * 3)
        self.assertEqual(tab_conn.closed, (closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you"))
        self.assertIsNone(bridge_conn.closed)
        self.hub.detach(tab)  # as the closed connection's onClose does
        self.assertTrue(bridge_conn.reading)
        self.clock.pump([15.0] * 2)
        self.assertIsNone(bridge_conn.closed)

    def test_draining_counts_as_heard(self) -> None:
        """A congested tab that drains now and then is alive: its silence starts at the drain."""
        tab, tab_conn = self.tab()
        tab.pauseProducing()
        self.clock.advance(30)
        tab.resumeProducing()
        tab.pauseProducing()
        self.clock.advance(30)
        self.assertIsNone(tab_conn.closed)
        self.clock.advance(15)
        self.assertEqual(tab_conn.closed, (closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you"))

    def test_send_buffer_option(self) -> None:
        """C{--send-buffer-size} sets the high-water mark; it must be positive."""
        options = Options()
        options.parseOptions(["--send-buffer-size=16384"])
        self.assertEqual(options.settings().hub.send_buffer, 16384)
        self.assertEqual(Options().settings().hub.send_buffer, 64 * 1024)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--send-buffer-size=0"])


# --- the relay's protocols, on string transports ----------------------------------------------

_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    "Origin: https://relay.test\r\n\r\n"
).encode()


class _AdmittedBridge(BridgeProtocol):
    """Bridge 1 of session alice, admitted without a token: the handshake is not under test."""

    def onConnect(self, request: Any) -> None:
        self._attach = {
            "session": "alice",
            "peer": 1,
            "version": "1",
            "label": "laptop",
            "telemetry": False,
            "expires_at": 86400.0,
            "bridge_key": "K" * 87,
        }


class _AdmittedTab(IDEProtocol):
    """A tab of session alice, admitted without a cookie."""

    def onConnect(self, request: Any) -> None:
        self.session = "alice"


@implementer(IPushProducer)
class _HTTPChannel:
    """Stands for twisted.web's channel, registered on the transport before the upgrade."""

    def pauseProducing(self) -> None:
        raise AssertionError("the HTTP channel has no say after the upgrade")

    resumeProducing = stopProducing = pauseProducing


class _TLS(StringTransport):
    """A TLS transport, as the protocols see it: TCP (with its high-water mark) under it."""

    def __init__(self, tcp: FileDescriptor) -> None:
        super().__init__()
        self.transport = tcp


class RelayProtocolCase(SynchronousTestCase):
    """Relay WebSocket protocols in memory: a hub, and connections opened on it."""

    limits = Limits(bridge_messages_per_second=10.0, bridge_message_burst=2)

    def setUp(self) -> None:
        self.clock = Clock()
        telemetry = Telemetry(None, self.clock)
        telemetry.startService()
        self.addCleanup(telemetry.stopService)
        self.telemetry = telemetry
        store = MemoryStore()
        self.settings = HubSettings(send_buffer=4096)
        self.context = RelayContext(
            clock=self.clock,
            store=store,
            tokens=cast(Any, None),
            pairing=cast(Any, None),
            hub=Hub(store, telemetry, self.clock, self.settings),
            telemetry=telemetry,
            public_url="https://relay.test",
            limits=self.limits,
        )

    def open(
        self, kind: type[BridgeProtocol] | type[IDEProtocol], **options: Any
    ) -> tuple[Any, _TLS]:
        """A connection of C{kind}, open, with Autobahn's C{options} besides the relay's."""
        factory = RelayWebSocketFactory(self.context, kind)
        # No Autobahn timers on the global reactor: this test's clock is the only one.
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, **options)
        protocol: Any = factory.buildProtocol(None)
        transport = self.transport()
        transport.registerProducer(_HTTPChannel(), True)
        protocol.makeConnection(transport)
        protocol.dataReceived(HANDSHAKE)
        self.assertIn(b"101", transport.value().split(b"\r\n", 1)[0])
        transport.clear()
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport

    def transport(self) -> _TLS:
        """A new connection's transport."""
        return _TLS(FileDescriptor())


class RelayProtocolTests(RelayProtocolCase):
    """The WebSocket protocols register their endpoint, hold frames, and count holds."""

    def test_endpoint_registered_on_open(self) -> None:
        """
        Once open, the connection's endpoint replaces the HTTP channel as the
        producer on its transport, and TCP's high-water mark is C{send_buffer}.
        """
        for kind in (_AdmittedTab, _AdmittedBridge):
            protocol, transport = self.open(kind)
            self.assertIs(transport.producer, protocol.endpoint)
            self.assertTrue(transport.streaming)
            self.assertEqual(transport.transport.bufferSize, 4096)

    def test_gate_flags_set_plainly(self) -> None:
        """
        The read gate's flags change at every hold and release (a tab reading
        64 KiB messages: each one): plain attributes, which no attrs hook runs
        on, while the protocol it was made with is still held weakly.
        """
        tab, _ = self.open(_AdmittedTab)
        gate = tab._gate
        self.assertIs(type(gate).__setattr__, object.__setattr__)
        self.assertIsInstance(gate.protocol, weakref.ProxyType)
        gate.pause()
        self.assertTrue(gate.closed)
        gate.resume(later=False)
        self.assertFalse(gate.closed)

    def test_options_on_the_class(self) -> None:
        """
        A connection gets its options from its class, made once per set of
        options: nothing is copied into it, and a changed option makes a new one.
        """
        factory = RelayWebSocketFactory(self.context, _AdmittedTab)
        first: Any = factory.buildProtocol(None)
        self.assertIsInstance(first, _AdmittedTab)
        self.assertIs(first.factory, factory)
        self.assertEqual(first.maxMessagePayloadSize, self.limits.max_message_size)
        self.assertEqual(set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(first)), set())
        self.assertIsNone(first.perMessageCompressionAccept([object()]))  # not a method
        self.assertIs(type(factory.buildProtocol(None)), type(first))
        factory.setProtocolOptions(maxMessagePayloadSize=10)
        self.assertEqual(factory.buildProtocol(None).maxMessagePayloadSize, 10)

    def test_handshake_forgotten_on_open(self) -> None:
        """
        Once open, a connection keeps nothing of its opening handshake (the raw
        request, its headers, the response; for a bridge, what it was admitted
        with), and frames still flow.
        """
        tab, tab_transport = self.open(_AdmittedTab)
        bridge, _ = self.open(_AdmittedBridge)
        for protocol in (tab, bridge):
            self.assertIsNone(protocol.http_request_data)
            self.assertIsNone(protocol.http_headers)
            self.assertIsNone(protocol.http_response_data)
        self.assertIsNone(bridge._attach)
        frame = Envelope(Kind.CMD_STDOUT, 1, 0, 1, b"out").encode()
        bridge.dataReceived(ws_frame(0x2, frame))
        self.assertIn(frame, tab_transport.value())

    def test_no_debug_formatting_per_frame(self) -> None:
        """
        Frames read and written on an open connection do not format the
        arguments of Autobahn's debug lines (its Twisted adapter names the
        method and the peer for every read and write, logged or not), and
        still flow, in order.
        """
        _, tab_transport = self.open(_AdmittedTab)
        bridge, _ = self.open(_AdmittedBridge)
        named: list[object] = []

        def counting(obj: object) -> str:
            named.append(obj)
            return ""

        self.patch(autobahn_twisted_websocket, "hltype", counting)
        self.patch(autobahn_protocol, "hltype", counting)
        frames = [Envelope(Kind.CMD_STDOUT, 1, 0, 1, b"%d" % i).encode() for i in range(2)]
        for frame in frames:
            bridge.dataReceived(ws_frame(0x2, frame))
        self.assertEqual(named, [])
        sent = tab_transport.value()
        at = [sent.index(f) for f in frames]
        self.assertEqual(at, sorted(at))

    def test_slow_tab_holds_bridge_frames(self) -> None:
        """
        While the tab's transport has paused its producer, frames read from
        the bridge wait, and its socket is not read once more arrives (not
        before: a hold that ends first costs no system call); when the tab's
        transport resumes, they go on at once, in order, and nothing is lost.
        """
        _, tab = self.open(_AdmittedTab)
        from_bridge, bridge = self.open(_AdmittedBridge)
        frames = [Envelope(Kind.CMD_STDOUT, 1, seq, 1, b"out%d" % seq).encode() for seq in range(2)]
        from_bridge.dataReceived(ws_frame(0x2, frames[0]))
        self.assertIn(frames[0], tab.value())
        tab.clear()
        producer(tab).pauseProducing()  # as TCP does past the mark
        self.assertEqual((held(from_bridge), bridge.producerState), (True, "producing"))
        from_bridge.dataReceived(ws_frame(0x2, frames[1]))  # read while held
        self.assertEqual((bridge.producerState, tab.producerState), ("paused", "producing"))
        self.assertEqual(tab.value(), b"")
        producer(tab).resumeProducing()  # as TCP does once it has sent everything
        self.assertEqual((bridge.producerState, tab.producerState), ("producing", "producing"))
        self.assertIn(frames[1], tab.value())  # in the same turn
        now = self.clock.seconds()
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.getTime() <= now], [])

    def test_bridge_that_does_not_read_holds_tabs(self) -> None:
        """The other way: a congested bridge holds the tabs' keystrokes until it drains."""
        from_tab, tab = self.open(_AdmittedTab)
        _, bridge = self.open(_AdmittedBridge)
        producer(bridge).pauseProducing()
        self.assertTrue(held(from_tab))
        keystroke = Envelope(Kind.PTY_INPUT, 2, 5, 1, b"\x03").encode()
        from_tab.dataReceived(ws_frame(0x2, keystroke))
        self.assertEqual(tab.producerState, "paused")
        self.assertNotIn(keystroke, bridge.value())
        producer(bridge).resumeProducing()
        self.assertEqual(tab.producerState, "producing")
        self.assertIn(keystroke, bridge.value())

    def test_rate_limit_and_backpressure_count_apart(self) -> None:
        """
        A bridge past its rate and a congested tab are two holds: the rate's
        debt paid does not resume a bridge the tab still holds, nor the other
        way round.
        """
        _, tab = self.open(_AdmittedTab)
        from_bridge, bridge = self.open(_AdmittedBridge)
        frames = b"".join(
            ws_frame(0x2, Envelope(Kind.CMD_STDOUT, 1, seq, 1, b"x").encode()) for seq in range(4)
        )
        from_bridge.dataReceived(frames)  # the burst is 2: the third is past the rate
        self.assertTrue(held(from_bridge))
        producer(tab).pauseProducing()
        self.clock.advance(1.0)  # the debt is paid
        self.assertTrue(held(from_bridge))
        producer(tab).resumeProducing()
        self.assertFalse(held(from_bridge))

        producer(tab).pauseProducing()
        from_bridge.dataReceived(frames)  # held: read, not handled
        self.assertEqual(bridge.producerState, "paused")
        producer(tab).resumeProducing()  # handled: past the rate again
        self.assertTrue(held(from_bridge))
        self.assertEqual(bridge.producerState, "producing")  # nothing more read yet
        producer(tab).pauseProducing()
        producer(tab).resumeProducing()
        self.assertTrue(held(from_bridge))
        self.clock.advance(1.0)
        self.assertFalse(held(from_bridge))
        self.clock.advance(0)
        outputs = [e for e in _server_frames(tab.value()) if e.kind == Kind.CMD_STDOUT]
        self.assertEqual(len(outputs), 8)

    def test_data_frames_count_as_heard_per_read(self) -> None:
        """
        A bridge that only sends data frames (never a PING or a PONG) is heard
        at each socket read that brings them, every frame of one read at that
        read's time; it is not closed while it keeps sending, and is closed for
        its silence once it stops.
        """
        bridge, transport = self.open(_AdmittedBridge)
        endpoint = bridge.endpoint
        timeout = self.settings.heartbeat_timeout
        frames = [Envelope(Kind.CMD_STDOUT, 1, seq, 1, b"out").encode() for seq in range(4)]
        for step, frame in enumerate(frames[:3], 1):
            self.clock.advance(timeout * 2 / 3)
            bridge.dataReceived(ws_frame(0x2, frame))
            self.assertEqual(endpoint.heard, self.clock.seconds())
            self.assertEqual(bridge.state, WebSocketServerProtocol.STATE_OPEN, step)
        self.clock.advance(1.0)
        bridge.dataReceived(ws_frame(0x2, frames[3]) + ws_frame(0x2, frames[0]))  # one read
        self.assertEqual(endpoint.heard, self.clock.seconds())
        self.assertGreater(self.clock.seconds(), timeout)  # heard past the timeout from its open
        self.assertEqual(bridge.state, WebSocketServerProtocol.STATE_OPEN)
        self.clock.advance(timeout - 1.0)
        self.assertEqual(bridge.state, WebSocketServerProtocol.STATE_OPEN)
        self.clock.advance(1.0)
        self.assertEqual(bridge.state, WebSocketServerProtocol.STATE_CLOSING)
        self.assertIn(closecodes.HEARTBEAT_TIMEOUT.to_bytes(2, "big"), transport.value())

    def test_silent_connection_still_times_out(self) -> None:
        """A connection that sends nothing after it opened is closed for its silence."""
        tab, transport = self.open(_AdmittedTab)
        self.clock.advance(self.settings.heartbeat_timeout - 0.5)
        self.assertEqual(tab.state, WebSocketServerProtocol.STATE_OPEN)
        self.clock.advance(0.5)
        self.assertEqual(tab.state, WebSocketServerProtocol.STATE_CLOSING)
        self.assertIn(closecodes.HEARTBEAT_TIMEOUT.to_bytes(2, "big"), transport.value())


def held(protocol: Any) -> bool:
    """Whether the relay handles what C{protocol} reads no more (it stops reading at more)."""
    return bool(protocol._gate.closed)


def producer(transport: StringTransport) -> Any:
    """The producer registered on C{transport}, which its TCP transport would pause and resume."""
    assert transport.producer is not None
    return transport.producer


def _server_frames(data: bytes) -> list[Envelope]:
    """The envelopes in the binary messages of unmasked server frames (under 64 KiB)."""
    found = []
    while data:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        if data[0] & 0x0F == 0x2:
            found.append(decode(data[start : start + length]))
        data = data[start + length :]
    return found


# --- the bridge: output paused while the connection to the relay is full ----------------------


@attrs.define(eq=False)
class PausableProcess:
    """A fake process transport that records whether its output is being read."""

    pid: int
    reading: bool = True

    def write(self, data: bytes) -> None:
        pass

    def signalProcess(self, signalID: str | int) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True


class _SpawningClock(MemoryReactorClock):
    """A clock whose spawnProcess makes L{PausableProcess}es."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[PausableProcess] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> PausableProcess:
        process = PausableProcess(4000 + len(self.processes))
        self.processes.append(process)
        return process


@attrs.define
class _Link:
    def send(self, frame: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


class BridgeFlowTests(BridgeProtocolCase):
    """The session pauses every process's output while its connection is full."""

    def setUp(self) -> None:
        self.reactor = _SpawningClock()
        reactor: Any = self.reactor
        self.session = quiet_session(reactor)
        self.runner = self.session.runner

    def start(self, stream: int) -> PausableProcess:
        self.runner.handle(control(Kind.CMD_START, {"argv": ["true"]}, stream=stream, peer=1))
        return self.reactor.processes[-1]

    def test_send_buffer_registered_on_open(self) -> None:
        """Once open, a connection registers a push producer on its transport for the session."""
        _, transport = self.open(self.session)
        self.assertIsInstance(transport.producer, SendBuffer)
        self.assertTrue(transport.streaming)
        running = self.start(1)
        producer(transport).pauseProducing()
        self.assertFalse(running.reading)
        producer(transport).resumeProducing()
        self.assertTrue(running.reading)

    def test_pause_and_resume(self) -> None:
        """
        Paused, no process's output is read, and a process started meanwhile
        starts paused; resumed, all are read again.
        """
        link = _Link()
        first = self.start(1)
        self.session.pause_output(link)
        second = self.start(2)
        self.assertEqual((first.reading, second.reading), (False, False))
        self.session.resume_output(link)
        self.assertEqual((first.reading, second.reading), (True, True))

    def test_lost_connection_resumes(self) -> None:
        """
        A connection that is lost while full (its transport stops its producer,
        and it detaches) no longer holds the output; news from it arriving late
        does not disturb a new connection's pause.
        """
        old, new = _Link(), _Link()
        running = self.start(1)
        buffer = SendBuffer(self.session, old)
        buffer.pauseProducing()
        buffer.stopProducing()
        self.assertTrue(running.reading)
        self.session.pause_output(new)
        self.session.detach(old)
        self.assertFalse(running.reading)
        self.session.detach(new)
        self.assertTrue(running.reading)

    def test_stopping_reads_to_the_end(self) -> None:
        """A stopping bridge reads output to its end (processes must end), paused or not."""
        link = _Link()
        running = self.start(1)
        self.session.pause_output(link)
        self.session.stop_pausing()
        self.assertTrue(running.reading)
        self.session.pause_output(link)
        self.assertTrue(running.reading)
        self.runner.pause_output()
        self.runner.stop_all()
        self.assertTrue(running.reading)


# --- real processes: paused output is kept, and a paused bridge still stops -------------------


class RealOutputTests(RealProcessTestCase):
    """Output left unread while paused arrives whole once resumed."""

    patience = 10.0

    async def test_command_started_while_paused(self) -> None:
        """
        A command started while output is paused is not read (so it cannot
        end: its exit waits for its pipes); resumed, all its output arrives.
        """
        runner = CommandRunner(cast(Any, self.reactor), self.inbox.send)
        self.addCleanup(runner.stop_all)
        runner.pause_output()
        body = {"argv": ["head", "-c", "300000", "/dev/zero"]}
        runner.handle(control(Kind.CMD_START, body, stream=1, peer=1))
        await deferLater(self.reactor, 0.5)
        self.assertEqual(self.inbox.stream(1), [])
        runner.resume_output()
        result = await self.inbox.exit(1)
        self.assertEqual(result["exit_code"], 0)
        self.assertEqual(self.inbox.output(1), b"\0" * 300000)

    async def test_terminal_output_outlives_the_linger(self) -> None:
        """
        A terminal whose program prints and ends while output is paused is not
        hung up after C{linger} (which would lose what is still unread): the
        output arrives once resumed, then PTY_EXIT.
        """
        manager = TerminalManager(
            cast(Any, self.reactor), self.inbox.send, TerminalSettings(linger=0.1)
        )
        self.addCleanup(manager.stop_all)
        manager.pause_output()
        body = {"cols": 80, "rows": 24, "argv": ["sh", "-c", "printf kept-past-the-linger"]}
        manager.handle(control(Kind.PTY_OPEN, body, stream=1, peer=1))
        await deferLater(self.reactor, 0.8)
        self.assertEqual([f.kind for f in self.inbox.stream(1)], [Kind.PTY_OPENED])
        manager.resume_output()
        result = await self.inbox.exit(1)
        self.assertEqual(result["exit_code"], 0)
        self.assertIn(b"kept-past-the-linger", self.inbox.output(1))


class PausedBridgeStopTests(LoopbackTestCase):
    """A bridge whose output is paused because a tab does not read still stops."""

    async def test_stop_while_paused(self) -> None:
        """
        A tab stops reading an endless output, which pauses the bridge; the
        bridge's stop ends the command and closes (aborts, when the relay
        takes nothing) its connection within C{CLOSE_TIMEOUT} and a bit.
        """
        await self.start()
        assert self.ide.protocol is not None
        transport: Any = self.ide.protocol.transport
        transport.pauseProducing()
        self.addCleanup(transport.resumeProducing)
        self.ide.send(control(Kind.CMD_START, {"argv": ["yes"]}, stream=1, peer=1))
        await until(lambda: self.bridge.runner.output_paused, 30, "the bridge to pause")
        [pid] = [p for p in descendants(os.getpid()) if process_name(p) == "yes"]
        started = time.monotonic()
        await self.bridge.stopService()
        self.assertLess(time.monotonic() - started, 9.0)
        self.assertFalse(alive(pid))


# --- end to end: the relay and the bridge measured in processes of their own ----------------

#: The output the slow reader is sent: 200 MB.
SIZE = 200_000_000
#: What the relay and the bridge may each grow by while the reader does not read.
RELAY_BOUND = 16 * 1024 * 1024
#: The bridge also keeps up to its replay buffer of the stream (docs/protocol.md, 5.7).
BRIDGE_BOUND = 16 * 1024 * 1024 + ReplaySettings().capacity


@attrs.define
class CountingIDE(IDEConnection):
    """An IDE connection that counts and hashes one stream's stdout instead of keeping it."""

    stream: int = 0
    count: int = 0
    digest: Any = attrs.field(factory=hashlib.sha256)

    def arrived(self, frame: bytes) -> None:
        super().arrived(frame)
        self.raw.clear()

    def received(self, envelope: Envelope) -> None:
        if envelope.kind == Kind.CMD_STDOUT and envelope.stream == self.stream:
            self.count += len(envelope.payload)
            self.digest.update(envelope.payload)
            return
        super().received(envelope)


async def connect_counting(browser: Browser, relay: ChildRelay) -> CountingIDE:
    """What L{Browser.connect_ide} does, with a L{CountingIDE} and a channel to bridge 1."""
    connection = CountingIDE(browser.identity)
    factory = IDEClientFactory(
        browser.url.replace("https", "wss", 1) + "/ws/ide",
        connection,
        origin=browser.url,
        headers={"Cookie": browser.cookie_header()},
    )
    endpoint = wrapClientTLS(
        client_tls_options("localhost", relay.keys.tls_cert_pem),
        HostnameEndpoint(reactor, "127.0.0.1", relay.port.getHost().port),
    )
    await endpoint.connect(factory)
    connection.protocol = await factory.opened
    await connection.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
    await connection.handshake(1)
    return connection


async def until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05)


def expected_digest(size: int) -> bytes:
    digest = hashlib.sha256()
    chunk = b"x" * 1_000_000
    for _ in range(size // len(chunk)):
        digest.update(chunk)
    digest.update(b"x" * (size % len(chunk)))
    return digest.digest()


class SlowReaderTests(TestCase):
    """A tab that stops reading a 200 MB output: bounded memory, a blocked command, no loss."""

    timeout = 120

    async def test_slow_reader(self) -> None:
        """
        Relay and bridge run in processes of their own.  A tab reads the first
        8 MB of a 200 MB output, stops reading its socket for at least 4
        seconds, then reads the rest.  Throughout, neither the relay's nor the bridge's
        resident memory grows by 16 MiB, plus the replay buffer for the bridge
        (without flow control the relay grows
        by the whole output); while the tab does not read, the command is
        blocked (alive, writing nothing); the tab gets all 200 MB, intact.
        """
        relay = await start_child_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.child.stop()))
        browser = Browser(relay.as_service())
        await browser.open_page()
        config_dir = FilePath(self.mktemp())
        await pair_bridge(browser, config_dir, io.StringIO())
        bridge = await start_child_bridge(config_dir)
        self.addCleanup(lambda: Deferred.fromCoroutine(bridge.stop()))
        ide = await connect_counting(browser, relay)
        self.addCleanup(ide.close)
        assert ide.protocol is not None
        transport: Any = ide.protocol.transport

        pids = {"relay": relay.pid, "bridge": bridge.pid}
        cold = {name: memory(pid)["VmRSS"] for name, pid in pids.items()}
        # Warm up (TLS, buffers, the allocator) with a few MB, then take the baseline.
        warm = await ide.run(1, {"argv": ["head", "-c", "4000000", "/dev/zero"]})
        self.assertEqual(len(warm.stdout), 4_000_000)
        before = {name: memory(pid) for name, pid in pids.items()}
        peak = {name: 0 for name in pids}

        def sample() -> None:
            for name, pid in pids.items():
                peak[name] = max(peak[name], memory(pid)["VmRSS"])

        sampler = LoopingCall(sample)
        sampler.start(0.05)

        def stop_sampling() -> None:
            if sampler.running:
                sampler.stop()

        self.addCleanup(stop_sampling)

        ide.stream = 2
        started = time.monotonic()
        command = f"head -c {SIZE} /dev/zero | tr '\\0' x"
        ide.send(control(Kind.CMD_START, {"argv": ["sh", "-c", command]}, stream=2, peer=1))
        await until(lambda: ide.count >= 8_000_000, 30, "the first 8 MB")
        transport.pauseProducing()
        paused = time.monotonic()
        paused_at = ide.count
        [writer] = [p for p in descendants(bridge.pid) if process_name(p) == "tr"]
        # The kernel's buffers on the way fill in well under a second, then it stalls.
        written, previous = bytes_written(writer), -1
        while written != previous:
            self.assertLess(time.monotonic() - paused, 20, "the command kept writing")
            await deferLater(reactor, 1.0)
            previous, written = written, bytes_written(writer)
        await deferLater(reactor, max(0.0, 4.0 - (time.monotonic() - paused)))
        self.assertTrue(alive(writer), "the command ended")
        self.assertEqual(bytes_written(writer), written, "the command kept writing")
        self.assertLess(written, SIZE // 2)
        self.assertEqual(ide.count, paused_at)
        during = dict(peak)

        transport.resumeProducing()
        end = await ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.CMD_EXIT, 90)
        elapsed = time.monotonic() - started
        stop_sampling()
        self.assertEqual(end.json()["exit_code"], 0)
        self.assertEqual(ide.count, SIZE)
        self.assertEqual(ide.digest.digest(), expected_digest(SIZE))
        self.assertEqual(ide.refused, [])

        growth = {name: peak[name] - before[name]["VmRSS"] for name in pids}
        _log.info(
            "slow reader: {size} bytes in {elapsed:.1f}s, reader paused after {paused_at}, "
            "command blocked after writing {written}; VmRSS cold / before / peak while paused / "
            "peak: relay {rc} / {rb} / {rd} / {rp}, bridge {bc} / {bb} / {bd} / {bp}",
            size=SIZE,
            elapsed=elapsed,
            paused_at=paused_at,
            written=written,
            rc=cold["relay"],
            bc=cold["bridge"],
            rb=before["relay"]["VmRSS"],
            rd=during["relay"],
            rp=peak["relay"],
            bb=before["bridge"]["VmRSS"],
            bd=during["bridge"],
            bp=peak["bridge"],
        )
        self.assertLess(growth["relay"], RELAY_BOUND, growth)
        self.assertLess(growth["bridge"], BRIDGE_BOUND, growth)
