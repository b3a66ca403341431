"""Tests for L{coder1_relay.pairing} and L{coder1_relay.store}, on an injected clock."""

from __future__ import annotations

from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from coder1_relay.pairing import (
    CodeGrant,
    Pairing,
    PairingPolicy,
    RateLimited,
    RedeemRefused,
    Redemption,
)
from coder1_relay.store import (
    SWEEP_EVERY,
    BridgeRecord,
    IRelayStore,
    MemoryStore,
    StoreUnavailable,
)
from coder1_relay.tokens import TokenAuthority

T = TypeVar("T")
#: Public keys are opaque to the relay: any base64url string of the right length.
BROWSER_KEY = "B" * 87
BRIDGE_KEY = "R" * 87


class SlowStore:
    """A store whose every answer arrives one clock tick later, like a networked one."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def later(*args: Any) -> Deferred[Any]:
            result: Deferred[Any] = Deferred()
            value = self.inner_result(method(*args))
            self.clock.callLater(0.001, result.callback, value)
            return result

        return later

    @staticmethod
    def inner_result(d: Deferred[T]) -> T:
        results: list[T] = []
        d.addCallback(results.append)
        return results[0]


class AddBridgeFails(MemoryStore):
    """A store that keeps a new bridge's record but answers that it failed (a timeout)."""

    def add_bridge(self, session: str, record: BridgeRecord) -> Deferred[None]:
        super().add_bridge(session, record)
        return fail(StoreUnavailable("Redis did not answer within 2 s"))


