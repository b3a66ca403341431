"""
A redis-server of a test's own, on a free loopback port in a temporary directory.

It keeps an append-only file synced at every write (C{--appendfsync always}),
and no snapshots, so that L{RedisServer.restart} on the same port brings back
everything a client was told is done, as a production Redis set up as
docs/scaling.md says would.  Where C{/usr/bin/redis-server} is missing, the
tests that need it skip, saying so (CI installs it).
"""

from __future__ import annotations

import os
import random
import signal
import socket
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from coder1_relay.redis_settings import RedisSettings

from .loopback import Child, reactor

REDIS_SERVER = "/usr/bin/redis-server"


#: The kernel's ephemeral port range: L{free_port} picks below its first port.
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
#: The lowest port L{free_port} picks (above the registered services most machines run).
_LOWEST = 10000
#: The ports L{free_port} gave this process: never given twice.
_GIVEN: set[int] = set()


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing uses right now, for a process started
    later to listen on, from below the kernel's ephemeral range: a port in that
    range may be taken meanwhile as the local port of any outgoing connection
    (the suite makes many, in two processes), one below it only by a bind that
    names it.
    """
    try:
        with open(_EPHEMERAL_RANGE) as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    for _ in range(100):
        port = random.randrange(_LOWEST, max(first_ephemeral, _LOWEST + 1000))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@attrs.define
class RedisServer:
    """One redis-server process at a time, always on C{port}, with its files in C{directory}."""

    directory: FilePath[str]
    port: int
    #: More redis-server options (C{--requirepass}, ...).
    options: tuple[str, ...] = ()
    #: TLS only (rediss://), with this certificate and key (PEM files), its own CA.
    tls: tuple[FilePath[str], FilePath[str]] | None = None
    process: Child | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def settings(self, **fields: Any) -> RedisSettings:
        """Settings for a client of this server (C{fields}: the other settings)."""
        ca = {"ca_file": self.tls[0]} if self.tls else {}
        return attrs.evolve(RedisSettings.from_url(self.url), **{**ca, **fields})

    async def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.directory.makedirs(ignoreExistingDirectory=True)
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            cert, key = (f.path for f in self.tls)
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert]
            listen += ["--tls-key-file", key, "--tls-ca-cert-file", cert]
            listen += ["--tls-auth-clients", "no"]
        argv = [
            REDIS_SERVER,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            self.directory.path,
            "--daemonize",
            "no",
            *self.options,
        ]
        self.process = process = Child()
        reactor.spawnProcess(process, REDIS_SERVER, argv, env={}, path=self.directory.path)
        await process.wait_for(rb"Ready to accept connections")
        await self._ping()

    async def _ping(self) -> None:
        from coder1_relay.redis_client import RedisClient
        from coder1_relay.store import StoreUnavailable

        client = RedisClient(reactor, self.settings(password=self._password()))
        client.startService()
        try:
            for _ in range(100):
                try:
                    if await client.call("PING") == "PONG":
                        return
                except StoreUnavailable:
                    await deferLater(reactor, 0.05)
            raise AssertionError(f"redis-server on port {self.port} does not answer PING")
        finally:
            await client.stopService()

    def _password(self) -> str | None:
        options = list(self.options)
        if "--requirepass" in options:
            return options[options.index("--requirepass") + 1]
        return None

    async def stop(self, *, kill: bool = False) -> None:
        """Stop it: TERM (it finishes its writes), or KILL (a crash). Nothing when stopped."""
        process, self.process = self.process, None
        if process is None or process.ended.called:
            return
        if kill:
            os.kill(process.pid, signal.SIGKILL)
            await process.ended
        else:
            await process.stop()

    async def restart(self, *, kill: bool = False) -> None:
        """Stop it (see L{stop}) and start it again on the same port, from its files."""
        await self.stop(kill=kill)
        await self.start()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, and nothing is answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a frozen server go on (SIGCONT)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def require_redis() -> None:
    """Skip the test, saying why, when redis-server or the client library is missing."""
    if not os.access(REDIS_SERVER, os.X_OK):
        raise SkipTest(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise SkipTest("txredisapi is not installed (pip install 'coder1-bridge[redis]')") from None


async def start_redis(
    test: TestCase, *options: str, tls: tuple[FilePath[str], FilePath[str]] | None = None
) -> RedisServer:
    """A running redis-server for C{test}, stopped (and resumed first, if frozen) at its end."""
    require_redis()
    directory = FilePath(test.mktemp())
    # The free port may be taken by another test process before redis-server binds it.
    for attempt in range(3):
        server = RedisServer(directory, free_port(), options, tls)
        try:
            await server.start()
        except AssertionError:  # it ended instead of getting ready
            if attempt == 2:
                raise
        else:
            break

    async def cleanup() -> None:
        if server.process is not None and not server.process.ended.called:
            server.resume()
        await server.stop()

    test.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return server
