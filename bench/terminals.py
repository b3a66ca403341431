"""
The systems the keystroke and bulk benchmarks drive, each as "a terminal in a browser":

- L{Coder1}: the whole product.  The relay (C{twistd coder1-relay}), a paired bridge
  process, and this process as the browser: the IDE WebSocket, an end-to-end channel,
  PTY_OPEN, sealed PTY_INPUT and PTY_OUTPUT.
- L{Naive}: the baseline.  L{bench.naive_relay} and L{bench.naive_peer}: Autobahn
  forwarding messages, no envelope, no encryption beyond TLS.  With C{pty=False} the
  peer only echoes (the "bare Autobahn echo"); with C{pty=True} it runs the same
  command on a pseudo-terminal, as the bridge does.
- L{TermPair}: termpair (server and C{termpair share}), its browser side implemented
  here with C{cryptography} from its protocol (AES-GCM keys bootstrapped with the
  secret in the share link, JSON and base64 messages).
- L{Terminado}: terminado's TermSocket in Tornado: a direct web terminal, no relay.

Every system speaks TLS 1.3 on every WebSocket, with a self-signed certificate the
client pins.  Each runs the command given to L{System.setup} as C{sh -c COMMAND}; a
round (L{System.open}) gets a fresh terminal.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import Deferred

from bench import harness as h
from coder1_wire.envelope import Envelope, Kind, control


class Output:
    """What a terminal printed: counted, and searched for what a benchmark waits for."""

    KEEP = 64

    def __init__(self) -> None:
        self.total = 0
        self._tail = b""
        self._want: bytes | None = None
        self._waiter: Deferred[float] | None = None

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self._waiter is None:
            return
        window = self._tail + data
        assert self._want is not None
        if self._want in window:
            waiter, self._waiter, self._want = self._waiter, None, None
            self._tail = b""
            waiter.callback(time.perf_counter())
            return
        self._tail = window[-self.KEEP :]

    def expect(self, want: bytes) -> Deferred[float]:
        """Fires with the time C{want} arrives in output that comes after this call."""
        self._want, self._tail = want, b""
        self._waiter = Deferred()
        return self._waiter

    def lost(self, why: str) -> None:
        """The connection ended: a keystroke waiting for its echo fails at once, saying why."""
        waiter, self._waiter, self._want = self._waiter, None, None
        if waiter is not None:
            waiter.errback(ConnectionError(why))


class System:
    """A web terminal under test."""

    name = "system"

    def __init__(self) -> None:
        self.output = Output()

    async def setup(self, command: str) -> None:
        """Start the system's processes; its terminals will run C{sh -c command}."""

    async def open(self) -> None:
        """A fresh terminal, connected: its output goes to C{self.output}."""

    def send(self, data: bytes) -> None:
        """Type C{data} into the terminal."""
        raise NotImplementedError

    async def close(self, *, exits: bool = False) -> None:
        """
        End this round's terminal.  C{exits}: its program ends by itself after what
        the round waited for, and the terminal is closed once it has (as a user
        closes a tab that says its program ended); else it is closed while it runs.
        """

    async def teardown(self) -> None:
        """Stop the system's processes."""

    def pids(self) -> dict[str, int]:
        """The system's own processes (not the command's), for CPU and memory."""
        return {}


# --------------------------------------------------------------------------- coder1


