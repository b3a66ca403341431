"""
Tests for L{coder1_relay.redis_store} and L{coder1_relay.redis_client}, against
a real redis-server of each test's own (L{tests.redis_server}).

Two C{RedisStore}s on two connections stand for two relay processes.  The
store contract (L{tests.test_store.StoreContract}) runs here as it does for
the in-memory store; the rest pins what only a networked store has: keys,
expiries and memory in Redis, deadlines while Redis is frozen or gone,
recovery after a restart, scripts Redis forgot, passwords, pub/sub, and the
persistence check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from coder1_relay.certs import DEV_CERT_NAME, DEV_KEY_NAME, load_or_create
from coder1_relay.redis_client import RedisClient, Script
from coder1_relay.redis_store import RedisStore, persistence_notes
from coder1_relay.store import BridgeRecord, PendingCode, Presence, StoreUnavailable

from .loopback import reactor
from .redis_server import RedisServer, free_port, start_redis
from .test_store import KEY, NOW, StoreContract

#: An idle paired session in Redis may take at most this many bytes (docs/scaling.md).
SESSION_BUDGET = 2048


class RedisTestCase(TestCase):
    """A fresh redis-server, and clients of it stopped at the end."""

    timeout = 30

    async def start_server(self, *options: str) -> RedisServer:
        self.server = await start_redis(self, *options)
        return self.server

    async def client(self, clock: Any = None, **settings: Any) -> RedisClient:
        """A started client of the server (C{settings}: other fields of its settings)."""
        client = RedisClient(reactor, self.server.settings(**settings), clock=clock)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    async def new_store(self, **settings: Any) -> RedisStore:
        """A store on a connection of its own, as another relay process would have."""
        client = await self.client(**settings)
        await client.when_ready()
        return RedisStore(client)

    async def eventually(self, condition: Callable[[], Awaitable[bool]], what: str) -> None:
        """Wait, for at most 10 seconds, until C{await condition()} is true."""
        for _ in range(200):
            if await condition():
                return
            await deferLater(reactor, 0.05)
        self.fail(f"timed out waiting for {what}")


class RedisStoreContractTests(StoreContract, RedisTestCase):
    """The contract, for two Redis stores on separate connections to one Redis."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self.start_server()
        self.store = await self.new_store()
        self.other = await self.new_store()


