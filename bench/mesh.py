"""
Several relay processes on one Redis, for the benchmarks (docs/scaling.md).

L{start_redis} runs a redis-server of the run's own on a free loopback port in a
temporary directory, set up as docs/scaling.md asks of production (append-only
file synced at every write, no snapshots); L{start_mesh} runs N
C{twistd coder1-relay --store redis://...} processes on it sharing one signing
key and certificate, as an operator does.  Every node names the same public URL
(C{https://localhost:PUBLIC}); the last node listens on that port itself, so a
bridge process, which connects to its configured URL, reaches the last node.

There is no balancer process: the benchmark's own clients pick the node of each
new connection (L{Nodes}), at random among the nodes they are given, which is
what a round-robin TCP balancer shared by many users looks like to one of them.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import attrs
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.utils import getProcessOutput

from bench import harness as h
from coder1_wire.e2e import Identity

REDIS_SERVER = "/usr/bin/redis-server"


def redis_missing() -> str | None:
    """Why the benchmarks on Redis cannot run here, or None when they can."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} is not installed (apt-get install redis-server)"
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        return "txredisapi is not installed (pip install 'coder1-bridge[redis]')"
    return None


@attrs.define
class Redis:
    """A redis-server process of this run's own."""

    process: h.Process
    port: int
    directory: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def info(self, section: str) -> dict[str, str]:
        """One section of C{INFO}, as name to value."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        raw = await getProcessOutput(cli, ["-p", str(self.port), "INFO", section], env={})
        fields = {}
        for line in raw.decode().splitlines():
            name, sep, value = line.strip().partition(":")
            if sep:
                fields[name] = value
        return fields

    async def used_memory(self) -> int:
        return int((await self.info("memory"))["used_memory"])

    async def keys(self) -> int:
        """How many keys database 0 holds."""
        found = re.match(r"keys=(\d+)", (await self.info("keyspace")).get("db0", "keys=0"))
        return int(found.group(1)) if found else 0

    async def command_stats(self) -> dict[str, int]:
        """Calls so far per command (C{INFO commandstats}), e.g. C{{"evalsha": 120}}."""
        calls = {}
        for name, value in (await self.info("commandstats")).items():
            found = re.search(r"calls=(\d+)", value)
            if name.startswith("cmdstat_") and found:
                calls[name.removeprefix("cmdstat_")] = int(found.group(1))
        return calls

    async def stop(self) -> None:
        await self.process.stop(grace=10)
        shutil.rmtree(self.directory, ignore_errors=True)


async def start_redis() -> Redis:
    """A redis-server on a free loopback port, once it accepts connections."""
    directory = tempfile.mkdtemp(prefix=h.TMP_PREFIX + "redis-")
    for attempt in range(3):  # the free port may be taken before redis-server binds it
        port = h.free_port()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", directory]
        argv += ["--daemonize", "no", "--maxclients", "1000"]
        process = h.Process("redis", argv, env={}, cwd=directory)
        try:
            await process.wait_for(r"Ready to accept connections", timeout=30)
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        return Redis(process, port, directory)
    raise AssertionError("unreachable")


@attrs.define
class Nodes(h.Relay):
    """
    Some nodes of a deployment as a client sees them: URLs name the public port
    (C{port}); each new connection goes to one of C{ports}, picked at random (or by
    its source address).
    """

    ports: list[int] = attrs.field(factory=list)
    pick: random.Random = attrs.field(factory=lambda: random.Random(0))
    #: Pick by the client's source address instead (HAProxy's C{balance source}):
    #: every connection of one simulated user reaches the same node.
    by_source: bool = False

    def endpoint(
        self,
        source: str | None = None,
        creator: IOpenSSLClientConnectionCreator | None = None,
    ) -> IStreamClientEndpoint:
        if self.by_source and source is not None:
            port = self.ports[zlib.crc32(source.encode()) % len(self.ports)]
        else:
            port = self.pick.choice(self.ports)
        tcp = TCP4ClientEndpoint(
            h.reactor, "127.0.0.1", port, timeout=30, bindAddress=(source, 0) if source else None
        )
        creator = creator or self.tls_creator()
        return tcp if creator is None else wrapClientTLS(creator, tcp)


@attrs.define
class Mesh:
    """N relay processes on one Redis; node I listens on C{ports[I]}, the last on the public one."""

    redis: Redis
    nodes: list[h.Process]
    ports: list[int]
    state_dirs: list[str]

    @property
    def public_port(self) -> int:
        return self.ports[-1]

    @property
    def cert_pem(self) -> bytes:
        return Path(self.state_dirs[0], "dev-cert.pem").read_bytes()

    def via(self, *indexes: int) -> Nodes:
        """The deployment reached through the nodes C{indexes} (default: all)."""
        chosen = indexes or tuple(range(len(self.nodes)))
        return Nodes(
            self.nodes[chosen[0]],
            self.public_port,
            True,
            self.cert_pem,
            self.state_dirs[chosen[0]],
            [self.ports[i] for i in chosen],
        )

    def pids(self) -> dict[str, int]:
        pids = {f"relay {chr(ord('A') + i)}": p.pid for i, p in enumerate(self.nodes)}
        return {**pids, "redis": self.redis.process.pid}

    async def stop(self, *, redis: bool = True) -> None:
        for node in self.nodes:
            await node.stop(grace=30)
        if redis:
            await self.redis.stop()


def share_keys(first: str, other: str) -> None:
    """Give a node the first node's signing key and certificate, as an operator does."""
    from coder1_relay.certs import DEV_CERT_NAME, DEV_KEY_NAME, SIGNING_KEY_NAME

    for name in (SIGNING_KEY_NAME, DEV_CERT_NAME, DEV_KEY_NAME):
        shutil.copyfile(os.path.join(first, name), os.path.join(other, name))
        os.chmod(os.path.join(other, name), 0o600)