class Coder1(System):
    """The product: relay and bridge processes, this process as an IDE tab with E2E."""

    name = "coder1"

    def __init__(self, tree: Path | None = None) -> None:
        super().__init__()
        #: The source tree of its relay and bridge: None for L{h.TREE}, or L{h.BEFORE}.
        self.tree = tree
        if tree is not None:
            self.name += h.BEFORE_SUFFIX

    async def setup(self, command: str) -> None:
        self.command = command
        with h.running_from(self.tree):
            self.system = await self.start()
        self.system.ide.on_frame = self._frame
        self.system.ide.link.closed().addCallback(
            lambda close: self.output.lost(f"the relay closed the IDE connection: {close}")
        )
        self.stream = 0
        self._opened: Deferred[None] | None = None
        self._exited: Deferred[None] | None = None

    async def start(self) -> h.FullSystem:
        """Start the relay and a bridge, pair them, connect the IDE."""
        return await h.full_system()

    def _frame(self, envelope: Envelope) -> None:
        if envelope.stream != self.stream:
            return
        if envelope.kind == Kind.PTY_OUTPUT:
            self.output.feed(envelope.payload)
        elif envelope.kind == Kind.PTY_OPENED and self._opened is not None:
            self._opened.callback(None)
        elif envelope.kind in (Kind.PTY_EXIT, Kind.PTY_ERROR) and self._exited is not None:
            # Taken first: firing C{exited} may run the next round's open() at once, which
            # sets new ones that this frame must not touch.
            opened, exited = self._opened, self._exited
            if opened is not None and not opened.called:
                opened.errback(RuntimeError(envelope.payload.decode()))
            if not exited.called:
                exited.callback(None)

    async def open(self) -> None:
        self.output = Output()
        self.stream += 1
        self.seq = 0
        self._opened, self._exited = Deferred(), Deferred()
        body = {"cols": 200, "rows": 50, "argv": ["sh", "-c", self.command]}
        self.system.ide.send(control(Kind.PTY_OPEN, body, stream=self.stream, peer=1))
        await h.with_timeout(self._opened, 30, "PTY_OPENED")

    def send(self, data: bytes) -> None:
        self.seq += 1
        self.system.ide.send(Envelope(Kind.PTY_INPUT, self.stream, self.seq, 1, data))

    async def close(self, *, exits: bool = False) -> None:
        # As the IDE page does when its tab is closed: PTY_CLOSE, for a running terminal
        # and for one whose tab says it ended (so the bridge may forget its scrollback).
        assert self._exited is not None
        if exits:
            await h.with_timeout(self._exited, 30, "PTY_EXIT")
        self.seq += 1
        self.system.ide.send(Envelope(Kind.PTY_CLOSE, self.stream, self.seq, 1))
        await h.with_timeout(self._exited, 30, "PTY_EXIT")

    async def teardown(self) -> None:
        await self.system.bridge.stop()
        await self.system.relay.process.stop()

    def pids(self) -> dict[str, int]:
        return {"relay": self.system.relay.process.pid, "bridge": self.system.bridge.pid}


class Coder1Mesh(Coder1):
    """
    The product as two relay processes on one Redis (bench.mesh): the bridge on
    node B, the IDE tab on node A (C{across}: every frame also crosses a node
    link) or on node B too.
    """

    def __init__(self, *, across: bool) -> None:
        super().__init__()
        self.across = across
        self.name = "coder1 across nodes" if across else "coder1 same node of two"

    async def start(self) -> h.FullSystem:
        from bench.mesh import mesh_system

        self.mesh = await mesh_system(across=self.across)
        return self.mesh.system

    async def teardown(self) -> None:
        await self.system.bridge.stop()
        await self.mesh.mesh.stop()

    def pids(self) -> dict[str, int]:
        pids = self.mesh.mesh.pids()
        pids.pop("redis")  # it has nothing to do with frames (docs/scaling.md)
        if not self.across:
            pids.pop("relay A")  # idle: the tab and the bridge are on B
        return {**pids, "bridge": self.system.bridge.pid}


# --------------------------------------------------------------------------- naive


class Naive(System):
    """The naive Autobahn relay and peer: an echo (C{pty=False}) or a bare PTY terminal."""

    def __init__(self, *, pty: bool, tls: bool = True) -> None:
        super().__init__()
        self.pty = pty
        self.tls = tls
        self.name = "naive autobahn relay + " + ("PTY peer" if pty else "echo peer")
        self.rooms = 0

    async def setup(self, command: str) -> None:
        self.command = command
        self.cert = h.make_cert()
        self.relay = await h.start_naive_relay(tls=self.tls, cert=self.cert)
        self.peer: h.Process | None = None

    async def open(self) -> None:
        self.output = Output()
        self.rooms += 1
        room = f"r{self.rooms}"
        argv = [sys.executable, "-m", "bench.naive_peer", self.relay.ws_url(f"/{room}/b")]
        argv += ["pty" if self.pty else "echo", self.command]
        if self.tls:
            argv.append(self.cert.cert)
        self.peer = h.Process("naive-peer", argv, cwd=str(h.ROOT))
        await self.peer.wait_for("naive peer ready")
        self.ws = await h.connect_ws(
            self.relay.endpoint(),
            self.relay.ws_url(f"/{room}/a"),
            on_message=lambda payload, binary: self.output.feed(payload),
        )
        if self.pty:
            self.ws.sendMessage(b"go", isBinary=True)  # the peer starts the command

    def send(self, data: bytes) -> None:
        self.ws.sendMessage(data, isBinary=True)

    async def close(self, *, exits: bool = False) -> None:
        self.ws.sendClose(1000)
        await self.ws.factory.closed
        if self.peer is not None:
            await self.peer.stop()

    async def teardown(self) -> None:
        await self.relay.process.stop()

    def pids(self) -> dict[str, int]:
        pids = {"relay": self.relay.process.pid}
        if self.peer is not None:
            pids["peer"] = self.peer.pid
        return pids