class KeyTests(RedisTestCase):
    """What the store keeps in Redis: names, types, expiries, content, memory."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self.start_server()
        self.store = await self.new_store()
        self.redis = self.store.client

    async def pair_session(self, session: str, *, now: float = NOW) -> None:
        """What one pairing leaves: a code used up, two rate windows, a keyed bridge."""
        await self.store.hit(f"code:session:{session}", now, 60.0, 5)
        await self.store.hit("code:ip:192.0.2.1", now, 60.0, 5)
        await self.store.add_code("123456", PendingCode(session, KEY, now + 300), now)
        await self.store.take_code("123456", now)
        peer = await self.store.next_peer(session)
        token_expiry = now + 30 * 86400
        record = BridgeRecord(peer, "j" * 22, "laptop.example", now, token_expiry, code="123456")
        await self.store.add_bridge(session, record)
        await self.store.set_bridge_key(session, peer, KEY)

    async def test_keys_namespaced_typed_and_expiring(self) -> None:
        """
        Every key starts with the prefix; each kind has its type, and all but
        the bridge counters expire: codes within 5 minutes, rate windows with
        their window, revocations and bridge records with their tokens.
        """
        session = "S" * 24
        await self.store.add_code("654321", PendingCode(session, KEY, NOW + 300), NOW)
        await self.pair_session(session)
        await self.store.revoke("jti-1", NOW + 86400, NOW)
        await self.store.set_presence(session, Presence(1, "laptop", "1.0", NOW, KEY))
        keys = sorted(await self.redis.call("KEYS", "*"))
        expected = {
            "coder1:code:654321": ("string", 300_000),
            f"coder1:rate:code:session:{session}": ("zset", 60_000),
            "coder1:rate:code:ip:192.0.2.1": ("zset", 60_000),
            "coder1:revoked:jti-1": ("string", 86400_000),
            f"coder1:bridges:{session}": ("hash", 30 * 86400_000),
            f"coder1:peers:{session}": ("string", None),
            f"coder1:presence:{session}": ("hash", None),
        }
        self.assertEqual(keys, sorted(expected))
        for key, (kind, lifetime) in expected.items():
            self.assertEqual(await self.redis.call("TYPE", key), kind, key)
            ttl = await self.redis.call("PTTL", key)
            if lifetime is None:
                self.assertEqual(ttl, -1, key)
            else:
                self.assertTrue(lifetime - 5000 < ttl <= lifetime, (key, ttl))

    async def test_content_is_ids_labels_keys_and_times(self) -> None:
        """A session's hashes hold its records as fields, nothing but ids, labels, keys, times."""
        session = "S" * 24
        await self.pair_session(session)
        flat = await self.redis.call("HGETALL", f"coder1:bridges:{session}")
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        self.assertEqual(sorted(fields), ["1", "1:key"])
        self.assertEqual(
            fields["1"],
            '{"jti":"jjjjjjjjjjjjjjjjjjjjjj","label":"laptop.example",'
            f'"paired_at":{NOW!r},"expires_at":{NOW + 30 * 86400!r}}}',
        )
        self.assertEqual(fields["1:key"], KEY)

    async def test_prefix_separates_deployments(self) -> None:
        """Stores with different prefixes share nothing on one Redis."""
        staging = await self.new_store(prefix="staging:")
        await self.store.add_code("111111", PendingCode("s", KEY, NOW + 300), NOW)
        self.assertIsNone(await staging.take_code("111111", NOW))
        self.assertTrue(await staging.add_code("111111", PendingCode("t", KEY, NOW + 300), NOW))
        await staging.revoke("jti", NOW + 60, NOW)
        self.assertFalse(await self.store.is_revoked("jti", NOW))
        self.assertEqual(
            sorted(await self.redis.call("KEYS", "staging:*")),
            ["staging:code:111111", "staging:revoked:jti"],
        )

    async def test_expired_records_pruned(self) -> None:
        """Listing drops expired records (key and code too) from the session's hash."""
        await self.store.add_bridge("s", BridgeRecord(1, "old", "a", NOW, NOW + 10, code="1"))
        await self.store.add_bridge("s", BridgeRecord(2, "new", "b", NOW, NOW + 1000, KEY))
        self.assertEqual([r.peer for r in await self.store.bridges("s", NOW + 10)], [2])
        fields = await self.redis.call("HKEYS", "coder1:bridges:s")
        self.assertEqual(sorted(fields), ["2", "2:key"])

    async def test_idle_windows_vanish(self) -> None:
        """A rate window's key expires one window after its newest event."""
        await self.store.hit("k", NOW, 0.05, 5)
        await self.eventually(
            lambda: self.redis.call("EXISTS", "coder1:rate:k").addCallback(lambda n: n == 0),
            "the idle window to vanish",
        )

    async def test_idle_session_memory(self) -> None:
        """
        An idle paired session (its counter, its bridge's record and key)
        takes at most 2 KiB of Redis memory, by MEMORY USAGE, once its code
        and rate windows are gone.
        """
        session = "S" * 24
        await self.pair_session(session)
        await self.redis.call(
            "DEL", "coder1:rate:code:session:" + session, "coder1:rate:code:ip:192.0.2.1"
        )
        total = 0
        for key in await self.redis.call("KEYS", "*"):
            total += await self.redis.call("MEMORY", "USAGE", key, "SAMPLES", "0")
        self.assertLessEqual(total, SESSION_BUDGET)

    async def test_scripts_reloaded(self) -> None:
        """After Redis forgets its scripts (as at a restart), they are sent again."""
        await self.store.hit("k", NOW, 60.0, 5)
        await self.redis.call("SCRIPT", "FLUSH")
        self.assertIsNone(await self.store.hit("k", NOW, 60.0, 5))
        self.assertEqual(await self.store.count("k", NOW, 60.0), 2)
        sha = Script("return 1").sha1
        self.assertEqual(await self.redis.eval(Script("return 1"), []), 1)
        self.assertEqual(await self.redis.call("SCRIPT", "EXISTS", sha), [1])

    async def test_command_errors_pass_through(self) -> None:
        """A command Redis refuses fails with Redis's error, not as if Redis were down."""
        await self.redis.call("SET", "coder1:x", "text")
        failure = self.assertFailure(self.redis.call("INCR", "coder1:x"), txredisapi.ResponseError)
        await failure


