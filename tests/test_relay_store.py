"""
The relay with a shared store: the C{--store} options, what clients get while
the store cannot answer (503, never a traceback), the persistence check at
start, and two relay processes sharing one Redis, where a code made on one is
redeemed on the other.
"""

from __future__ import annotations

import io
from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from coder1_bridge.pairing import pair
from coder1_relay.service import RelayService, RelaySettings
from coder1_relay.store import IRelayStore, MemoryStore, StoreUnavailable
from coder1_relay.tap import Options
from coder1_wire.secretfile import write_secret

from .logs import capture_logs
from .loopback import (
    Browser,
    reactor,
    relay_address,
    settle,
    start_child_relay,
    stop_all,
)
from .redis_server import start_redis
from .test_cli import TWISTD, Collect, spawn
from .test_relay_http import CODE_BODY, KEY, RelayTestCase


class OptionTests(SynchronousTestCase):
    """C{--store} and its companions, checked before anything starts."""

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_default_in_memory(self) -> None:
        """Without --store the relay keeps its state in memory (and pairings.json)."""
        self.assertIsNone(self.parse().settings().store)

    def test_store(self) -> None:
        """--store and --store-prefix reach the relay's settings."""
        settings = self.parse("--store", "redis://10.0.0.5:6380/2", "--store-prefix", "eu:")
        store = settings.settings().store
        assert store is not None
        self.assertEqual(
            (store.host, store.port, store.db, store.prefix), ("10.0.0.5", 6380, 2, "eu:")
        )

    def test_refused(self) -> None:
        """A malformed URL, a password in it, or companions without --store: a usage error."""
        for argv, expected in (
            (["--store", "redis//r"], "--store: the URL must be"),
            (["--store", "redis://:pw@r/0"], "--store-password-file"),
            (["--store", "redis://r:6379/x"], "the database must be a number"),
            (["--store-ca", "ca.pem"], "--store-ca goes with --store"),
            (["--store", "redis://r", "--store-ca", "ca.pem"], "needs a rediss://"),
        ):
            with self.assertRaises(usage.UsageError) as raised:
                self.parse(*argv)
            self.assertIn(expected, str(raised.exception), argv)
            self.assertNotIn("\n", str(raised.exception))


class TwistdTests(TestCase):
    """twistd refuses a bad --store with one line and a non-zero exit."""

    async def test_password_in_url(self) -> None:
        """
        twistd coder1-relay with a password in the --store URL exits non-zero,
        its last line saying where the password goes, and never shows it.
        """
        proto = Collect()
        state = FilePath(self.mktemp())
        spawn(
            proto,
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "coder1-relay",
                "--state-dir",
                state.path,
                "--store",
                "redis://:hunter2@127.0.0.1:6379/0",
            ],
        )
        code = await proto.ended
        self.assertNotEqual(code, 0)
        last = proto.output.decode().strip().splitlines()[-1]
        self.assertIn("--store: do not put the password in the URL", last)
        self.assertNotIn(b"hunter2", proto.output.replace(b"redis://:hunter2@", b""))
        self.assertFalse(state.exists())


@implementer(IRelayStore)
class SwitchableStore:
    """
    The in-memory store, failing every call with StoreUnavailable while
    C{down}, and calls of the methods in C{failing} always.
    """

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.failing: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any) -> Deferred[Any]:
            if self.down or name in self.failing:
                return fail(StoreUnavailable("Redis did not answer within 2 s"))
            return cast(Deferred[Any], method(*args))

        return call


class UnavailableTests(RelayTestCase):
    """While the store cannot answer, clients get 503 and a short JSON error, and retry."""

    async def start(self, *, open_page: bool = True) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.store = SwitchableStore()
        self.relay = RelayService(
            reactor,
            RelaySettings(state_dir=FilePath(self.mktemp()), listen="tcp:0:interface=127.0.0.1"),
            store=cast(IRelayStore, self.store),
        )
        self.relay.startService()
        await self.relay.listening
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        if open_page:
            await self.browser.open_page()

    async def test_api_answers_503(self) -> None:
        """
        Every API call that needs the store answers 503 with a JSON error and
        Retry-After (a redemption says to get a new code); nothing else is
        said, nothing is logged as a failure, and all works again once the
        store is back.
        """
        await self.start()
        token = (await self.pair())["token"]
        code = await self.browser.new_code()
        self.store.down = True
        bearer = {"Authorization": f"Bearer {token}"}
        for method, path, body, headers in (
            (b"POST", "/api/pairing-codes", CODE_BODY, None),
            (b"POST", "/api/pair", {"code": code, "label": "laptop"}, None),
            (b"POST", "/api/pair/key", {"bridge_key": KEY}, bearer),
            (b"GET", "/api/bridges", None, None),
            (b"POST", "/api/revoke", {"peer": 1}, None),
            (b"GET", "/api/token", None, bearer),
            (b"DELETE", "/api/token", None, bearer),
        ):
            status, answer, sent = await self.browser.request(method, path, body, headers=headers)
            self.assertEqual(status, 503, path)
            self.assertEqual(sorted(answer), ["error", "message"], path)
            self.assertEqual(answer["error"], "store-unavailable", path)
            self.assertIn("try again in a moment", answer["message"])
            self.assertEqual(sent.getRawHeaders("retry-after"), ["5"], path)
            if path == "/api/pair":
                self.assertIn("get a new code", answer["message"])
        self.store.down = False
        status, listed, _ = await self.browser.request(b"GET", "/api/bridges")
        self.assertEqual((status, [b["peer"] for b in listed["bridges"]]), (200, [1]))
        self.assertEqual(len(await self.browser.new_code()), 6)

    async def test_no_half_made_pairing(self) -> None:
        """
        A redemption whose last store call (counting the session's bridges)
        fails answers 503, saying to get a new code, and the token it made
        for the bridge, never handed out, is revoked: nothing of that pairing
        is listed or counted.
        """
        await self.start()
        code = await self.browser.new_code()
        self.store.failing = {"bridges"}
        status, answer, _ = await self.browser.request(
            b"POST", "/api/pair", {"code": code, "label": "laptop"}
        )
        self.assertEqual((status, answer["error"]), (503, "store-unavailable"))
        self.assertIn("get a new code", answer["message"])
        self.store.failing = set()
        [session] = self.store.inner._bridges
        [record] = self.store.inner._bridges[session].values()
        self.assertTrue(await self.store.inner.is_revoked(record.jti, reactor.seconds()))
        self.assertEqual(await self.store.inner.bridges(session, reactor.seconds()), [])

    async def test_bridge_handshake_503(self) -> None:
        """
        A bridge connecting while the store cannot answer is refused with 503
        (so it tries again later), not 401 (which would make it give up).
        """
        await self.start()
        token = (await self.pair())["token"]
        self.store.down = True
        await self.assertRefused(
            "/ws/bridge",
            {"Authorization": f"Bearer {token}"},
            503,
            "the relay cannot reach its storage right now; try again in a moment",
        )
        self.store.down = False
        opened, _ = await self.connect("/ws/bridge", {"Authorization": f"Bearer {token}"})
        self.assertTrue(opened)


