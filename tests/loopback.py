"""
A real relay, a real bridge and a scripted browser on loopback, for end-to-end tests.

Everything speaks real TLS 1.3 and real WebSockets: the relay is the
service C{twistd coder1-relay} runs, the bridge is the service
C{coder1-bridge start} runs, and L{Browser} does what the IDE page does
(session cookie, pairing code, IDE WebSocket with an Origin header).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from http.cookiejar import CookieJar
from io import BytesIO
from typing import Any, cast

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, CookieAgent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_bridge.pairing import pair
from coder1_bridge.service import BridgeService
from coder1_relay.certs import DEV_CERT_NAME
from coder1_relay.service import RelayService, RelaySettings
from coder1_wire.e2e import (
    Identity,
    Initiator,
    IntegrityError,
    SecureChannel,
    b64u,
    channel_of,
    unb64u,
)
from coder1_wire.envelope import Envelope, Kind, control, decode, is_end_to_end
from coder1_wire.tls import client_tls_options

_KEY_KINDS = (Kind.KEY_OFFER, Kind.KEY_ANSWER, Kind.KEY_ERROR)

reactor: Any = _reactor


async def start_relay(state_dir: FilePath[str], **settings: Any) -> RelayService:
    """A relay on a free loopback port, with its dev certificate."""
    relay = RelayService(
        reactor,
        RelaySettings(state_dir=state_dir, **{"listen": "tcp:0:interface=127.0.0.1", **settings}),
    )
    relay.startService()
    await relay.listening
    return relay


@implementer(IPolicyForHTTPS)
class RelayTrust:
    """An HTTPS policy for a test's own Agent: TLS 1.3, trusting the given certificate."""

    def __init__(self, ca_cert_pem: str | None) -> None:
        self.ca = ca_cert_pem.encode() if ca_cert_pem else None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return client_tls_options(hostname.decode("idna"), self.ca)


def relay_address(relay: RelayService) -> RelayAddress:
    """How a client reaches C{relay}: its URL and its dev certificate as trust root."""
    return RelayAddress(relay.context.public_url, relay.keys.tls_cert_pem.decode())


class IDEClientProtocol(WebSocketClientProtocol):
    """The browser's IDE WebSocket: records every frame it gets."""

    factory: IDEClientFactory

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.connection.arrived(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connection.closed(code, reason)
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionRefusedByRelay(reason or ""))


class ConnectionRefusedByRelay(Exception):
    """The relay refused the WebSocket handshake (the reason says why)."""


