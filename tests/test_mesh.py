"""
Several relay nodes, one deployment (C{coder1_relay.mesh}, C{coder1_relay.nodelink}).

Here the nodes are relay services in this process sharing a store and a
L{SharedMemory} directory, each with its own listeners, talking real TLS 1.3
WebSockets over loopback: a tab on one node and its bridge on another work as
if they were on one.  tests/test_redis_mesh.py runs the same across processes
on a real Redis.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from coder1_relay import nodelink
from coder1_relay.certs import DEV_CERT_NAME, DEV_KEY_NAME, SIGNING_KEY_NAME
from coder1_relay.mesh import RELEASE_DELAY, MemoryDirectory, Mesh, Owner, SharedMemory
from coder1_relay.service import RelayService, RelaySettings
from coder1_relay.store import BridgeRecord, MemoryStore, StoreUnavailable
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, control

from .balancer import Balancer
from .loopback import (
    Browser,
    ChildRelay,
    IDEConnection,
    _Context,
    _Keys,
    _Port,
    crash_relay,
    reactor,
    redeem,
    settle,
    start_bridge,
    start_relay,
    stop_all,
)
from .test_routing import make_hub

LOOPBACK = "tcp:0:interface=127.0.0.1"


def share_keys(first: FilePath[str], other: FilePath[str]) -> None:
    """Give node C{other} the first node's signing key and certificate, as an operator does."""
    other.makedirs(ignoreExistingDirectory=True)
    for name in (SIGNING_KEY_NAME, DEV_CERT_NAME, DEV_KEY_NAME):
        first.child(name).copyTo(other.child(name))
        other.child(name).chmod(0o600)


def node_port(node: RelayService) -> int:
    assert node.port is not None
    return int(node.port.getHost().port)  # type: ignore[attr-defined]


class MeshTestCase(TestCase):
    """
    Relay nodes in this process, one store and one directory between them,
    and a TCP balancer in front, whose rotation each test sets: so the test
    says which node each connection reaches.
    """

    timeout = 120

    async def start_nodes(self, count: int = 2, **settings: Any) -> list[RelayService]:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.balancer = Balancer([])
        port = await self.balancer.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.balancer.stop()))
        self.store = MemoryStore()
        self.shared = SharedMemory()
        self.directories: list[MemoryDirectory] = []
        self.nodes: list[RelayService] = []
        for _ in range(count):
            state = FilePath(self.mktemp())
            if self.nodes:
                share_keys(self.nodes[0].settings.state_dir, state)
            directory = MemoryDirectory(self.shared)
            self.directories.append(directory)
            node = RelayService(
                reactor,
                RelaySettings(
                    state_dir=state,
                    listen=LOOPBACK,
                    node_listen=LOOPBACK,
                    public_url=f"https://localhost:{port}",
                    **settings,
                ),
                store=self.store,
                directory=directory,
            )
            node.startService()
            await node.listening
            self.addCleanup(self._stop, node)
            self.nodes.append(node)
        self.balancer.backends = [node_port(n) for n in self.nodes]
        first = self.nodes[0]
        self.deployment = ChildRelay(
            None,  # type: ignore[arg-type]  # no process: only what clients read
            _Context(first.context.public_url),
            _Keys(first.keys.tls_cert_pem),
            _Port(port),
        ).as_service()
        return self.nodes

    def _stop(self, node: RelayService) -> Deferred[None]:
        return Deferred.fromCoroutine(stop_all(node))

    def route_to(self, *nodes: RelayService) -> None:
        """New connections through the balancer go to C{nodes} only."""
        self.balancer.backends = [node_port(n) for n in nodes]

    async def pair_bridge(self, browser: Browser, *, code_on: int, redeem_on: int) -> Any:
        """A code made on one node, redeemed by C{coder1-bridge pair} on another; started."""
        self.route_to(self.nodes[code_on])
        code = await browser.new_code()
        self.route_to(self.nodes[redeem_on])
        config = await redeem(self.deployment, code, FilePath(self.mktemp()))
        bridge = await start_bridge(config, label="test-host")
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        return bridge

    async def connect(self, browser: Browser, node: RelayService) -> IDEConnection:
        self.route_to(node)
        ide = await browser.connect_ide()
        self.addCleanup(ide.close)
        await ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
        return ide