@implementer(ILogObserver)
class RedisRelayTests(RelayTestCase):
    """An in-process relay on a real Redis."""

    timeout = 60

    async def start_on_redis(self, *redis_options: str) -> None:
        self.server = await start_redis(self, *redis_options)
        self.log = capture_logs(self)
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        settings = RelaySettings(
            state_dir=FilePath(self.mktemp()),
            listen="tcp:0:interface=127.0.0.1",
            store=self.server.settings(),
        )
        self.relay = RelayService(reactor, settings)
        self.relay.startService()
        await self.relay.listening
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        await self.browser.open_page()

    def logged(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.log if e.get("log_level") == level]

    async def test_persistence_warning(self) -> None:
        """A relay on a Redis without an append-only file warns at start what a crash loses."""
        await self.start_on_redis("--appendonly", "no")
        await self.relay.store_checked
        [warning] = [w for w in self.logged(LogLevel.warn) if "appendonly" in w]
        self.assertIn(f"Redis at {self.server.settings().address} has appendonly no", warning)
        self.assertIn("revoked bridges can connect again", warning)

    async def test_redis_down_then_back(self) -> None:
        """
        Pairing works through Redis; while Redis is down the API answers 503
        at once; once it is back (same files), the paired bridge is still
        listed and new codes are made again.
        """
        await self.start_on_redis()
        await self.relay.store_checked
        await self.pair()
        await self.server.stop(kill=True)
        status, answer, _ = await self.browser.request(b"POST", "/api/pairing-codes", CODE_BODY)
        self.assertEqual((status, answer["error"]), (503, "store-unavailable"))
        await self.server.start()
        for _ in range(100):
            status, _, _ = await self.browser.request(b"GET", "/api/bridges")
            if status == 200:
                break
            await deferLater(reactor, 0.05)
        status, listed, _ = await self.browser.request(b"GET", "/api/bridges")
        self.assertEqual([b["peer"] for b in listed["bridges"]], [1])
        self.assertEqual(len(await self.browser.new_code()), 6)


class CrossNodeTests(RelayTestCase):
    """Two relay processes, one Redis and one signing key: one deployment."""

    timeout = 90

    async def test_code_from_one_relay_redeemed_on_the_other(self) -> None:
        """
        A code the page gets from relay A is redeemed by C{coder1-bridge pair}
        against relay B; both relays list the bridge for the browser's
        session, and a revocation on A is seen on B.
        """
        server = await start_redis(self)
        state_a, state_b = FilePath(self.mktemp()), FilePath(self.mktemp())
        relay_a = await start_child_relay(state_a, "--store", server.url)
        self.addCleanup(lambda: Deferred.fromCoroutine(relay_a.child.stop()))
        key = state_a.child("signing-key.pem")
        write_secret(state_b.child(key.basename()), key.getContent())
        relay_b = await start_child_relay(state_b, "--store", server.url)
        self.addCleanup(lambda: Deferred.fromCoroutine(relay_b.child.stop()))
        browser_a = Browser(relay_a.as_service())
        await browser_a.open_page()
        code = await browser_a.new_code()
        config = await pair(
            reactor,
            FilePath(self.mktemp()),
            relay_address(relay_b.as_service()),
            code,
            "laptop",
            io.StringIO(),
            {},
        )
        self.assertEqual(config.peer, 1)
        browser_b = Browser(relay_b.as_service(), cookies=browser_a.cookies)
        for browser in (browser_a, browser_b):
            status, listed, _ = await browser.request(b"GET", "/api/bridges")
            self.assertEqual(status, 200)
            [bridge] = listed["bridges"]
            self.assertEqual((bridge["peer"], bridge["label"]), (1, "laptop"))
        status, _, _ = await browser_a.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual(status, 200)
        bearer = {"Authorization": f"Bearer {config.token}"}
        status, answer, _ = await browser_b.request(b"GET", "/api/token", headers=bearer)
        self.assertEqual((status, answer["message"]), (401, "token has been revoked"))
        self.assertIn(b"keeping shared state in Redis at", relay_b.child.output)