class PairingTests(SynchronousTestCase):
    """Codes: random, live for 5 minutes, single use, bound to a session, rate limited."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore()
        self.pairing = self.make(self.store)

    def make(self, store: Any, policy: PairingPolicy | None = None) -> Pairing:
        tokens = TokenAuthority(Ed25519PrivateKey.generate(), "coder1-relay:t", self.clock)
        return Pairing(store, tokens, self.clock, policy or PairingPolicy())

    def code(self, session: str = "s1", ip: str = "192.0.2.1") -> CodeGrant:
        return self.successResultOf(
            Deferred.fromCoroutine(self.pairing.new_code(session, ip, BROWSER_KEY))
        )

    def redeem(self, code: str, ip: str = "192.0.2.9") -> Deferred[Redemption]:
        return Deferred.fromCoroutine(self.pairing.redeem(code, ip, "host"))

    def test_store_interface(self) -> None:
        """MemoryStore provides the whole store interface."""
        self.assertTrue(verifyObject(IRelayStore, self.store))

    def test_code_format(self) -> None:
        """Codes are 6 digits and live for exactly 5 minutes."""
        grant = self.code()
        self.assertRegex(grant.code, r"^[0-9]{6}$")
        self.assertEqual(grant.expires_at, self.clock.seconds() + 300)

    def test_keys_cross_over(self) -> None:
        """The bridge gets the browser's key; its own key comes after, once, for the browser."""
        done = self.successResultOf(self.redeem(self.code().code))
        self.assertEqual((done.browser_key, done.record.bridge_key), (BROWSER_KEY, ""))
        record = self.successResultOf(
            Deferred.fromCoroutine(self.pairing.present_key(done.claims, BRIDGE_KEY))
        )
        self.assertEqual((record.bridge_key, record.code), (BRIDGE_KEY, done.record.code))
        listed = self.successResultOf(self.store.bridges("s1", self.clock.seconds()))
        self.assertEqual((listed[0].bridge_key, listed[0].code), (BRIDGE_KEY, ""))
        self.failureResultOf(
            Deferred.fromCoroutine(self.pairing.present_key(done.claims, BROWSER_KEY)), ValueError
        )

    def test_keys_checked(self) -> None:
        """Something that is not a base64url key is refused on both sides."""
        done = self.successResultOf(self.redeem(self.code().code))
        for junk in ["", "short", "x" * 87 + "!", "é" * 87]:
            self.failureResultOf(
                Deferred.fromCoroutine(self.pairing.new_code("s", "192.0.2.1", junk)), ValueError
            )
            self.failureResultOf(
                Deferred.fromCoroutine(self.pairing.present_key(done.claims, junk)), ValueError
            )

    def test_redeem_binds_session(self) -> None:
        """Redeeming yields a token for the session that asked for the code, new peer each time."""
        first = self.successResultOf(self.redeem(self.code("alice").code)).claims
        second = self.successResultOf(self.redeem(self.code("alice").code)).claims
        other = self.successResultOf(self.redeem(self.code("bob").code)).claims
        self.assertEqual((first.session, first.peer), ("alice", 1))
        self.assertEqual((second.session, second.peer), ("alice", 2))
        self.assertEqual((other.session, other.peer), ("bob", 1))

    def test_single_use(self) -> None:
        """A code redeemed once is refused the second time."""
        code = self.code().code
        self.successResultOf(self.redeem(code))
        self.failureResultOf(self.redeem(code), RedeemRefused)

    def test_single_use_concurrent(self) -> None:
        """Two redemptions racing through a slow store: exactly one wins."""
        self.pairing = self.make(SlowStore(self.clock))
        d = Deferred.fromCoroutine(self.pairing.new_code("s", "192.0.2.1", BROWSER_KEY))
        self.clock.pump([0.001] * 10)
        code = self.successResultOf(d).code
        outcomes: list[str] = []
        for i in range(2, 6):
            self.redeem(code, ip=f"192.0.2.{i}").addCallbacks(
                lambda _: outcomes.append("won"),
                lambda f: outcomes.append("lost" if f.check(RedeemRefused) else repr(f)),
            )
        self.assertEqual(outcomes, [])
        self.clock.pump([0.001] * 50)
        self.assertEqual(sorted(outcomes), ["lost", "lost", "lost", "won"])

    def test_expiry(self) -> None:
        """A code works 299 s after issue and is refused at 300 s."""
        early, late = self.code().code, self.code().code
        self.clock.advance(299)
        self.successResultOf(self.redeem(early))
        self.clock.advance(1)
        self.failureResultOf(self.redeem(late), RedeemRefused)

    def test_codes_unique_among_live(self) -> None:
        """Hundreds of live codes never repeat."""
        policy = PairingPolicy(codes_per_minute=10_000)
        self.pairing = self.make(self.store, policy)
        codes = [self.code(f"s{i}", f"192.0.2.{i % 200}").code for i in range(500)]
        self.assertEqual(len(set(codes)), 500)

    def test_rate_limit_per_session(self) -> None:
        """The 6th code within a minute for one session is refused, with when to retry."""
        for i in range(5):
            self.code("s", f"192.0.2.{i}")
        self.clock.advance(10)
        failure = self.failureResultOf(
            Deferred.fromCoroutine(self.pairing.new_code("s", "192.0.2.99", BROWSER_KEY)),
            RateLimited,
        )
        self.assertAlmostEqual(failure.value.retry_after, 50)
        self.clock.advance(50)
        self.code("s", "192.0.2.99")

    def test_rate_limit_per_ip(self) -> None:
        """The 6th code within a minute from one IP is refused, whatever the session."""
        for i in range(5):
            self.code(f"s{i}", "192.0.2.1")
        self.failureResultOf(
            Deferred.fromCoroutine(self.pairing.new_code("fresh", "192.0.2.1", BROWSER_KEY)),
            RateLimited,
        )

    def test_brute_force_per_ip(self) -> None:
        """After 10 wrong codes from one IP in an hour, even a right code is refused from it."""
        good = self.code().code
        wrong = f"{(int(good) + 1) % 1_000_000:06d}"
        for _ in range(10):
            self.failureResultOf(self.redeem(wrong, ip="203.0.113.5"), RedeemRefused)
        self.failureResultOf(self.redeem(good, ip="203.0.113.5"), RateLimited)
        self.successResultOf(self.redeem(good, ip="203.0.113.6"))

    def test_brute_force_per_network(self) -> None:
        """
        After 30 wrong codes from one network (an IPv4 /24) in an hour, every
        address in it is refused, even with a right code; other networks are not.
        """

    def test_brute_force_bound_holds_concurrently(self) -> None:
        """
        Thirty wrong codes from one IP in flight at once through a slow
        (networked) store: only ten are tried, and the rest refused for the
        rate without being counted, as if they had come one by one.
        """
        store = SlowStore(self.clock)
        self.pairing = self.make(store)
        outcomes: list[type[BaseException] | None] = []
        for _ in range(30):
            self.redeem("000000", ip="203.0.113.5").addErrback(lambda f: outcomes.append(f.type))
        self.clock.pump([0.001] * 50)
        self.assertEqual(outcomes.count(RedeemRefused), 10)
        self.assertEqual(outcomes.count(RateLimited), 20)
        failures = store.inner.count("fail:ip:203.0.113.5", self.clock.seconds(), 3600)
        self.assertEqual(self.successResultOf(failures), 10)

    def test_good_code_not_counted(self) -> None:
        """A good code takes back the place its attempt took among the failures."""
        self.successResultOf(self.redeem(self.code().code, ip="203.0.113.5"))
        for key in ("fail:ip:203.0.113.5", "fail:global"):
            self.assertEqual(
                self.successResultOf(self.store.count(key, self.clock.seconds(), 3600)), 0
            )

    def test_failed_pairing_leaves_nothing_usable(self) -> None:
        """
        When the store fails to record the new bridge, the redemption fails
        (StoreUnavailable) and the token it would have given is revoked, so
        a record the store may have kept counts for nothing.
        """
        store = AddBridgeFails()
        self.pairing = self.make(store)
        self.failureResultOf(self.redeem(self.code().code), StoreUnavailable)
        [kept] = store._bridges["s1"].values()
        self.assertTrue(self.successResultOf(store.is_revoked(kept.jti, self.clock.seconds())))
        self.assertEqual(self.successResultOf(store.bridges("s1", self.clock.seconds())), [])

    def test_ipv6_network(self) -> None:
        """
        An IPv6 network is a /48: its 2^80 addresses share one budget; an
        IPv4-mapped IPv6 address counts in its IPv4 /24.
        """
        good = self.code().code
        for subnet in ("a", "b", "c"):
            for _ in range(10):
                self.failureResultOf(
                    self.redeem("000000", ip=f"2001:db8:1:{subnet}::1"), RedeemRefused
                )
        self.failureResultOf(self.redeem(good, ip="2001:db8:1:ffff::9"), RateLimited)
        self.successResultOf(self.redeem(good, ip="2001:db8:2::9"))
        for host in (1, 2, 3):
            for _ in range(10):
                self.failureResultOf(
                    self.redeem("000000", ip=f"::ffff:198.51.100.{host}"), RedeemRefused
                )
        self.failureResultOf(self.redeem(self.code().code, ip="198.51.100.9"), RateLimited)

    def test_distributed_guesser_cannot_block_pairing(self) -> None:
        """
        The audit's attack: 600 failed redemptions from 60 addresses, in 60
        networks, reach the relay-wide bound.  That no longer refuses everyone:
        a user from a network without failures still pairs, and so does one
        whose network failed twice (typos).  It slows the guesser: its
        networks are refused while the relay is under attack, and each new
        network it brings gets 3 guesses; an hour later all is as before.
        """
        for n in range(60):
            for _ in range(10):
                self.failureResultOf(self.redeem("000000", ip=f"10.{n}.0.1"), RedeemRefused)
        now = self.clock.seconds()
        self.assertEqual(self.successResultOf(self.store.count("fail:global", now, 3600)), 600)
        self.successResultOf(self.redeem(self.code().code, ip="192.0.2.77"))
        for _ in range(2):
            self.failureResultOf(self.redeem("000000", ip="198.51.100.1"), RedeemRefused)
        self.successResultOf(self.redeem(self.code().code, ip="198.51.100.1"))

        # The guesser's networks: refused, right code or not, from any address in them.
        good = self.code().code
        self.failureResultOf(self.redeem(good, ip="10.0.0.1"), RateLimited)
        self.failureResultOf(self.redeem(good, ip="10.0.0.2"), RateLimited)
        # A new network: 3 guesses, then refused.
        for _ in range(3):
            self.failureResultOf(self.redeem("000000", ip="10.200.0.1"), RedeemRefused)
        self.failureResultOf(self.redeem(good, ip="10.200.0.2"), RateLimited)
        self.successResultOf(self.redeem(good, ip="192.0.2.78"))

        self.clock.advance(3600)
        self.successResultOf(self.redeem(self.code().code, ip="10.0.0.1"))

    def test_malformed_codes(self) -> None:
        """Non-digit, short and long codes are refused (and counted as failures)."""
        for junk in ["", "12345", "1234567", "abcdef", "12 456", "١٢٣٤٥٦"]:
            self.failureResultOf(self.redeem(junk), RedeemRefused)
        self.assertEqual(
            self.successResultOf(self.store.count("fail:ip:192.0.2.9", self.clock.seconds(), 3600)),
            6,
        )

    def test_bad_label(self) -> None:
        """A label with control characters is refused before the code is used."""
        code = self.code().code
        self.failureResultOf(
            Deferred.fromCoroutine(self.pairing.redeem(code, "192.0.2.1", "x\n\x1b[2J")),
            ValueError,
        )
        self.successResultOf(self.redeem(code))