async def start_mesh(count: int, redis: Redis | None = None) -> Mesh:
    """C{count} relay processes on C{redis} (a new one when None), each once it has joined."""
    redis = redis or await start_redis()
    ports = [h.free_port() for _ in range(count)]
    public = f"https://localhost:{ports[-1]}"
    mesh = Mesh(redis, [], ports, [])
    for index, port in enumerate(ports):
        state_dir = tempfile.mkdtemp(prefix=h.TMP_PREFIX + "node-")
        if mesh.state_dirs:
            share_keys(mesh.state_dirs[0], state_dir)
        argv = h.profiled("relay", [*h.twistd(), "--nodaemon", "--pidfile=", "coder1-relay"])
        argv += ["--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", state_dir]
        argv += ["--node-listen", "tcp:0:interface=127.0.0.1"]
        argv += ["--store", redis.url, "--public-url", public, *h.UNLIMITED]
        process = h.Process(f"relay {chr(ord('A') + index)}", argv, cwd=str(h.TREE))
        mesh.nodes.append(process)
        mesh.state_dirs.append(state_dir)
        await process.wait_for(r"coder1 relay at https://localhost:\d+", timeout=60)
    return mesh


@attrs.define
class MeshSystem:
    """A two-node deployment, a paired bridge process on the last node, an IDE tab on C{tab}."""

    mesh: Mesh
    system: h.FullSystem


async def mesh_system(*, across: bool) -> MeshSystem:
    """
    Two relay processes on one Redis; a bridge paired and connected to node B (it
    connects first, so B owns the session); the IDE tab connected to node A when
    C{across}, else to B too.
    """
    mesh = await start_mesh(2)
    try:
        tab = mesh.via(0 if across else 1)
        browser = Identity.generate()
        pairing = await h.pair(tab, browser, Identity.generate())
        bridge = await h.start_bridge(tab, pairing)
        ide = h.IDE(browser)
        await ide.connect(tab, pairing.cookie)
        await ide.bridge_present()
        await ide.handshake(pairing.peer)
    except BaseException:
        await mesh.stop()
        raise
    return MeshSystem(mesh, h.FullSystem(tab, bridge, ide))