class IDEClientFactory(WebSocketClientFactory):
    protocol = IDEClientProtocol  # type: ignore[assignment]  # stubs want a TypeVar

    def __init__(self, url: str, connection: IDEConnection, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.connection = connection
        self.opened: Deferred[IDEClientProtocol] = Deferred()


@attrs.define
class IDEConnection:
    """
    One IDE WebSocket: what arrived (opened, when sealed), and ways to wait
    for more.  Like the page, it pins each bridge's key on first sight and
    talks to a bridge only through a channel (docs/e2e.md).
    """

    identity: Identity
    frames: list[Envelope] = attrs.field(factory=list)
    raw: list[bytes] = attrs.field(factory=list)
    pins: dict[int, bytes] = attrs.field(factory=dict)
    channels: dict[int, SecureChannel] = attrs.field(factory=dict)
    refused: list[str] = attrs.field(factory=list)
    protocol: IDEClientProtocol | None = None
    close_code: int | None = None
    close_reason: str | None = None
    lost: Deferred[None] = attrs.field(factory=Deferred)
    _waiters: list[tuple[Callable[[Envelope], bool], Deferred[Envelope]]] = attrs.field(
        factory=list
    )

    def arrived(self, frame: bytes) -> None:
        """A frame from the relay: pin keys, open what is sealed for us, keep the rest."""
        self.raw.append(frame)
        envelope = decode(frame)
        if envelope.kind in (Kind.PRESENCE, Kind.PAIRED):
            body = envelope.json()
            for bridge in body["bridges"] if envelope.kind == Kind.PRESENCE else [body]:
                self.pins.setdefault(bridge["peer"], unb64u(bridge["bridge_key"]))
        elif is_end_to_end(envelope.kind) and envelope.kind not in _KEY_KINDS:
            channel = self.channels.get(envelope.peer)
            if channel is None or channel_of(envelope) != channel.channel:
                return
            try:
                envelope = channel.open(envelope)
            except IntegrityError as e:
                self.refused.append(e.verdict)
                return
        self.received(envelope)

    async def handshake(self, peer: int) -> SecureChannel:
        """Open a channel with bridge C{peer}, whose key must be pinned already."""
        assert self.protocol is not None
        initiator = Initiator(self.identity, self.pins[peer], peer)
        offer = initiator.offer()
        channel = offer.json()["channel"]
        self.protocol.sendMessage(offer.encode(), isBinary=True)
        answer = await self.wait_for(
            lambda e: (
                e.kind in (Kind.KEY_ANSWER, Kind.KEY_ERROR)
                and e.peer == peer
                and e.json().get("channel") in (channel, 0)
            )
        )
        self.channels[peer] = initiator.accept(answer)
        return self.channels[peer]

    def received(self, envelope: Envelope) -> None:
        self.frames.append(envelope)
        for waiter in list(self._waiters):
            if waiter[0](envelope):
                self._waiters.remove(waiter)
                waiter[1].callback(envelope)

    def closed(self, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self.lost.called:
            self.lost.callback(None)

    def wait_for(
        self, match: Callable[[Envelope], bool], timeout: float = 30
    ) -> Deferred[Envelope]:
        """The first frame, already received or still to come, that matches."""
        for envelope in self.frames:
            if match(envelope):
                d: Deferred[Envelope] = Deferred()
                d.callback(envelope)
                return d
        d = Deferred()
        self._waiters.append((match, d))
        return d.addTimeout(timeout, reactor)

    def send(self, envelope: Envelope) -> None:
        """Send a frame, sealed when there is a channel to its bridge."""
        assert self.protocol is not None
        channel = self.channels.get(envelope.peer)
        if channel is not None and is_end_to_end(envelope.kind):
            envelope = channel.seal(envelope)
        self.protocol.sendMessage(envelope.encode(), isBinary=True)

    async def run(
        self,
        stream: int,
        body: dict[str, Any],
        *,
        peer: int = 1,
        stdin: bytes | None = None,
        timeout: float = 120,
    ) -> CommandResult:
        """Start a command on bridge C{peer}, feed C{stdin}, and collect all it sends back."""
        self.send(control(Kind.CMD_START, body, stream=stream, peer=peer))
        if stdin is not None:
            self.send(Envelope(Kind.CMD_STDIN, stream=stream, seq=1, peer=peer, payload=stdin))
            self.send(Envelope(Kind.CMD_STDIN, stream=stream, seq=2, peer=peer))
        end = await self.wait_for(
            lambda e: e.stream == stream and e.kind in (Kind.CMD_EXIT, Kind.CMD_ERROR, Kind.ERROR),
            timeout=timeout,
        )
        mine = [e for e in self.frames if e.stream == stream and e.peer == peer]
        return CommandResult(
            stdout=b"".join(e.payload for e in mine if e.kind == Kind.CMD_STDOUT),
            stderr=b"".join(e.payload for e in mine if e.kind == Kind.CMD_STDERR),
            end=end,
            frames=mine,
        )

    def close(self) -> Deferred[None]:
        if self.protocol is not None and self.close_code is None:
            self.protocol.sendClose(1000)
        return self.lost


@attrs.frozen
class CommandResult:
    """What came back for one command."""

    stdout: bytes
    stderr: bytes
    end: Envelope
    frames: list[Envelope]

    @property
    def exit(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.end.payload)
        return body


@attrs.define
class Browser:
    """What the IDE page does, over real HTTPS with a cookie jar."""

    relay: RelayService
    cookies: CookieJar = attrs.field(factory=CookieJar)
    origin: str | None = None
    identity: Identity = attrs.field(factory=Identity.generate)

    @property
    def url(self) -> str:
        return self.relay.context.public_url

    def _agent(self) -> CookieAgent:
        trust = RelayTrust(self.relay.keys.tls_cert_pem.decode())
        return CookieAgent(Agent(reactor, contextFactory=trust), self.cookies)

    async def request(
        self,
        method: bytes,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        origin: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], Headers]:
        sent = Headers({b"Content-Type": [b"application/json"]})
        for name, value in (headers or {}).items():
            sent.addRawHeader(name.encode(), value.encode())
        if origin:
            sent.addRawHeader(b"Origin", (self.origin or self.url).encode())
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode())) if body else None
        response = await self._agent().request(method, (self.url + path).encode(), sent, producer)
        raw = await readBody(response)
        decoded = json.loads(raw) if raw.startswith(b"{") else {}
        return response.code, decoded, response.headers

    async def open_page(self) -> None:
        """Load the page, which then starts its browser session (a cookie), as the page does."""
        response = await self._agent().request(b"GET", (self.url + "/").encode())
        await readBody(response)
        status, _, _ = await self.request(b"POST", "/api/session")
        assert status == 200, status

    async def new_code(self) -> str:
        key = b64u(self.identity.public_raw)
        status, body, _ = await self.request(b"POST", "/api/pairing-codes", {"browser_key": key})
        assert status == 201, (status, body)
        return str(body["code"])

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.cookies)

    async def connect_ide(
        self,
        origin: str | None = None,
        *,
        handshake: bool = True,
        connection: IDEConnection | None = None,
    ) -> IDEConnection:
        """
        Open the IDE WebSocket with this browser's cookie (and channels to its
        bridges), as C{connection} if given (a subclass that handles frames its way).
        """
        connection = connection or IDEConnection(self.identity)
        factory = IDEClientFactory(
            self.url.replace("https", "wss", 1) + "/ws/ide",
            connection,
            origin=origin or self.origin or self.url,
            headers={"Cookie": self.cookie_header()},
        )
        endpoint = wrapClientTLS(
            client_tls_options("localhost", self.relay.keys.tls_cert_pem),
            HostnameEndpoint(reactor, "127.0.0.1", self.relay.port.getHost().port),  # type: ignore[union-attr]
        )
        await endpoint.connect(factory)
        connection.protocol = await factory.opened
        presence = await connection.wait_for(lambda e: e.kind == Kind.PRESENCE)
        for bridge in presence.json()["bridges"] if handshake else []:
            await connection.handshake(bridge["peer"])
        return connection