class AcrossNodesTests(MeshTestCase):
    """A tab on one node and its bridge on another."""

    async def test_pair_and_run_across_nodes(self) -> None:
        """
        A code from node A is redeemed on node B; with the bridge connected to
        B and the tab to A, a command runs and a terminal echoes, end to end,
        through the node link.
        """
        a, b = await self.start_nodes()
        browser = Browser(self.deployment)
        await browser.open_page()
        await self.pair_bridge(browser, code_on=0, redeem_on=1)
        ide = await self.connect(browser, a)
        self.assertEqual([e.is_bridge for e in b.context.hub.endpoints()], [True, False])
        self.assertEqual(a.context.hub.endpoints(), [])
        result = await ide.run(1, {"shell": "printf 'across\\n'; exit 4"})
        self.assertEqual(result.stdout, b"across\n")
        self.assertEqual(result.exit["exit_code"], 4)
        ide.send(control(Kind.PTY_OPEN, {"cols": 80, "rows": 24}, stream=2, peer=1))
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OPENED and e.stream == 2)
        ide.send(Envelope(Kind.PTY_INPUT, stream=2, seq=1, peer=1, payload=b"echo mesh-$((6*7))\n"))
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OUTPUT and b"mesh-42" in e.payload)

    async def test_bridges_listed_on_every_node(self) -> None:
        """/api/bridges answers the same, connected, on the node without the bridge."""
        a, b = await self.start_nodes()
        browser = Browser(self.deployment)
        await browser.open_page()
        await self.pair_bridge(browser, code_on=0, redeem_on=1)
        for node in (a, b):
            self.route_to(node)
            status, body, _ = await browser.request(b"GET", "/api/bridges")
            self.assertEqual(status, 200)
            self.assertEqual([x["connected"] for x in body["bridges"]], [True])

    async def test_revoke_on_one_node_closes_bridge_on_other(self) -> None:
        """A bridge revoked through node A is refused (4003) by node B, where it is connected."""
        a, _ = await self.start_nodes()
        browser = Browser(self.deployment)
        await browser.open_page()
        bridge = await self.pair_bridge(browser, code_on=0, redeem_on=1)
        self.route_to(a)
        status, _, _ = await browser.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual(status, 200)
        reason = await bridge.refused
        self.assertIn("revoked", reason)

    async def test_owner_gone_session_moves(self) -> None:
        """
        When the node holding a session is gone, its tabs on other nodes are
        closed with NODE_GONE; the bridge reconnects (through the balancer) to
        a node left, which claims the session, and the tab works again there.
        """
        a, b = await self.start_nodes()
        browser = Browser(self.deployment)
        await browser.open_page()
        bridge = await self.pair_bridge(browser, code_on=0, redeem_on=1)
        ide = await self.connect(browser, a)
        self.directories[1].leave()
        self.route_to(a)
        await crash_relay(b)
        assert b.node_port is not None
        await maybeDeferred(b.node_port.stopListening)
        await ide.lost
        assert b.context.mesh is not None
        b.context.mesh.stop()  # what a dead process leaves is no timer
        self.assertEqual(ide.close_code, closecodes.NODE_GONE)
        await bridge.when_connected()
        ide = await self.connect(browser, a)
        result = await ide.run(1, {"shell": "echo still-here"})
        self.assertEqual(result.stdout, b"still-here\n")


class _UnreachableDirectory(MemoryDirectory):
    """A directory whose store does not answer: nothing published gets out."""

    def publish(self, event: dict[str, Any]) -> Deferred[None]:
        return fail(StoreUnavailable("no Redis"))


class SilentOwnerTests(TestCase):
    """A node that takes the connection but never answers the link."""

    async def test_silent_owner_refused(self) -> None:
        """
        A link whose TLS and WebSocket handshake never completes is given up
        after the link timeout (Autobahn's opening handshake timeout, which
        covers TLS too) as L{LinkRefused}, which the caller turns into a close
        its client reconnects after.
        """
        self.patch(nodelink, "LINK_TIMEOUT", 0.2)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(silent.stopListening)
        links = nodelink.NodeLinks(
            reactor,
            relay.context.tokens,
            relay.node_tls,
            "localhost",
            relay.settings.limits,
            65536,
        )
        owner = Owner("silent", f"127.0.0.1:{silent.getHost().port}")
        with self.assertRaises(nodelink.LinkRefused) as refused:
            await links.open(owner, "ide", "session", "c1", {})
        self.assertEqual(
            (refused.exception.status, refused.exception.reason),
            (0, "the relay node holding this session is unreachable; try again"),
        )


class MeshUnitTests(SynchronousTestCase):
    """L{Mesh} without a network: what it does when its directory's store is away."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.shared = SharedMemory()
        no_links: Any = None  # nothing here opens a node link
        self.mesh = Mesh(
            _UnreachableDirectory(self.shared), make_hub(self, self.clock), self.clock, no_links
        )

    def test_unpublished_events_warned_not_raised(self) -> None:
        """
        A pairing or a revocation the other nodes cannot be told of is a
        warning line, never an unhandled error.
        """
        record = BridgeRecord(1, "jti", "laptop", 0.0, 10.0, bridge_key="k")
        warned: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_level") == LogLevel.warn:
                warned.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.successResultOf(self.mesh.paired("s", record))
        self.successResultOf(self.mesh.disconnect_bridge("s", 1, 4003, "revoked"))
        self.assertEqual([e["what"] for e in warned], ["a pairing", "a revocation"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_release_waits_for_the_delay(self) -> None:
        """A session with no connection left is given up only after RELEASE_DELAY."""
        self.successResultOf(self.mesh.directory.locate("s"))
        on_empty = self.mesh.hub.on_empty
        assert on_empty is not None
        on_empty("s")
        owners = self.shared.owners
        self.clock.advance(RELEASE_DELAY - 0.1)
        self.assertIn("s", owners)
        self.clock.advance(0.1)
        self.assertNotIn("s", owners)
