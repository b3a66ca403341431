"""
Several relay processes on one real Redis (docs/scaling.md), end to end.

Two relays run as processes of their own (what C{twistd coder1-relay --store
redis://...} runs), sharing a redis-server of the test's own and one signing
key and certificate, behind a TCP balancer in this process whose rotation the
test sets: so a tab reaches one node and its bridge the other.  The bridge
and the IDE client are real and resume as the page does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody

from coder1_relay.certs import DEV_CERT_NAME
from coder1_wire import __version__
from coder1_wire.e2e import b64u
from coder1_wire.envelope import Envelope, Kind, control

from .balancer import Balancer
from .loopback import (
    Browser,
    Child,
    ChildRelay,
    _Context,
    _Keys,
    _Port,
    bytes_written,
    descendants,
    memory,
    process_name,
    reactor,
    redeem,
    settle,
    start_bridge,
    start_child_relay,
    stop_all,
)
from .processes import alive
from .redis_server import RedisServer, free_port, start_redis
from .test_flow import (
    RELAY_BOUND,
    SIZE,
    _log,
    connect_counting,
    expected_digest,
    until,
)
from .test_mesh import share_keys
from .test_resume import STREAM, ResumingIDE, expected_output
from .test_telemetry_summary import RELAY_SCRIPT

#: `seq 1 LINES`: 52,888,896 bytes.
LINES = 6_000_000


class RedisMeshTestCase(TestCase):
    """Two relay processes, a Redis, a balancer; a browser and a paired bridge."""

    timeout = 300

    async def start_deployment(self) -> None:
        self.redis: RedisServer = await start_redis(self)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.balancer = Balancer([])
        port = await self.balancer.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.balancer.stop()))
        self.public_url = f"https://localhost:{port}"
        self.nodes: list[ChildRelay] = []
        self.ports: list[int] = []
        self.states: list[FilePath[str]] = []
        for _ in range(2):
            state = FilePath(self.mktemp())
            if self.states:
                share_keys(self.states[0], state)
            self.states.append(state)
            self.ports.append(free_port())
            self.nodes.append(await self.start_node(len(self.nodes)))
        self.balancer.backends = list(self.ports)
        self.deployment = ChildRelay(
            self.nodes[0].child,
            _Context(self.public_url),
            _Keys(self.states[0].child(DEV_CERT_NAME).getContent()),
            _Port(port),
        ).as_service()
        self.browser = Browser(self.deployment)
        await self.browser.open_page()

    def node_options(self, index: int) -> list[str]:
        """More options for node C{index} (they win over those L{start_node} gives)."""
        return []

    async def start_node(self, index: int) -> ChildRelay:
        """Node C{index} (again, after it was killed: same port and state)."""
        node = await start_child_relay(
            self.states[index],
            f"--listen=tcp:{self.ports[index]}:interface=127.0.0.1",
            "--store",
            self.redis.url,
            "--public-url",
            self.public_url,
            *self.node_options(index),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(node.child.stop()))
        return node

    def route_to(self, *indexes: int) -> None:
        """New connections through the balancer reach these nodes only."""
        self.balancer.backends = [self.ports[i] for i in indexes]

    async def pair_bridge(self, *, code_on: int, redeem_on: int, **bridge: Any) -> Any:
        """A code asked for on one node, redeemed on the other; the bridge connected there."""
        self.route_to(code_on)
        code = await self.browser.new_code()
        self.route_to(redeem_on)
        config = await redeem(self.deployment, code, FilePath(self.mktemp()))
        service = await start_bridge(config, label="test-host", **bridge)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(service)))
        return service


class AcrossProcessesTests(RedisMeshTestCase):
    """A tab on one relay process, its bridge on another."""

    async def test_terminal_and_command_across_processes(self) -> None:
        """
        Paired across nodes (code on A, redeemed on B, the bridge connected to
        B), a tab on A runs a command and types into a terminal end to end.
        """
        await self.start_deployment()
        await self.pair_bridge(code_on=0, redeem_on=1)
        self.route_to(0)
        ide = await self.browser.connect_ide()
        self.addCleanup(ide.close)
        result = await ide.run(1, {"shell": "printf 'node-b\\n'; exit 5"})
        self.assertEqual((result.stdout, result.exit["exit_code"]), (b"node-b\n", 5))
        ide.send(control(Kind.PTY_OPEN, {"cols": 80, "rows": 24}, stream=2, peer=1))
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OPENED and e.stream == 2)
        ide.send(Envelope(Kind.PTY_INPUT, stream=2, seq=1, peer=1, payload=b"echo $((7*6))x\n"))
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OUTPUT and b"42x" in e.payload)

        # Both nodes' telemetry (written as they stop) is read in one place.
        for node in self.nodes:
            await node.child.stop()
        out, err, status = await getProcessOutputAndValue(
            RELAY_SCRIPT, ["telemetry", "--store", self.redis.url], env=os.environ, reactor=reactor
        )
        self.assertEqual((err, status), (b"", 0))
        (today,) = [line for line in out.decode().splitlines() if line.startswith("  20")][-1:]
        # day, tabs, bridges, commands, completed: a tab on A, the bridge on B.
        self.assertEqual(today.split()[1:5], ["1", "1", "1", "1"])
        self.assertIn(f"Bridge versions (connections): {__version__} 1", out.decode())

    async def test_revocation_on_one_process_closes_bridge_on_other(self) -> None:
        """A bridge connected to B and revoked through A is closed at once, told it was revoked."""
        await self.start_deployment()
        bridge = await self.pair_bridge(code_on=0, redeem_on=1)
        self.route_to(0)
        asked = reactor.seconds()
        status, _, _ = await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual(status, 200)
        reason = await bridge.refused.addTimeout(10, reactor)
        self.assertIn("revoked", reason)
        _log.info("revocation across nodes: {ms:.1f} ms", ms=1000 * (reactor.seconds() - asked))

    async def test_code_rate_counted_across_processes(self) -> None:
        """Five codes a minute per browser session, whichever nodes they are asked of."""
        await self.start_deployment()
        for i in range(5):
            self.route_to(i % 2)
            await self.browser.new_code()
        key = b64u(self.browser.identity.public_raw)
        for node in (0, 1):
            self.route_to(node)
            status, body, _ = await self.browser.request(
                b"POST", "/api/pairing-codes", {"browser_key": key}
            )
            self.assertEqual(status, 429, body)


class FailureTests(RedisMeshTestCase):
    """A relay process killed, and Redis restarted, during a 50 MB stream: nothing lost."""

    async def stream(self) -> ResumingIDE:
        await self.start_deployment()
        await self.pair_bridge(code_on=0, redeem_on=1, max_delay=1.0)
        self.route_to(0)
        ide = ResumingIDE(self.browser)
        await ide.connect()
        assert ide.connection is not None
        ide.connection.send(
            control(Kind.CMD_START, {"argv": ["seq", "1", str(LINES)]}, stream=STREAM, peer=1)
        )
        return ide

    async def finish(self, ide: ResumingIDE) -> None:
        end = await ide.exit.addTimeout(240, reactor)
        self.assertEqual(end.json()["exit_code"], 0)
        self.assertEqual(ide.gaps, [])
        self.assertEqual(bytes(ide.data), expected_output(LINES))

    async def test_owner_killed_mid_stream(self) -> None:
        """
        The node holding the session (B, where the bridge is) is SIGKILLed at
        10 MB: the tab on A is told the node is gone, the bridge reconnects to
        A, A claims the session once B's record expires, and the IDE resumes:
        every line exactly once, in order.
        """
        ide = await self.stream()
        await ide.reached(10_000_000).addTimeout(120, reactor)
        os.kill(self.nodes[1].pid, signal.SIGKILL)
        await self.nodes[1].child.ended
        assert ide.connection is not None
        await ide.connection.lost
        self.assertEqual(ide.connection.close_code, 4012)
        self.route_to(0)
        await ide.connect()
        await self.finish(ide)

    async def test_redis_restarted_mid_stream(self) -> None:
        """
        Redis is stopped at 10 MB and started again 2 s later: while it is
        away a new code is refused with 503 (never half a pairing), and the
        stream across the two nodes goes on; every line arrives exactly once.
        """
        ide = await self.stream()
        await ide.reached(10_000_000).addTimeout(120, reactor)
        await self.redis.stop()
        self.route_to(0)
        status, body, _ = await self.browser.request(
            b"POST", "/api/pairing-codes", {"browser_key": "x"}
        )
        self.assertEqual((status, body.get("error")), (503, "store-unavailable"))
        await deferLater(reactor, 2.0)
        await self.redis.start()
        await self.finish(ide)
        self.assertEqual(ide.connections, 1)


class FlowAcrossTests(RedisMeshTestCase):
    """A tab that stops reading, on the other node than its bridge: bounded memory, no loss."""

    async def test_slow_reader_across_nodes(self) -> None:
        """
        The tab (on node A) reads the first 8 MB of a 200 MB output, stops
        reading for at least 4 seconds, then reads the rest, while the bridge
        is on node B.  The hold travels back through the node link: the
        command blocks, neither relay process grows by 16 MiB, and every byte
        arrives, intact.
        """
        await self.start_deployment()
        await self.pair_bridge(code_on=0, redeem_on=1)
        self.route_to(0)
        ide = await connect_counting(self.browser, cast(ChildRelay, self.deployment))
        self.addCleanup(ide.close)
        assert ide.protocol is not None
        transport: Any = ide.protocol.transport
        warm = await ide.run(1, {"argv": ["head", "-c", "4000000", "/dev/zero"]})
        self.assertEqual(len(warm.stdout), 4_000_000)
        pids = {"relaying": self.nodes[0].pid, "owner": self.nodes[1].pid}
        before = {name: memory(pid)["VmRSS"] for name, pid in pids.items()}
        peak = dict(before)

        def sample() -> None:
            for name, pid in pids.items():
                peak[name] = max(peak[name], memory(pid)["VmRSS"])

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        self.addCleanup(lambda: sampler.stop() if sampler.running else None)

        ide.stream = 2
        command = f"head -c {SIZE} /dev/zero | tr '\\0' x"
        ide.send(control(Kind.CMD_START, {"argv": ["sh", "-c", command]}, stream=2, peer=1))
        await until(lambda: ide.count >= 8_000_000, 30, "the first 8 MB")
        transport.pauseProducing()
        paused, paused_at = reactor.seconds(), ide.count
        [writer] = [p for p in descendants(os.getpid()) if process_name(p) == "tr"]
        written, previous = bytes_written(writer), -1
        while written != previous:
            self.assertLess(reactor.seconds() - paused, 20, "the command kept writing")
            await deferLater(reactor, 1.0)
            previous, written = written, bytes_written(writer)
        await deferLater(reactor, max(0.0, 4.0 - (reactor.seconds() - paused)))
        self.assertTrue(alive(writer), "the command ended")
        self.assertEqual(ide.count, paused_at)
        self.assertLess(written, SIZE // 2)
        transport.resumeProducing()
        end = await ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.CMD_EXIT, 120)
        sampler.stop()
        self.assertEqual(end.json()["exit_code"], 0)
        self.assertEqual((ide.count, ide.digest.digest()), (SIZE, expected_digest(SIZE)))
        growth = {name: peak[name] - before[name] for name in pids}
        _log.info(
            "slow reader across nodes: command blocked after {written} bytes; VmRSS growth "
            "relaying node {relaying}, owner node {owner}",
            written=written,
            **growth,
        )
        self.assertLess(growth["relaying"], RELAY_BOUND, growth)
        self.assertLess(growth["owner"], RELAY_BOUND, growth)


HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CONFIG = (
    FilePath(__file__).parent().sibling("contrib").descendant(["haproxy", "coder1-relay.cfg"])
)


class HAProxyTests(RedisMeshTestCase):
    """
    The HAProxy configuration the README ships, in front of two relay processes,
    probing each one's /readyz on its --metrics-listen port.  Node B reaches
    Redis through a TCP proxy of the test's, which can cut it off.
    """

    def node_options(self, index: int) -> list[str]:
        if index == 0:
            self.metrics_ports = [free_port(), free_port()]
        options = [f"--metrics-listen=tcp:{self.metrics_ports[index]}:interface=127.0.0.1"]
        if index == 1:
            self.reach_redis()
            options += ["--store", f"redis://127.0.0.1:{self.redis_proxy_port}/0"]
        return options

    async def start_deployment(self) -> None:
        self.redis_proxy = Balancer([])
        self.redis_proxy_port = await self.redis_proxy.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.redis_proxy.stop()))
        await super().start_deployment()

    def reach_redis(self) -> None:
        """Node B reaches Redis (again)."""
        self.redis_proxy.backends = [self.redis.port]

    def cut_redis_proxy(self) -> None:
        """Node B loses Redis: its connections dropped, new ones closed at once."""
        self.redis_proxy.backends = []
        for each in list(self.redis_proxy.live):
            transport: Any = each.transport
            transport.abortConnection()

    async def start_haproxy(self) -> int:
        """HAProxy with the shipped configuration, its ports pointed at this test's relays."""
        if not os.access(HAPROXY, os.X_OK):
            raise SkipTest(f"{HAPROXY} is not installed (apt-get install haproxy)")
        port = free_port()
        config = HAPROXY_CONFIG.getContent().decode()
        config = config.replace("bind :443", f"bind 127.0.0.1:{port}")
        for shipped, ours in zip(("127.0.0.1:9001", "127.0.0.1:9002"), self.ports, strict=True):
            config = config.replace(shipped, f"127.0.0.1:{ours}")
        for shipped, ours in zip(("port 9401", "port 9402"), self.metrics_ports, strict=True):
            config = config.replace(shipped, f"port {ours}")
        # A short path: a UNIX socket's is at most about 100 bytes.
        self.stats = FilePath(tempfile.mkdtemp(prefix="haproxy-"))
        self.addCleanup(self.stats.remove)
        socket = self.stats.child("haproxy.sock").path
        config = f"global\n    stats socket {socket}\n\n{config}"
        path = FilePath(self.mktemp())
        path.setContent(config.encode())
        child = Child()
        reactor.spawnProcess(child, HAPROXY, [HAPROXY, "-db", "-f", path.path], env={})
        self.addCleanup(lambda: Deferred.fromCoroutine(child.stop()))
        for _ in range(50):  # until it listens
            try:
                connected: Any = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                    Factory.forProtocol(Protocol)
                )
            except ConnectError:
                await deferLater(reactor, 0.1)
                continue
            connected.transport.loseConnection()
            return port
        raise AssertionError(f"haproxy did not listen: {child.output[-2000:]!r}")

    async def servers(self) -> dict[str, tuple[str, str]]:
        """HAProxy's view of each relay: its status (UP, DOWN) and its last check's result."""
        answer = await ask_unix(self.stats.child("haproxy.sock").path, b"show stat\n")
        header, *rows = answer.decode().splitlines()
        columns = header.lstrip("# ").split(",")
        found = {}
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("svname", "").startswith("relay"):
                found[fields["svname"]] = (fields["status"], fields["check_status"])
        return found

    async def until_servers(self, wanted: dict[str, tuple[str, str]]) -> None:
        """Wait (up to 30 s) until HAProxy sees the relays as C{wanted}."""
        seen: dict[str, tuple[str, str]] = {}
        for _ in range(150):
            seen = await self.servers()
            if all(seen.get(name) == state for name, state in wanted.items()):
                return
            await deferLater(reactor, 0.2)
        raise AssertionError(f"HAProxy sees {seen}, not {wanted}")

    async def test_pair_and_run_through_haproxy(self) -> None:
        """
        Through HAProxy (TCP, leastconn), which sends each connection to either
        relay: a bridge pairs and connects, a tab runs a command on it, and
        with one relay killed the next tab and the bridge still find each other.
        """
        await self.start_deployment()
        port = await self.start_haproxy()
        await self.until_servers({"relay1": ("UP", "L7OK"), "relay2": ("UP", "L7OK")})
        self.balancer.backends = [port]  # the deployment's address now leads to HAProxy
        bridge = await self.pair_bridge(code_on=0, redeem_on=0, max_delay=1.0)
        self.balancer.backends = [port]
        ide = await self.browser.connect_ide()
        self.addCleanup(ide.close)
        result = await ide.run(1, {"shell": "echo through-haproxy"})
        self.assertEqual(result.stdout, b"through-haproxy\n")
        os.kill(self.nodes[0].pid, signal.SIGKILL)
        await self.nodes[0].child.ended
        await ide.lost
        # Until HAProxy and the directory have let the dead relay go, and the bridge has
        # connected again where the session now lives (relay2 claims it, and closes a
        # bridge that was there to let it back): a new tab each time.  This tab makes
        # channels only to the bridges of its first PRESENCE, so one that came too soon
        # has its command refused (KEY_ERROR), and waits no longer for it.
        stdout, deadline = b"", reactor.seconds() + 90
        for stream in range(2, 1000):
            with contextlib.suppress(Exception):
                ide = await self.browser.connect_ide()
                self.addCleanup(ide.close)
                run = ide.run(stream, {"shell": "echo still-through-haproxy"}, timeout=5)
                stdout = (await run).stdout
            if stdout or reactor.seconds() > deadline:
                break
            await deferLater(reactor, 0.2)
        self.assertEqual(stdout, b"still-through-haproxy\n")
        await bridge.when_connected()

    async def test_node_without_redis_leaves_rotation(self) -> None:
        """
        Node B loses Redis: its /readyz answers 503 ("store: unreachable"),
        HAProxy takes it out of rotation (its check fails with status 503), and
        every code asked for through HAProxy meanwhile is issued by node A.
        Once B reaches Redis again, HAProxy puts it back.
        """
        await self.start_deployment()
        port = await self.start_haproxy()
        await self.until_servers({"relay1": ("UP", "L7OK"), "relay2": ("UP", "L7OK")})
        self.cut_redis_proxy()
        await self.until_servers({"relay1": ("UP", "L7OK"), "relay2": ("DOWN", "L7STS")})
        ready = await fetch_plain(self.metrics_ports[1], "/readyz")
        self.assertEqual(
            ready, (503, "not ready\nlistening: ok\nstore: unreachable\ncertificate: ok\n")
        )
        self.balancer.backends = [port]
        for _ in range(4):  # each would be 503 on node B
            await self.browser.new_code()
        self.reach_redis()
        await self.until_servers({"relay1": ("UP", "L7OK"), "relay2": ("UP", "L7OK")})


class _Collect(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


async def ask_unix(path: str, request: bytes) -> bytes:
    """Send C{request} on a UNIX socket; everything answered until it closes."""
    protocol = _Collect(request)
    await UNIXClientEndpoint(reactor, path).connect(Factory.forProtocol(lambda: protocol))
    return await protocol.done.addTimeout(10, reactor)


async def fetch_plain(port: int, path: str) -> tuple[int, str]:
    """GET C{path} on 127.0.0.1:C{port} in plain HTTP: status and body."""
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    return response.code, (await readBody(response)).decode()