class AvailabilityTests(RedisTestCase):
    """Calls fail within their deadline while Redis cannot answer, and work again after."""

    async def test_frozen_redis_times_out(self) -> None:
        """
        While Redis is frozen (connection open, no answers), a call fails with
        StoreUnavailable when its 2 s deadline passes on the injected clock,
        not before; once Redis goes on, calls work again.
        """
        await self.start_server()
        clock = Clock()
        client = await self.client(clock=clock)
        await client.when_ready()
        self.server.pause()
        call = client.call("PING")
        clock.advance(1.9)
        self.assertNoResult(call)
        clock.advance(0.1)
        failure = self.failureResultOf(call, StoreUnavailable)
        self.assertIn("did not answer within 2 s", str(failure.value))
        self.server.resume()
        await self.eventually(lambda: _pong(client), "PING to work again")

    async def test_stopped_redis_fails_fast_then_recovers(self) -> None:
        """
        When Redis is gone, calls fail with StoreUnavailable at once (no
        deadline to wait for); when it is back on the same port, the client
        reconnects by itself, and what it was told was done (a revocation)
        is still there.
        """
        await self.start_server()
        store = await self.new_store()
        await store.revoke("jti", NOW + 3600, NOW)
        await self.server.stop(kill=True)
        await self.eventually(lambda: succeed(not store.client.connected), "the loss")
        self.failureResultOf(store.is_revoked("jti", NOW), StoreUnavailable)
        await self.server.start()
        await self.eventually(lambda: _pong(store.client), "the reconnection")
        self.assertTrue(await store.is_revoked("jti", NOW))

    async def test_never_reachable(self) -> None:
        """
        With no Redis at all, the first call waits its deadline, and later
        calls fail at once; C{when_ready} waits for a connection.
        """
        self.server = RedisServer(FilePath(self.mktemp()), free_port())  # never started
        clock = Clock()
        client = await self.client(clock=clock)
        ready = client.when_ready()
        first = client.call("PING")
        self.assertNoResult(first)
        clock.advance(2)
        self.failureResultOf(first, StoreUnavailable)
        self.failureResultOf(client.call("PING"), StoreUnavailable)
        self.assertNoResult(ready)
        ready.cancel()
        self.failureResultOf(ready)

    async def test_password(self) -> None:
        """
        With the right password the store works; with a wrong one Redis
        refuses the connection, C{when_ready} says so, and calls fail at once.
        With none, Redis's NOAUTH answer is a refusal too, said the same way.
        """
        await self.start_server("--requirepass", "s3cret word")
        good = await self.client(password="s3cret word")
        await good.when_ready()
        self.assertEqual(await good.call("PING"), "PONG")
        clock = Clock()
        bad = await self.client(clock=clock, password="wrong")
        try:
            await bad.when_ready()
        except StoreUnavailable as e:
            refusal = str(e)
        else:
            self.fail("a wrong password was not refused")
        self.assertIn("WRONGPASS", refusal)
        self.assertNotIn("wrong", refusal.replace("WRONGPASS", ""))
        self.failureResultOf(bad.call("PING"), StoreUnavailable)
        anonymous = await self.client()
        await anonymous.when_ready()  # connected: nothing is asked of it yet
        try:
            await anonymous.call("PING")
        except StoreUnavailable as e:
            self.assertIn("refused the relay: it wants a password (NOAUTH)", str(e))
        else:
            self.fail("a missing password went unnoticed")
        self.assertIsNotNone(anonymous.refusal)
        self.failureResultOf(anonymous.when_ready(), StoreUnavailable)
        self.failureResultOf(anonymous.call("PING"), StoreUnavailable)


class TLSTests(RedisTestCase):
    """rediss://: TLS, and the server's certificate checked."""

    async def test_rediss(self) -> None:
        """
        Over TLS with the CA of the server's certificate the store works;
        with another CA the client never connects (nor says it did): calls fail.
        """

        directory = FilePath(self.mktemp())
        load_or_create(directory, tls_cert=None, tls_key=None, hostnames=["127.0.0.1"])
        cert, key = directory.child(DEV_CERT_NAME), directory.child(DEV_KEY_NAME)
        self.server = await start_redis(self, tls=(cert, key))
        trusting = await self.new_store()
        self.assertTrue(await trusting.add_code("123456", PendingCode("s", KEY, NOW + 9), NOW))
        connected: list[str] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "connected to Redis" in formatEvent(event):
                connected.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        stranger = FilePath(self.mktemp())
        load_or_create(stranger, tls_cert=None, tls_key=None, hostnames=["127.0.0.1"])
        clock = Clock()
        doubting = await self.client(clock=clock, ca_file=stranger.child(DEV_CERT_NAME))
        call = doubting.call("GET", "coder1:code:123456")
        assert self.server.process is not None
        await self.server.process.wait_for(rb"Error accepting a client connection: .*unknown ca")
        clock.advance(2)
        self.failureResultOf(call, StoreUnavailable)
        self.assertFalse(doubting.connected)
        self.assertEqual(connected, [])


