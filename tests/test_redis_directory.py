"""
L{coder1_relay.redis_directory}: session ownership among relay nodes, on a
real redis-server of the test's own.  Each L{RedisDirectory} here is one node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from coder1_relay.redis_client import RedisClient
from coder1_relay.redis_directory import RedisDirectory

from .loopback import reactor
from .redis_server import RedisServer, start_redis


class DirectoryTests(TestCase):
    """Nodes claim, hold, give up and take over sessions, each claim atomic."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: RedisServer = await start_redis(self)
        self._nodes: list[RedisDirectory] = []

    async def node(self, key_id: str = "coder1-relay:k", **kwargs: Any) -> RedisDirectory:
        """A node joined at a made-up address, its heartbeats on a clock the test turns."""
        client = RedisClient(reactor, self.server.settings())
        client.startService()
        self.addCleanup(client.stopService)
        await client.when_ready()
        directory = RedisDirectory(client, Clock(), key_id, **kwargs)
        await directory.start(f"10.0.0.{len(self._nodes) + 1}:8444")
        self.addCleanup(directory.stop)
        self._nodes.append(directory)
        return directory

    async def test_one_owner_of_concurrent_claims(self) -> None:
        """Two nodes locating a new session at once agree on one owner, which knows it is."""
        a, b = await self.node(), await self.node()
        owners = await gatherResults(
            [a.locate("s1"), b.locate("s1"), a.locate("s1"), b.locate("s1")]
        )
        self.assertEqual(len({o.node for o in owners}), 1)
        winner = a if owners[0].node == a.node else b
        loser = b if winner is a else a
        self.assertIn("s1", list(winner.owned()))
        self.assertEqual(list(loser.owned()), [])
        seen_by_loser = await loser.locate("s1")
        self.assertEqual(seen_by_loser.address, f"10.0.0.{self._nodes.index(winner) + 1}:8444")

    async def test_released_session_claimed_by_next(self) -> None:
        """A session its owner gave up belongs to the next node that needs it."""
        a, b = await self.node(), await self.node()
        self.assertEqual((await a.locate("s")).node, a.node)
        await a.release("s")
        owner = await b.locate("s")
        self.assertEqual((owner.node, owner.took_over), (b.node, False))

    async def test_dead_owner_taken_over(self) -> None:
        """
        Once the owner's record is gone (it stopped renewing it), the next node
        claims its sessions and is told it took them over.
        """
        a, b = await self.node(), await self.node()
        await a.locate("s")
        self.assertEqual((await b.locate("s")).node, a.node)
        await self.server_client_call("DEL", f"coder1:node:{a.node}")
        owner = await b.locate("s")
        self.assertEqual((owner.node, owner.took_over), (b.node, True))

    async def test_claims_back_after_redis_lost_them(self) -> None:
        """
        Redis loses everything (a restart without its data): at its next
        heartbeat a node claims back its sessions, and lets go (tells its mesh)
        those another node claimed meanwhile.
        """
        lost: list[list[str]] = []
        a = await self.node(lost=lost.append)
        b = await self.node()
        for session in ("kept", "taken"):
            await a.locate(session)
        await self.server_client_call("FLUSHALL")
        await b._beat_once()  # b's record back, then b needs "taken"
        self.assertEqual((await b.locate("taken")).node, b.node)
        await a._beat_once()
        self.assertEqual(lost, [["taken"]])
        self.assertEqual((await b.locate("kept")).node, a.node)

    async def test_events_reach_every_node(self) -> None:
        """An event one node publishes reaches every node, itself included."""
        a, b = await self.node(), await self.node()
        heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        a.subscribe(heard["a"].append)
        b.subscribe(heard["b"].append)
        await deferLater(reactor, 0.2)  # the subscriptions are made
        await a.publish({"event": "paired", "session": "s", "peer": 1})
        for _ in range(50):
            if heard["a"] and heard["b"]:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(heard["a"], [{"event": "paired", "session": "s", "peer": 1}])
        self.assertEqual(heard["b"], heard["a"])

    async def test_differing_signing_key_named_at_start(self) -> None:
        """A node whose signing key differs from a live node's says so, naming both."""
        await self.node(key_id="coder1-relay:first")
        errors: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_level") == LogLevel.error:
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.node(key_id="coder1-relay:second")
        self.assertEqual(len(errors), 1)
        self.assertEqual(
            (errors[0]["mine"], errors[0]["theirs"]), ("coder1-relay:second", "coder1-relay:first")
        )

    def server_client_call(self, *args: Any) -> Deferred[Any]:
        """A command straight to Redis, past every node (the test's hand on the store)."""
        return self._nodes[0].redis.call(*args)
