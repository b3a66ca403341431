"""
What every benchmark needs: processes, /proc readings, a relay, pairing, and
WebSocket clients.

The systems under test run in processes of their own (the relay as
C{twistd coder1-relay}, the bridge from L{bench.bridge_main}, the naive relay
and the peers), so that the benchmark's clients, which run here in one Twisted
reactor, do not count in their CPU time.  Everything listens on 127.0.0.1 only,
every wait has a timeout, and every process started here is stopped by
L{stop_all} (the entry point and the tests call it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from io import BytesIO
from pathlib import Path
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_wire.e2e import Identity, Initiator, IntegrityError, SecureChannel, b64u, unb64u
from coder1_wire.envelope import Envelope, Kind, decode, is_end_to_end
from coder1_wire.tls import client_tls_options

reactor: Any = _reactor

#: This repository's root: where the bench package is.
ROOT = Path(__file__).resolve().parent.parent
#: The source tree of the relay and bridge under test: this repository, or a snapshot
#: of it (C{CODER1_BENCH_TREE}, e.g. C{git archive HEAD} unpacked) so that a run
#: measures one known commit while the work tree changes.
TREE = Path(os.environ.get("CODER1_BENCH_TREE") or ROOT).resolve()
#: Another source tree (C{--before DIR}) whose relay and bridge get rows of their own,
#: named with L{BEFORE_SUFFIX}, in the same invocation: a change's before and after
#: measured side by side, the systems taking turns within each round.
BEFORE: Path | None = None
BEFORE_SUFFIX = " (before)"


@contextlib.contextmanager
def running_from(tree: Path | None) -> Iterator[None]:
    """Processes started inside run from C{tree} (L{TREE} when None)."""
    global TREE
    if tree is None:
        yield
        return
    saved, TREE = TREE, tree
    try:
        yield
    finally:
        TREE = saved


#: Where a bench run keeps its temporary state (state dirs, configs, certificates).
TMP_PREFIX = "coder1-bench-"


# --------------------------------------------------------------------------- processes


class Timeout(Exception):
    """A bounded wait ran out."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours, this tree first on PYTHONPATH, no telemetry."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    tree = [str(TREE)] if TREE == ROOT else [str(TREE), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([*tree, *([path] if path else [])])
    env["CODER1_TELEMETRY"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class _Output(ProcessProtocol):
    def __init__(self, process: Process) -> None:
        self.process = process

    def outReceived(self, data: bytes) -> None:
        self.process._received(data)

    def errReceived(self, data: bytes) -> None:
        self.process._received(data)

    def processEnded(self, reason: Failure) -> None:
        self.process._ended(reason)


_LIVE: set[Process] = set()


class Process:
    """
    A child process: its output kept (bounded) and searchable, and ways to stop it.

    @ivar started: C{time.perf_counter()} just before the spawn.
    """

    MAX_KEPT = 1 << 20

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        pty: bool = False,
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.output = bytearray()
        self.on_output = on_output
        self._waiters: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []
        self.exited: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.started = time.perf_counter()
        self.transport = reactor.spawnProcess(
            _Output(self),
            argv[0],
            argv,
            env=env if env is not None else child_env(),
            path=cwd,
            usePTY=pty,
        )
        self.pid: int = self.transport.pid
        _LIVE.add(self)

    def _received(self, data: bytes) -> None:
        if self.on_output is not None:
            self.on_output(data)
        self.output += data
        for pattern, d in list(self._waiters):
            match = pattern.search(self.output)
            if match:
                self._waiters.remove((pattern, d))
                d.callback(match)
        if len(self.output) > self.MAX_KEPT:
            del self.output[: len(self.output) - self.MAX_KEPT // 2]

    def _ended(self, reason: Failure) -> None:
        _LIVE.discard(self)
        self.exit_code = getattr(reason.value, "exitCode", None)
        for _, d in self._waiters:
            d.errback(RuntimeError(f"{self.name} exited: {self.tail()}"))
        self._waiters.clear()
        self.exited.callback(self.exit_code)

    def tail(self, size: int = 2000) -> str:
        return bytes(self.output[-size:]).decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return not self.exited.called

    async def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[bytes]:
        """The first match of C{pattern} (a regex) in the output, now or later."""
        compiled = re.compile(pattern.encode())
        match = compiled.search(self.output)
        if match:
            return match
        if not self.running:
            raise RuntimeError(f"{self.name} exited: {self.tail()}")
        d: Deferred[re.Match[bytes]] = Deferred()
        self._waiters.append((compiled, d))
        return await with_timeout(d, timeout, f"{self.name}: waiting for {pattern!r}")

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(sig)

    async def stop(self, grace: float = 5.0) -> None:
        """TERM, then KILL after C{grace} seconds; returns once it has exited."""
        if not self.running:
            return
        if os.environ.get("CODER1_BENCH_PROFILE_DIR"):
            grace = max(grace, 120.0)  # writing the profile takes a while
        self.signal(signal.SIGTERM)
        timer = reactor.callLater(grace, self.signal, signal.SIGKILL)
        await self.exited
        if timer.active():
            timer.cancel()


async def stop_all() -> None:
    """Stop every process this run started (the bench's own cleanup)."""
    await gatherResults([Deferred.fromCoroutine(p.stop()) for p in list(_LIVE)])


def kill_all_now() -> None:
    """KILL every process still running, without waiting (last resort at exit)."""
    for p in list(_LIVE):
        p.signal(signal.SIGKILL)


async def with_timeout(d: Deferred[Any], timeout: float, what: str) -> Any:
    """Await C{d}, or raise L{Timeout} after C{timeout} seconds."""

    def timed_out(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure):
            from twisted.internet.defer import CancelledError

            if result.check(CancelledError):
                raise Timeout(f"{what}: no answer in {timeout:g}s")
        return result

    d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    return await d


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of C{pid} so far (schedstat: nanoseconds, not ticks)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total / 1e9


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of C{pid} and its live descendants (a bridge and its commands)."""
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of C{pid}, in bytes."""
    result = {"rss": 0, "peak": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    result["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    result["peak"] = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return result


class PeakSampler:
    """Samples the RSS of some processes every C{interval} seconds; keeps the highest."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        from twisted.internet.task import LoopingCall

        self.pids = pids
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._loop.start(interval)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], memory(pid)["rss"])

    def stop(self) -> dict[str, int]:
        if self._loop.running:
            self._loop.stop()
        self._sample()
        return self.peak


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    """What the results were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import autobahn
    import cryptography
    import OpenSSL

    import twisted

    return {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "python": sys.version.split()[0],
        "twisted": twisted.__version__,
        "autobahn": autobahn.__version__,
        "cryptography": cryptography.__version__,
        "pyopenssl": OpenSSL.__version__,
        "kernel": os.uname().release,
    }


# --------------------------------------------------------------------------- the relay


@attrs.define
class Relay:
    """A relay process under test and how to reach it."""

    process: Process
    port: int
    tls: bool
    cert_pem: bytes
    state_dir: str

    @property
    def public_url(self) -> str:
        """The relay's own URL: its origin, what bridges are told to reach."""
        return f"https://localhost:{self.port}"

    @property
    def origin(self) -> str:
        return self.public_url

    def tls_creator(self) -> IOpenSSLClientConnectionCreator | None:
        return client_tls_options("localhost", self.cert_pem) if self.tls else None

    def endpoint(
        self,
        source: str | None = None,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> IStreamClientEndpoint:
        """A client endpoint to the relay, from the loopback address C{source}."""
        tcp = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port, timeout=30, bindAddress=(source, 0) if source else None
        )
        creator = creator or self.tls_creator()
        if creator is None:
            return tcp
        return wrapClientTLS(creator, tcp)

    def ws_url(self, path: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://localhost:{self.port}{path}"


def relay_supports(feature: str) -> bool:
    """
    Whether the relay in L{TREE} has C{feature}: C{"/api/pair/key"} (the two-step
    pairing), C{"bridge keep-alive"} (the bridge's pairing requests on one connection)
    or C{"--messages-per-second"} (per-connection limits), from its source.
    """
    if feature == "/api/pair/key":
        return b"post_pair_key" in (TREE / "coder1_relay" / "web.py").read_bytes()
    if feature == "bridge keep-alive":
        return b"persistent=True" in (TREE / "coder1_bridge" / "relay_api.py").read_bytes()
    if feature == "resume":
        return b"RESUME = 0x40" in (TREE / "coder1_wire" / "envelope.py").read_bytes()
    return f'"{feature.lstrip("-")}"'.encode() in (TREE / "coder1_relay" / "tap.py").read_bytes()


#: The relay's per-connection message limits, raised: the benchmarks' clients type and
#: send far faster than a person (a relay that has no such options gets none).
UNLIMITED = [
    "--messages-per-second=1000000",
    "--message-burst=1000000",
    "--bridge-messages-per-second=1000000",
    "--bridge-message-burst=1000000",
]


def twistd() -> list[str]:
    """The C{twistd} of this interpreter's environment (or the same program through -c)."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


async def start_relay(*, tls: bool = True) -> Relay:
    """
    A relay on a free loopback port with a fresh state directory.

    With C{tls} (the product): C{twistd --nodaemon coder1-relay}, exactly as an operator
    runs it.  Without: L{bench.relay_main}, the same relay service without its TLS layer,
    for the plain-WebSocket rows of the forwarding benchmark only.
    """
    state_dir = tempfile.mkdtemp(prefix=TMP_PREFIX + "relay-")
    if tls:
        argv = [*twistd(), "--nodaemon", "--pidfile=", "coder1-relay"]
    else:
        argv = [sys.executable, "-m", "bench.relay_main", "--plain"]
    argv = profiled("relay", argv)
    argv += ["--listen", "tcp:0:interface=127.0.0.1", "--state-dir", state_dir]
    if relay_supports("--messages-per-second"):
        argv += UNLIMITED
    process = Process("relay", argv, cwd=str(TREE))
    match = await process.wait_for(r"coder1 relay at https://localhost:(\d+)", timeout=60)
    cert = Path(state_dir, "dev-cert.pem").read_bytes()
    return Relay(process, int(match.group(1)), tls, cert, state_dir)


# --------------------------------------------------------------------------- HTTP


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _ToRelay:
    relay: Relay
    source: str | None
    creator: IOpenSSLClientConnectionCreator | None

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.relay.endpoint(self.source, self.creator)


@attrs.frozen
class Reply:
    status: int
    body: dict[str, Any]
    headers: Headers


class HTTP:
    """
    An HTTP client of one relay, from one loopback source address (so rate limits
    per client IP apply per simulated user), with keep-alive when C{persistent}.
    """

    def __init__(
        self,
        relay: Relay,
        source: str | None = None,
        *,
        persistent: bool = False,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self.relay = relay
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.agent = Agent.usingEndpointFactory(
            reactor, _ToRelay(relay, source, creator or relay.tls_creator()), self.pool
        )

    async def request(
        self,
        method: bytes,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        h = Headers({b"Content-Type": [b"application/json"]})
        for name, value in (headers or {}).items():
            h.addRawHeader(name.encode(), value.encode())
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode())) if body else None
        scheme = "https" if self.relay.tls else "http"
        url = f"{scheme}://localhost:{self.relay.port}{path}".encode()
        response = await self.agent.request(method, url, h, producer)
        raw = await readBody(response)
        decoded = json.loads(raw) if raw.startswith(b"{") else {}
        return Reply(response.code, decoded, response.headers)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


@attrs.frozen
class Pairing:
    """A browser session paired with one bridge: what each side holds afterwards."""

    cookie: str
    token: str
    peer: int
    browser_key: str
    bridge: Identity

    def bridge_config(self, relay: Relay) -> BridgeConfig:
        address = RelayAddress(relay.public_url, relay.cert_pem.decode())
        return BridgeConfig(address, self.token, self.peer, self.browser_key, self.bridge)


def _cookie(headers: Headers) -> str:
    for value in headers.getRawHeaders(b"set-cookie", []):
        jar: SimpleCookie = SimpleCookie(value.decode("latin-1"))
        for name, morsel in jar.items():
            if name == "__Host-coder1-session":
                return f"{name}={morsel.value}"
    raise RuntimeError("the relay set no session cookie")


async def pair(
    relay: Relay,
    browser: Identity,
    bridge: Identity,
    *,
    source: str | None = None,
    creator: IOpenSSLClientConnectionCreator | None = None,
    label: str = "bench",
) -> Pairing:
    """
    What a user does to pair, over the relay's real API: the page gets a session and
    a code (one keep-alive connection, as a browser would), then the bridge redeems
    the code on a connection of its own (as C{coder1-bridge pair} does).
    """
    page = HTTP(relay, source, persistent=True, creator=creator)
    try:
        origin = {"Origin": relay.origin}
        reply = await page.request(b"POST", "/api/session", headers=origin)
        assert reply.status == 200, reply
        cookie = _cookie(reply.headers)
        reply = await page.request(
            b"POST",
            "/api/pairing-codes",
            {"browser_key": b64u(browser.public_raw)},
            {**origin, "Cookie": cookie},
        )
        if reply.status != 201:
            raise RuntimeError(f"no pairing code: {reply.status} {reply.body}")
        code = reply.body["code"]
    finally:
        # Bounded: closing a TLS connection waits for the peer, which may not answer.
        with contextlib.suppress(Timeout):
            await with_timeout(
                Deferred.fromCoroutine(page.close()), 10, "closing the page's connection"
            )
    # As `coder1-bridge pair` does: one kept-alive connection for its requests where the
    # tree's bridge has it, else one connection per request.  Since 285d644 the bridge
    # redeems the code first and sends its own key afterwards (POST /api/pair/key);
    # before, the key went with the code.
    two_steps = relay_supports("/api/pair/key")
    keep_alive = relay_supports("bridge keep-alive")
    redeem = {"code": code, "label": label}
    if not two_steps:
        redeem["bridge_key"] = b64u(bridge.public_raw)
    api = HTTP(relay, source, persistent=keep_alive, creator=creator)
    try:
        reply = await api.request(b"POST", "/api/pair", redeem)
        if reply.status != 200:
            raise RuntimeError(f"pairing refused: {reply.status} {reply.body}")
        if two_steps:
            answer = await api.request(
                b"POST",
                "/api/pair/key",
                {"bridge_key": b64u(bridge.public_raw)},
                {"Authorization": f"Bearer {reply.body['token']}"},
            )
            if answer.status != 200:
                raise RuntimeError(f"bridge key refused: {answer.status} {answer.body}")
    finally:
        with contextlib.suppress(Timeout):
            await with_timeout(
                Deferred.fromCoroutine(api.close()), 10, "closing the bridge's connection"
            )
    body = reply.body
    return Pairing(cookie, body["token"], int(body["peer"]), body["browser_key"], bridge)


# --------------------------------------------------------------------------- WebSockets


class WSProtocol(WebSocketClientProtocol):
    """A client WebSocket: hands every message to its factory's C{on_message}."""

    factory: WSFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        # As browsers do.  (Autobahn's own tcpNoDelay option does not reach the socket
        # of a client connection: docs/performance.md, findings.)
        transport: Any = self.transport
        transport.setTcpNoDelay(True)

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.on_message(payload, isBinary)

    def set_handler(self, on_message: Callable[[bytes, bool], None]) -> None:
        self.factory.on_message = on_message

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError(f"refused: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


class WSFactory(WebSocketClientFactory):
    protocol = WSProtocol  # type: ignore[assignment]  # stubs want a TypeVar

    def __init__(self, url: str, on_message: Callable[[bytes, bool], None], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.on_message = on_message
        self.opened: Deferred[WSProtocol] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        # The same options the bridge uses; no compression anywhere.
        self.setProtocolOptions(
            maxFramePayloadSize=16 * 1024 * 1024,
            maxMessagePayloadSize=16 * 1024 * 1024,
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
        )


async def connect_ws(
    endpoint: IStreamClientEndpoint,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    origin: str | None = None,
    on_message: Callable[[bytes, bool], None] | None = None,
    timeout: float = 30.0,
) -> WSProtocol:
    """Open a WebSocket through C{endpoint}; messages go to C{on_message} from the start."""
    factory = WSFactory(
        url, on_message or (lambda payload, binary: None), headers=headers or {}, origin=origin
    )
    await endpoint.connect(factory)
    protocol: WSProtocol = await with_timeout(factory.opened, timeout, f"opening {url}")
    return protocol


@attrs.define(eq=False)
class RelayLink:
    """
    One connection to the relay, browser's or bridge's: answers PINGs like the page
    and the bridge do, and hands every other frame (as raw bytes) to C{on_frame}.
    """

    protocol: WSProtocol | None = None
    on_frame: Callable[[bytes], None] | None = None
    welcomed: Deferred[bytes] = attrs.field(factory=Deferred)
    #: Seconds between the PINGs the relay asked for in WELCOME (L{keep_pinging}).
    heartbeat: float = 15.0

    def received(self, payload: bytes, binary: bool) -> None:
        kind = payload[1] if len(payload) > 1 else 0
        if kind == Kind.PING:
            self.send(Envelope(Kind.PONG).encode())
            return
        if kind == Kind.WELCOME and not self.welcomed.called:
            asked = decode(payload).json().get("heartbeat")
            if isinstance(asked, int | float) and math.isfinite(asked):
                self.heartbeat = min(30.0, max(5.0, float(asked)))
            self.welcomed.callback(payload)
            return
        if self.on_frame is not None:
            self.on_frame(payload)

    def send(self, frame: bytes) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(frame, isBinary=True)

    def closed(self) -> Deferred[tuple[int | None, str | None]]:
        """Fires with the close code and reason when this connection ends."""
        assert self.protocol is not None
        return self.protocol.factory.closed

    def keep_pinging(self) -> None:
        """
        PING the relay every C{heartbeat} seconds until closed, the first one
        interval from now, as the bridge and the page do (docs/protocol.md section 7).
        """
        pings = LoopingCall(self.send, Envelope(Kind.PING).encode())
        pings.start(self.heartbeat, now=False)
        self.closed().addBoth(lambda _: pings.stop() if pings.running else None)

    def close(self) -> Deferred[Any]:
        if self.protocol is None:
            d: Deferred[Any] = Deferred()
            d.callback(None)
            return d
        self.protocol.sendClose(1000)
        return self.protocol.factory.closed


async def open_ide_link(
    relay: Relay,
    cookie: str,
    *,
    source: str | None = None,
    creator: IOpenSSLClientConnectionCreator | None = None,
    on_frame: Callable[[bytes], None] | None = None,
    link: RelayLink | None = None,
) -> RelayLink:
    """The browser's IDE WebSocket (cookie and Origin as the page sends them)."""
    link = link or RelayLink(on_frame=on_frame)
    link.protocol = await connect_ws(
        relay.endpoint(source, creator),
        relay.ws_url("/ws/ide"),
        headers={"Cookie": cookie},
        origin=relay.origin,
        on_message=link.received,
    )
    await with_timeout(link.welcomed, 30, "WELCOME on /ws/ide")
    return link


async def open_bridge_link(
    relay: Relay,
    token: str,
    *,
    source: str | None = None,
    creator: IOpenSSLClientConnectionCreator | None = None,
    on_frame: Callable[[bytes], None] | None = None,
) -> RelayLink:
    """A bridge's WebSocket, without the bridge: for forwarding and capacity runs."""
    link = RelayLink(on_frame=on_frame)
    link.protocol = await connect_ws(
        relay.endpoint(source, creator),
        relay.ws_url("/ws/bridge"),
        headers={
            "Authorization": f"Bearer {token}",
            "X-Coder1-Bridge-Version": "0.1.0",
            "X-Coder1-Label": "bench",
            "X-Coder1-Telemetry": "off",
        },
        on_message=link.received,
    )
    await with_timeout(link.welcomed, 30, "WELCOME on /ws/bridge")
    return link


@attrs.define(eq=False)
class IDE:
    """
    The browser side of the full system: an IDE link with an end-to-end channel to
    bridge C{peer}, opening what is sealed and handing plaintext frames to C{on_frame}.
    """

    browser: Identity
    link: RelayLink = attrs.field(factory=RelayLink)
    pins: dict[int, bytes] = attrs.field(factory=dict)
    channel: SecureChannel | None = None
    on_frame: Callable[[Envelope], None] | None = None
    _answer: Deferred[Envelope] | None = None
    _presence: Deferred[None] = attrs.field(factory=Deferred)
    refused: int = 0
    #: Whether the bridge resumes (section 5.7): output is then acknowledged.
    resumed: bool = False
    acked: dict[tuple[str, int], int] = attrs.field(factory=dict)

    def frame(self, raw: bytes) -> None:
        envelope = decode(raw)
        kind = envelope.kind
        if kind in (Kind.PRESENCE, Kind.PAIRED):
            body = envelope.json()
            for b in body["bridges"] if kind == Kind.PRESENCE else [body]:
                self.pins.setdefault(b["peer"], unb64u(b["bridge_key"]))
            if kind == Kind.PRESENCE and body["bridges"] and not self._presence.called:
                self._presence.callback(None)
            return
        if kind in (Kind.KEY_ANSWER, Kind.KEY_ERROR):
            if self._answer is not None and not self._answer.called:
                self._answer.callback(envelope)
            return
        if is_end_to_end(kind) and self.channel is not None:
            try:
                envelope = self.channel.open(envelope)
            except IntegrityError:
                self.refused += 1
                return
            if self.resumed:
                self._acknowledge(envelope)
        if self.on_frame is not None:
            self.on_frame(envelope)

    async def connect(self, relay: Relay, cookie: str) -> None:
        self.link.on_frame = self.frame
        await open_ide_link(relay, cookie, link=self.link)

    async def bridge_present(self, timeout: float = 60.0) -> None:
        """Until a PRESENCE lists a connected bridge."""
        await with_timeout(self._presence, timeout, "a bridge in PRESENCE")

    async def handshake(self, peer: int = 1) -> None:
        initiator = Initiator(self.browser, self.pins[peer], peer)
        self._answer = Deferred()
        self.link.send(initiator.offer().encode())
        answer = await with_timeout(self._answer, 30, "KEY_ANSWER")
        self.channel = initiator.accept(answer)
        if relay_supports("resume"):
            # As the page does (docs/protocol.md, 5.7): it then acknowledges output.
            self.resumed = True
            body = {"client": "bench", "streams": []}
            self.send(Envelope(Kind.RESUME, 0, 0, peer, json.dumps(body).encode()))

    def _acknowledge(self, envelope: Envelope) -> None:
        """Acknowledge output every half window, as the page does."""
        kind = _OUTPUT_TYPES.get(envelope.kind)
        if kind is None:
            return
        key = (kind, envelope.stream)
        position = envelope.seq + len(envelope.payload)
        if position - self.acked.get(key, 0) >= RESUME_WINDOW // 2:
            self.acked[key] = position
            body = {"streams": [{"type": kind, "stream": envelope.stream, "next": position}]}
            self.send(Envelope(Kind.ACK, 0, 0, envelope.peer, json.dumps(body).encode()))

    def send(self, envelope: Envelope) -> None:
        if self.channel is not None and is_end_to_end(envelope.kind):
            self.link.send(self.channel.seal_frame(envelope))
            return
        self.link.send(envelope.encode())


#: The bridge's default send window; the IDE acknowledges every half of it.
RESUME_WINDOW = 512 * 1024
_OUTPUT_TYPES: dict[int, str] = {
    Kind.PTY_OPENED: "pty",
    Kind.PTY_OUTPUT: "pty",
    Kind.CMD_STDOUT: "cmd",
    Kind.CMD_STDERR: "cmd",
}


async def start_bridge(relay: Relay, pairing: Pairing) -> Process:
    """The bridge under test in its own process (L{bench.bridge_main}), once it is connected."""
    config_dir = tempfile.mkdtemp(prefix=TMP_PREFIX + "bridge-")
    pairing.bridge_config(relay).save(_filepath(config_dir))
    process = spawn_bridge(config_dir)
    await process.wait_for(r"bench-bridge ready", timeout=60)
    return process


def spawn_bridge(config_dir: str) -> Process:
    argv = profiled("bridge", [sys.executable, "-m", "bench.bridge_main", config_dir])
    return Process("bridge", argv, cwd=str(TREE))


def profiled(name: str, argv: list[str]) -> list[str]:
    """
    C{argv} under cProfile when C{CODER1_BENCH_PROFILE_DIR} is set: the relay and the
    bridge then write C{NAME-PID.prof} there when they stop (for docs/performance.md).
    """
    directory = os.environ.get("CODER1_BENCH_PROFILE_DIR")
    if not directory:
        return argv
    os.makedirs(directory, exist_ok=True)
    out = os.path.join(directory, f"{name}-{time.time_ns()}.prof")
    if argv[0] == sys.executable and argv[1] == "-m":
        return [sys.executable, "-m", "cProfile", "-o", out, "-m", *argv[2:]]
    return [sys.executable, "-m", "cProfile", "-o", out, *argv]


def _filepath(path: str) -> Any:
    from twisted.python.filepath import FilePath

    return FilePath(path)


@attrs.define
class FullSystem:
    """A relay, a paired bridge process, and an IDE with a channel to it."""

    relay: Relay
    bridge: Process
    ide: IDE


async def full_system() -> FullSystem:
    """Start the relay and a bridge, pair them, connect the IDE, open the channel."""
    relay = await start_relay()
    browser = Identity.generate()
    pairing = await pair(relay, browser, Identity.generate())
    bridge = await start_bridge(relay, pairing)
    ide = IDE(browser)
    await ide.connect(relay, pairing.cookie)
    await ide.bridge_present()
    await ide.handshake(pairing.peer)
    return FullSystem(relay, bridge, ide)


# --------------------------------------------------------------------------- the naive relay


@attrs.define
class NaiveRelay:
    """The baseline: a few lines of Autobahn that forward each message to the other side."""

    process: Process
    port: int
    tls: bool
    cert_pem: bytes

    def endpoint(self, source: str | None = None) -> IStreamClientEndpoint:
        tcp = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port, timeout=30, bindAddress=(source, 0) if source else None
        )
        if not self.tls:
            return tcp
        return wrapClientTLS(client_tls_options("localhost", self.cert_pem), tcp)

    def ws_url(self, path: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://localhost:{self.port}{path}"


async def start_naive_relay(*, tls: bool, cert: CertFiles | None = None) -> NaiveRelay:
    argv = [sys.executable, "-m", "bench.naive_relay"]
    cert_pem = b""
    if tls:
        cert = cert or make_cert()
        argv += ["--tls-cert", cert.cert, "--tls-key", cert.key]
        cert_pem = Path(cert.cert).read_bytes()
    process = Process("naive-relay", profiled("naive-relay", argv), cwd=str(ROOT))
    match = await process.wait_for(r"naive relay listening on (\d+)", timeout=30)
    return NaiveRelay(process, int(match.group(1)), tls, cert_pem)


@attrs.frozen
class CertFiles:
    """A self-signed certificate for localhost and 127.0.0.1 (for the baselines' servers)."""

    cert: str
    key: str

    @property
    def pem(self) -> bytes:
        return Path(self.cert).read_bytes()


def make_cert() -> CertFiles:
    """The relay's own dev-certificate code makes it, so every server uses the same kind."""
    from coder1_relay import certs

    directory = tempfile.mkdtemp(prefix=TMP_PREFIX + "cert-")
    certs.load_or_create(
        _filepath(directory), tls_cert=None, tls_key=None, hostnames=("localhost", "127.0.0.1")
    )
    return CertFiles(
        os.path.join(directory, certs.DEV_CERT_NAME), os.path.join(directory, certs.DEV_KEY_NAME)
    )


def free_port() -> int:
    """A loopback port free right now (for servers that cannot report the one they got)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- peers


def peer_python() -> str:
    """The interpreter the peers (termpair, terminado) are installed in."""
    return os.environ.get("CODER1_BENCH_PEER_PYTHON") or sys.executable


_AVAILABLE: dict[str, bool] = {}


def peer_available(module: str) -> bool:
    """Whether C{module} imports in L{peer_python} (asked once per run)."""
    if module not in _AVAILABLE:
        import subprocess

        result = subprocess.run(
            [peer_python(), "-c", f"import {module}"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        _AVAILABLE[module] = result.returncode == 0
    return _AVAILABLE[module]


async def settle(limit: float = 5.0) -> None:
    """
    Wait for Autobahn's batched timers to drain (txaio keeps a bucket's call scheduled
    for up to a second after its timeouts are cancelled), so a test's reactor is clean.
    """
    deadline = reactor.seconds() + limit
    quiet = 0
    while reactor.seconds() < deadline and quiet < 3:
        pending = any("_notify_bucket" in repr(c.func) for c in reactor.getDelayedCalls())
        quiet = 0 if pending else quiet + 1
        await sleep(0.05)