class RelayAndPage(TestCase):
    """
    A real relay on loopback (C{self.relay}), a browser session with its page
    open (C{self.browser}), the relay's certificate in a file (C{self.ca}) and a
    config directory for a bridge (C{self.config_dir}); C{start} is for
    subclasses to extend.
    """

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        return Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        await self.browser.open_page()
        self.config_dir = FilePath(self.mktemp())
        self.ca = FilePath(self.mktemp())
        self.ca.setContent(self.relay.keys.tls_cert_pem)


async def pair_bridge(
    browser: Browser, config_dir: FilePath[str], out: Any, label: str = "test-host"
) -> BridgeConfig:
    """Do what a user does: get a code in the browser, redeem it with C{coder1-bridge pair}."""
    return await redeem(browser.relay, await browser.new_code(), config_dir, out, label)


async def redeem(
    relay: Any,
    code: str,
    config_dir: FilePath[str],
    out: Any = None,
    label: str = "test-host",
) -> BridgeConfig:
    """Redeem C{code} at C{relay} as C{coder1-bridge pair} does, into C{config_dir}."""
    out = io.StringIO() if out is None else out
    return await pair(reactor, config_dir, relay_address(relay), code, label, out, {})


async def start_bridge(config: BridgeConfig, **kwargs: Any) -> BridgeService:
    """The bridge service, connected."""
    kwargs.setdefault("telemetry", True)
    bridge = BridgeService(reactor, config, **kwargs)
    bridge.startService()
    await bridge.when_connected()
    return bridge