class SubscriptionTests(RedisTestCase):
    """Pub/sub: messages arrive; after Redis restarts, the channels are subscribed again."""

    async def test_messages_and_reconnection(self) -> None:
        """
        Messages on a subscribed channel arrive as bytes (not those of other
        channels); after a Redis restart the subscription is made again, with
        the channels asked for and given up meanwhile, C{on_reconnect} is
        called once, and messages arrive again.
        """
        await self.start_server()
        publisher = await self.client()
        client = await self.client()
        messages: list[tuple[str, bytes]] = []
        reconnected: list[None] = []
        subscription = client.subscription(
            lambda channel, message: messages.append((channel, message)),
            lambda: reconnected.append(None),
        )
        await subscription.subscribe("coder1:node:a", "coder1:node:b")
        await publisher.call("PUBLISH", "coder1:node:a", b"\x00\xffframe")
        await publisher.call("PUBLISH", "coder1:node:c", "not ours")
        await self.eventually(lambda: succeed(bool(messages)), "a message")
        self.assertEqual(messages, [("coder1:node:a", b"\x00\xffframe")])
        await self.server.stop()
        await self.eventually(lambda: succeed(not subscription.connected), "the loss")
        # Unconfirmed while Redis is down (it may fail its deadline), but wanted.
        subscription.subscribe("coder1:node:c").addErrback(lambda f: f.trap(StoreUnavailable))
        await subscription.unsubscribe("coder1:node:b")
        self.assertEqual(subscription.channels, {"coder1:node:a", "coder1:node:c"})
        self.assertEqual(reconnected, [])
        await self.server.start()
        await self.eventually(lambda: succeed(bool(reconnected)), "the resubscription")
        await self.eventually(lambda: _pong(publisher), "the publisher")
        for channel in ("coder1:node:b", "coder1:node:a", "coder1:node:c"):
            await publisher.call("PUBLISH", channel, "again")
        await self.eventually(lambda: succeed(len(messages) == 3), "messages after the restart")
        self.assertEqual(messages[1:], [("coder1:node:a", b"again"), ("coder1:node:c", b"again")])
        self.assertEqual(reconnected, [None])


class PersistenceTests(RedisTestCase):
    """The relay learns at start what a Redis crash could lose, and says it."""

    async def test_appendonly_off(self) -> None:
        """Redis without an append-only file: a warning that revocations can be lost."""
        await self.start_server("--appendonly", "no")
        [(level, text)] = await (await self.new_store()).persistence()
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("appendonly no", text)
        self.assertIn("revocation", text)

    async def test_always_says_nothing(self) -> None:
        """Redis syncing every write (as the fixture runs it): nothing to say."""
        await self.start_server()
        self.assertEqual(await (await self.new_store()).persistence(), [])

    async def test_config_disabled(self) -> None:
        """With CONFIG renamed away, the check says it could not look, and what to set."""
        await self.start_server("--rename-command", "CONFIG", "")
        [(level, text)] = await (await self.new_store()).persistence()
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("could not read", text)
        self.assertIn("appendfsync always", text)


class PersistenceNoteTests(SynchronousTestCase):
    """What each setting of appendonly and appendfsync is worth."""

    def notes(self, **config: str) -> list[tuple[LogLevel, str]]:
        flat = [part for pair in config.items() for part in pair]
        return persistence_notes("redis://r:6379/0", flat)

    def test_everysec(self) -> None:
        """everysec: a note (not a warning) that a machine crash loses a second or two."""
        [(level, text)] = self.notes(appendonly="yes", appendfsync="everysec")
        self.assertEqual(level, LogLevel.info)
        self.assertIn("last second or two", text)

    def test_fsync_no(self) -> None:
        """appendfsync no: a warning that the kernel decides, about 30 seconds."""
        [(level, text)] = self.notes(appendonly="yes", appendfsync="no")
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("30 seconds", text)


async def _pong(client: RedisClient) -> bool:
    try:
        return bool(await client.call("PING") == "PONG")
    except StoreUnavailable:
        return False