class RateWindowTests(SynchronousTestCase):
    """Rate-limit windows do not grow with every session and address ever seen."""

    def test_empty_windows_forgotten(self) -> None:
        """After their window passes, thousands of one-off keys are swept away."""
        store = MemoryStore()
        for i in range(SWEEP_EVERY):
            store.hit(f"code:ip:{i}", 0.0, 60.0, 5)
        self.assertEqual(len(store._windows), SWEEP_EVERY)
        for i in range(SWEEP_EVERY):
            store.hit(f"code:ip:late-{i}", 120.0, 60.0, 5)
        self.assertLessEqual(len(store._windows), SWEEP_EVERY)
        self.assertEqual(self.successResultOf(store.count("code:ip:late-1", 120.0, 60.0)), 1)


class PersistenceTests(SynchronousTestCase):
    """Revocations, paired bridges and bridge numbers survive a restart, in a 0600 file."""

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.file = directory.child("pairings.json")

    def test_revocations_survive_restart(self) -> None:
        """A new store on the same file still reports the token revoked."""
        self.successResultOf(MemoryStore(path=self.file).revoke("jti-1", 2e9, 1e9))
        restarted = MemoryStore(path=self.file)
        self.assertTrue(self.successResultOf(restarted.is_revoked("jti-1", 1e9)))
        self.assertFalse(self.successResultOf(restarted.is_revoked("jti-2", 1e9)))
        self.assertEqual(self.file.getPermissions().shorthand(), "rw-------")

    def test_bridges_and_numbers_survive_restart(self) -> None:
        """After a restart the session's bridges are still listed and numbers are not reused."""
        store = MemoryStore(path=self.file)
        peer = self.successResultOf(store.next_peer("s"))
        record = BridgeRecord(peer, "jti-1", "laptop", 1e9, 2e9, BRIDGE_KEY)
        self.successResultOf(store.add_bridge("s", record))
        restarted = MemoryStore(path=self.file)
        self.assertEqual(self.successResultOf(restarted.bridges("s", 1e9)), [record])
        self.assertEqual(self.successResultOf(restarted.next_peer("s")), 2)

    def test_expired_bridges_pruned(self) -> None:
        """
        Bridges whose tokens expired anyway are dropped from the files at the
        next snapshot (here every write is one).
        """
        store = MemoryStore(path=self.file, compact_at=0, compact_factor=0)
        store.add_bridge("s", BridgeRecord(1, "old", "a", 10.0, 100.0, BRIDGE_KEY))
        store.add_bridge("s", BridgeRecord(2, "new", "b", 200.0, 1000.0, BRIDGE_KEY))
        self.assertNotIn(b'"old"', self.file.getContent())
        self.assertIn(b'"new"', self.file.getContent())
        self.assertNotIn(b'"old"', self.file.siblingExtension(".journal").getContent())

    def test_expired_revocations_pruned(self) -> None:
        """Revocations of tokens that expired anyway are dropped at the next write."""
        store = MemoryStore()
        store.revoke("old", 100.0, 50.0)
        store.revoke("new", 1000.0, 200.0)
        self.assertFalse(self.successResultOf(store.is_revoked("old", 200.0)))
        self.assertTrue(self.successResultOf(store.is_revoked("new", 200.0)))