async def stop_all(*services: Any) -> None:
    """Stop services (bridges first), waiting for each."""
    await DeferredList([Deferred.fromCoroutine(_stop(s)) for s in services])


async def _stop(service: Any) -> None:
    if service.running:
        await service.stopService()


async def crash_relay(relay: RelayService) -> None:
    """Stop C{relay} as a killed process would: every connection dropped, nothing said."""
    await relay.listening
    assert relay.port is not None
    factory: Any = relay.port.factory  # type: ignore[attr-defined]
    await maybeDeferred(relay.port.stopListening)
    for connection in list(relay.context.connections.live):
        connection.abort()
    # HTTP keep-alive connections too: a browser would send its next request on one.
    for tls in list(factory.protocols):
        tls.transport.abortConnection()
    await relay.context.connections.when_idle()
    relay.telemetry.stopService()
    relay.certificates.stopService()
    relay.running = False


async def settle(limit: float = 3.0) -> None:
    """
    Wait for Autobahn's batched timers to drain: txaio keeps a bucket's call
    scheduled for up to a second after the timeouts in it are cancelled.
    """
    deadline = reactor.seconds() + limit
    while reactor.seconds() < deadline and any(
        "_notify_bucket" in repr(call.func) for call in reactor.getDelayedCalls()
    ):
        await deferLater(reactor, 0.05)


# --- a relay and a bridge in processes of their own, for measuring them ---------------------

#: The repository, which the children import from.
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What C{twistd coder1-relay} runs (the same options and service), logging to stdout.
RELAY_MAIN = """
import sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from coder1_relay.tap import Options, makeService
options = Options()
options.parseOptions(sys.argv[1:])
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
service = makeService(options)
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
service.startService()
reactor.run()
"""

#: What C{coder1-bridge start} runs (the same service) from a saved pairing, as root too.
BRIDGE_MAIN = """
import sys
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python.filepath import FilePath
from coder1_bridge.config import BridgeConfig
from coder1_bridge.service import BridgeService

async def main(reactor):
    config = BridgeConfig.load(FilePath(sys.argv[1]))
    bridge = BridgeService(reactor, config, telemetry=False, label="child")
    reactor.addSystemEventTrigger("before", "shutdown", bridge.stopService)
    bridge.startService()
    await bridge.when_connected()
    print("bridge connected", flush=True)
    await Deferred()

react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


class Child(ProcessProtocol):
    """A C{python -c} child: what it prints, a wait for a line of it, its end."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        #: How it ended (ProcessDone, or ProcessTerminated with its code or signal).
        self.reason: Failure | None = None
        self._waiting: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    @property
    def pid(self) -> int:
        pid: int = self.transport.pid  # type: ignore[union-attr]
        return pid

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for waiter in list(self._waiting):
            found = waiter[0].search(self.output)
            if found:
                self._waiting.remove(waiter)
                waiter[1].callback(found)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        for _, d in self._waiting:
            d.errback(AssertionError(f"child ended: {self.output[-2000:]!r}"))
        self._waiting = []
        self.ended.callback(None)

    def wait_for(self, pattern: bytes, timeout: float = 30) -> Deferred[re.Match[bytes]]:
        """The first match of C{pattern} in what it printed, already or to come."""
        d: Deferred[re.Match[bytes]] = Deferred()
        found = re.search(pattern, self.output)
        if found:
            d.callback(found)
            return d
        self._waiting.append((re.compile(pattern), d))
        return d.addTimeout(timeout, reactor)

    async def stop(self) -> None:
        """TERM it (its services stop cleanly), KILL it after 10 seconds, wait for its end."""
        if self.ended.called:
            return
        self.transport.signalProcess("TERM")  # type: ignore[union-attr]
        kill = reactor.callLater(10, self.transport.signalProcess, "KILL")  # type: ignore[union-attr]
        await self.ended
        if kill.active():
            kill.cancel()