# --------------------------------------------------------------------------- termpair


def _termpair_iv(count: int) -> bytes:
    """The IV termpair's page makes from its counter: the bytes of C{count}, big end first."""
    raw = count.to_bytes(max(1, (count.bit_length() + 7) // 8), "big")
    return raw + bytes(12 - len(raw))


class TermPair(System):
    """
    termpair 0.3: C{termpair serve} (uvicorn, TLS) and C{termpair share} on a terminal of
    ours; the browser's side (its page's JavaScript) done here, following its protocol.
    """

    name = "termpair"

    async def setup(self, command: str) -> None:
        self.command = command
        self.cert = h.make_cert()
        self.port = h.free_port()
        argv = [h.peer_python(), "-m", "termpair.main", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--certfile", self.cert.cert]
        argv += ["--keyfile", self.cert.key]
        self.server = h.Process("termpair-serve", argv, env=h.child_env())
        await self.server.wait_for(r"Uvicorn running on", timeout=60)
        self.share: h.Process | None = None

    async def open(self) -> None:
        self.output = Output()
        argv = [h.peer_python(), "-m", "termpair.main", "share", "--cmd"]
        argv += [f"sh -c '{self.command}'", "--host", "https://127.0.0.1", "--port", str(self.port)]
        env = h.child_env(TERM="xterm-256color", COLUMNS="200", LINES="50")
        # On a terminal, as a user runs it: it puts that terminal in raw mode and copies
        # everything the command prints to it, so this process reads it all (pty=True).
        self.share = h.Process("termpair-share", argv, env=env, pty=True)
        found = await self.share.wait_for(r"Terminal ID: ([0-9a-f]+)", timeout=60)
        terminal = found.group(1).decode()
        key = await self.share.wait_for(r"Secret encryption key: ([A-Za-z0-9+/=]+)")
        bootstrap = AESGCM(base64.b64decode(key.group(1)))
        self._share_output = len(self.share.output)
        self._keys: Deferred[None] = Deferred()
        self.unix: AESGCM | None = None
        self.browser: AESGCM | None = None
        self.iv = 0

        def message(payload: bytes, binary: bool) -> None:
            event = json.loads(payload)
            if event.get("event") == "new_output" and self.unix is not None:
                sealed = base64.b64decode(event["payload"])
                plain = json.loads(self.unix.decrypt(sealed[:12], sealed[12:], None))
                self.output.feed(base64.b64decode(plain["pty_output"]))
            elif event.get("event") == "aes_keys" and self.unix is None:
                keys = event["payload"]
                for name in ("b64_bootstrap_unix_aes_key", "b64_bootstrap_browser_aes_key"):
                    sealed = base64.b64decode(keys[name])
                    raw = bootstrap.decrypt(sealed[:12], sealed[12:], None)
                    if name.startswith("b64_bootstrap_unix"):
                        self.unix = AESGCM(raw)
                    else:
                        self.browser = AESGCM(raw)
                self.iv = int(keys["iv_count"])
                self._keys.callback(None)

        endpoint = h.TCP4ClientEndpoint(h.reactor, "127.0.0.1", self.port)
        self.ws = await h.connect_ws(
            h.wrapClientTLS(h.client_tls_options("localhost", self.cert.pem), endpoint),
            f"wss://localhost:{self.port}/connect_browser_to_terminal?terminal_id={terminal}",
            on_message=message,
        )
        self.ws.sendMessage(json.dumps({"event": "new_browser_connected", "payload": {}}).encode())
        await h.with_timeout(self._keys, 30, "termpair's aes_keys")

    def send(self, data: bytes) -> None:
        assert self.browser is not None
        self.iv += 1
        iv = _termpair_iv(self.iv)
        salt = ",".join(str(b) for b in os.urandom(12))
        plain = json.dumps({"data": data.decode(), "salt": salt}).encode()
        sealed = base64.b64encode(iv + self.browser.encrypt(iv, plain, None)).decode()
        self.ws.sendMessage(json.dumps({"event": "command", "payload": sealed}).encode())

    async def close(self, *, exits: bool = False) -> None:
        self.ws.sendClose(1000)
        await self.ws.factory.closed
        if self.share is not None:
            await self.share.stop()

    async def teardown(self) -> None:
        await self.server.stop()

    def pids(self) -> dict[str, int]:
        pids = {"server": self.server.pid}
        if self.share is not None:
            pids["share"] = self.share.pid
        return pids


# --------------------------------------------------------------------------- terminado


class Terminado(System):
    """terminado 0.18: Tornado's TermSocket, a new terminal per WebSocket, no relay."""

    name = "terminado"

    async def setup(self, command: str) -> None:
        self.cert = h.make_cert()
        argv = [h.peer_python(), "-m", "bench.terminado_server", self.cert.cert, self.cert.key]
        argv += ["sh", "-c", command]
        self.server = h.Process("terminado", argv, env=h.child_env(), cwd=str(h.ROOT))
        match = await self.server.wait_for(r"terminado listening on (\d+)", timeout=60)
        self.port = int(match.group(1))

    async def open(self) -> None:
        self.output = Output()
        setup: Deferred[None] = Deferred()

        def message(payload: bytes, binary: bool) -> None:
            kind, _, rest = payload.partition(b",")
            if kind == b'["stdout"':
                self.output.feed(json.loads(rest[:-1]).encode())
            elif kind == b'["setup"' and not setup.called:
                setup.callback(None)

        endpoint = h.TCP4ClientEndpoint(h.reactor, "127.0.0.1", self.port)
        self.ws = await h.connect_ws(
            h.wrapClientTLS(h.client_tls_options("localhost", self.cert.pem), endpoint),
            f"wss://localhost:{self.port}/websocket",
            on_message=message,
        )
        await h.with_timeout(setup, 30, "terminado's setup")

    def send(self, data: bytes) -> None:
        self.ws.sendMessage(json.dumps(["stdin", data.decode()]).encode())

    async def close(self, *, exits: bool = False) -> None:
        self.ws.sendClose(1000)
        await self.ws.factory.closed

    async def teardown(self) -> None:
        await self.server.stop()

    def pids(self) -> dict[str, int]:
        return {"server": self.server.pid}


# --------------------------------------------------------------------------- choosing


@attrs.frozen
class Choice:
    make: Any
    needs: str | None = None
    #: Whether it runs relay processes on a Redis of its own (bench.mesh).
    mesh: bool = False


def available(names: list[str]) -> tuple[list[System], list[str]]:
    """The systems to run, and a note for each peer skipped because it is not installed."""
    systems: list[System] = []
    skipped: list[str] = []
    table = {
        "coder1": Choice(Coder1),
        "coder1-cross": Choice(lambda: Coder1Mesh(across=True), mesh=True),
        "coder1-node": Choice(lambda: Coder1Mesh(across=False), mesh=True),
        "naive": Choice(lambda: Naive(pty=False)),
        "naive-pty": Choice(lambda: Naive(pty=True)),
        "termpair": Choice(TermPair, "termpair"),
        "terminado": Choice(Terminado, "terminado"),
    }
    for name in names:
        choice = table[name]
        if choice.needs and not h.peer_available(choice.needs):
            skipped.append(f"{name}: not installed in {h.peer_python()} (skipped)")
            continue
        if choice.mesh:
            from bench.mesh import redis_missing

            missing = redis_missing()
            if missing:
                skipped.append(f"{name}: {missing} (skipped)")
                continue
        systems.append(choice.make())
        if name == "coder1" and h.BEFORE is not None:
            systems.append(Coder1(tree=h.BEFORE))
    return systems, skipped


def baseline(systems: list[System], preferred: str) -> str:
    """
    The row ratios divide by: C{preferred} (the naive relay) when it runs; else the
    product with the tab and the bridge on one node, of two (C{coder1-node}) or of one
    (C{coder1}): so C{coder1-node,coder1-cross} compares across nodes with the same
    node, measured in the same run.
    """
    names = [s.name for s in systems]
    for name in (preferred, "coder1 same node of two", "coder1"):
        if name in names:
            return name
    return preferred


SYSTEM_NAMES = [
    "coder1",
    "coder1-cross",
    "coder1-node",
    "naive",
    "naive-pty",
    "termpair",
    "terminado",
]
