"""
A relay node started with C{--store redis://...} while its Redis is not
there yet, or refuses it, as an operator meets it: the real C{twistd -n
coder1-relay} in a process of its own, a redis-server of the test's own.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_relay.redis_client import RedisClient

from .loopback import Child, reactor
from .redis_server import RedisServer, free_port, require_redis, start_redis
from .test_startup_errors import SOURCE, TWISTD

#: What the node says while it waits for Redis.
WAITING = (
    rb"cannot join the deployment yet \(Redis at redis://127\.0\.0\.1:\d+/0 did not answer "
    rb"within 2 s\); trying again until Redis answers: check that it runs and that --store "
    rb"names it"
)
#: What it says once it is up.
UP = rb"coder1 relay at https://localhost:\d+"


class RedisAtStartTests(TestCase):
    """A node whose Redis is late joins once it answers; one Redis refuses stops."""

    timeout = 120

    def setUp(self) -> None:
        require_redis()
        self.state = FilePath(self.mktemp())

    def relay(self, store: str) -> Child:
        """C{twistd -n coder1-relay --store store} on free loopback ports, stopped at cleanup."""
        child = Child()
        argv = [TWISTD, "-n", "--pidfile=", "coder1-relay", "--state-dir", self.state.path]
        argv += ["--listen=tcp:0:interface=127.0.0.1", "--node-listen=tcp:0:interface=127.0.0.1"]
        argv += ["--store", store]
        env = {**os.environ, "PYTHONPATH": SOURCE}
        reactor.spawnProcess(child, TWISTD, argv, env=env)
        self.addCleanup(lambda: Deferred.fromCoroutine(child.stop()))
        return child

    async def node_records(self, server: RedisServer) -> list[str]:
        """The node records in Redis."""
        client = RedisClient(reactor, server.settings())
        client.startService()
        try:
            keys: list[str] = await client.call("KEYS", "coder1:node:*")
            return keys
        finally:
            await client.stopService()

    async def test_joins_once_redis_answers(self) -> None:
        """
        Started before its Redis, the node says once that it cannot join yet
        and keeps trying; it is not announced, nor shows a traceback.  Once
        redis-server runs on that port, the node joins (its record is in
        Redis) and says where it is; stopped, it leaves and exits 0.
        """
        port = free_port()
        child = self.relay(f"redis://127.0.0.1:{port}/0")
        await child.wait_for(WAITING)
        server = RedisServer(FilePath(self.mktemp()), port)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        await server.start()
        await child.wait_for(UP)
        self.assertEqual(len(await self.node_records(server)), 1)
        self.assertEqual(len(child.output.split(b"cannot join the deployment yet")), 2)
        self.assertNotIn(b"Traceback", child.output)
        await child.stop()
        self.assertIsInstance(child.reason and child.reason.value, ProcessDone)
        self.assertEqual(await self.node_records(server), [])

    async def test_stopped_while_waiting(self) -> None:
        """
        A node stopped while it waits for Redis stops at once, cleanly: exit
        status 0, no traceback, and it never claimed to be up.
        """
        child = self.relay(f"redis://127.0.0.1:{free_port()}/0")
        await child.wait_for(WAITING)
        started = reactor.seconds()
        await child.stop()
        # Child.stop kills it after 10 s: well before that, it stopped itself.
        self.assertLess(reactor.seconds() - started, 8)
        self.assertIsInstance(child.reason and child.reason.value, ProcessDone)
        self.assertNotIn(b"Traceback", child.output)
        self.assertNotRegex(child.output, UP)

    async def test_refused_stops_the_relay(self) -> None:
        """
        A Redis that refuses the relay (no password for one that wants one)
        stops it: a critical line that says to check the password and
        restart, no traceback, and the process ends by itself with exit
        status 1.
        """
        server = await start_redis(self, "--requirepass", "s3cret word")
        child = self.relay(server.url)
        ended: Deferred[None] = Deferred()
        child.ended.addCallback(ended.callback)
        await ended.addTimeout(30, reactor)
        assert child.reason is not None
        ending = child.reason.value
        assert isinstance(ending, ProcessTerminated), ending
        self.assertEqual(ending.exitCode, 1)
        self.assertRegex(
            child.output,
            rb"#critical\] Redis at redis://127\.0\.0\.1:\d+/0 refused the relay: it wants a "
            rb"password \(NOAUTH\); check --store-password-file",
        )
        self.assertNotIn(b"Traceback", child.output)
        self.assertNotRegex(child.output, UP)
        self.assertNotIn(b"s3cret", child.output)