def spawn_python(code: str, *args: str) -> Child:
    """Run C{python -c code args} with this repository on its path."""
    child = Child()
    env = {**os.environ, "PYTHONPATH": SOURCE}
    reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", code, *args], env)
    return child


def memory(pid: int) -> dict[str, int]:
    """The resident set (VmRSS) and its peak (VmHWM) of C{pid}, in bytes."""
    sizes: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                sizes[name] = int(value.split()[0]) * 1024
    return sizes


@attrs.frozen
class _Host:
    port: int


@attrs.frozen
class _Port:
    port: int

    def getHost(self) -> _Host:
        return _Host(self.port)


@attrs.define
class _Context:
    public_url: str


@attrs.frozen
class _Keys:
    tls_cert_pem: bytes


@attrs.define
class ChildRelay:
    """
    A relay in a process of its own (the service C{twistd coder1-relay} runs),
    with the attributes L{Browser}, L{pair_bridge} and L{relay_address} read of
    a L{RelayService}: C{context.public_url}, C{keys.tls_cert_pem}, C{port}.
    """

    child: Child
    context: _Context
    keys: _Keys
    port: _Port

    @property
    def pid(self) -> int:
        return self.child.pid

    def as_service(self) -> RelayService:
        """This relay, typed as what L{Browser} and L{pair_bridge} expect (they only read)."""
        return cast(RelayService, self)


async def start_child_relay(state_dir: FilePath[str], *options: str) -> ChildRelay:
    """C{twistd coder1-relay}'s service on a free loopback port, in a process of its own."""
    state_dir.makedirs(ignoreExistingDirectory=True)
    child = spawn_python(
        RELAY_MAIN,
        "--listen=tcp:0:interface=127.0.0.1",
        "--node-listen=tcp:0:interface=127.0.0.1",
        f"--state-dir={state_dir.path}",
        *options,
    )
    found = await child.wait_for(rb"coder1 relay at (https://localhost:(\d+))")
    return ChildRelay(
        child,
        _Context(found.group(1).decode()),
        _Keys(state_dir.child(DEV_CERT_NAME).getContent()),
        _Port(int(found.group(2))),
    )


async def start_child_bridge(config_dir: FilePath[str]) -> Child:
    """The bridge service of the pairing in C{config_dir}, in a process of its own, connected."""
    child = spawn_python(BRIDGE_MAIN, config_dir.path)
    await child.wait_for(rb"bridge connected")
    return child


def descendants(pid: int) -> list[int]:
    """The processes under C{pid}, children first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def process_name(pid: int) -> str:
    """The command name of C{pid} ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def bytes_written(pid: int) -> int:
    """How many bytes C{pid} has written so far (C{wchar} of /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise LookupError(pid)


def around_make_service(state_dir: str, report: str, *options: str) -> tuple[str, str]:
    """
    In a process of its own, make the relay as C{twistd coder1-relay} does
    (with C{options}, on a free loopback port); C{report}, a Python
    expression, printed before and after.
    """
    code = (
        "import gc, sys\n"
        "from coder1_relay.tap import Options, makeService\n"
        f"print(repr({report}))\n"
        "options = Options()\n"
        "options.parseOptions(sys.argv[1:])\n"
        "makeService(options)\n"
        f"print(repr({report}))\n"
    )
    listen = ["--listen", "tcp:0:interface=127.0.0.1", "--state-dir", state_dir]
    found = subprocess.run(
        [sys.executable, "-c", code, *listen, *options], capture_output=True, text=True, check=True
    )
    before, after = found.stdout.splitlines()[-2:]
    return before, after
