"""Readiness: the checks' logic on a Clock, and the probe that gathers their inputs."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from coder1_relay.health import (
    CERTIFICATE_MARGIN,
    Check,
    ReadinessProbe,
    Ready,
    judge,
    listening,
)
from coder1_relay.store import StoreUnavailable

DAY = 86400.0
NOW = 1_800_000_000.0


class JudgeTests(SynchronousTestCase):
    """L{judge}: ready only when every check passes; fixed wording either way."""

    def test_all_good_is_ready(self) -> None:
        """Listening, store reachable, certificate good for 30 days: 200, every check ok."""
        readiness = judge(
            NOW, listening=True, store_reachable=True, certificate_expires_at=NOW + 30 * DAY
        )
        self.assertEqual(readiness.status, 200)
        self.assertEqual(readiness.body(), b"ready\nlistening: ok\nstore: ok\ncertificate: ok\n")

    def test_certificate_margin(self) -> None:
        """A certificate expiring in 6 days (or expired) is not ready; in 8 days it is."""
        verdicts = {
            days: judge(
                NOW,
                listening=True,
                store_reachable=True,
                certificate_expires_at=NOW + days * DAY,
            )
            for days in (8, 6, -1)
        }
        self.assertEqual(CERTIFICATE_MARGIN, 7 * DAY)
        self.assertTrue(verdicts[8].ready)
        self.assertEqual(verdicts[6].status, 503)
        self.assertIn(b"certificate: expires within 7 days\n", verdicts[6].body())
        self.assertIn(b"certificate: expired\n", verdicts[-1].body())

    def test_each_failure_is_named(self) -> None:
        """Not listening and store unreachable: 503, and each check says which."""
        readiness = judge(
            NOW, listening=False, store_reachable=False, certificate_expires_at=NOW + 30 * DAY
        )
        self.assertEqual(readiness.status, 503)
        self.assertEqual(
            readiness.body(),
            b"not ready\nlistening: not listening\nstore: unreachable\ncertificate: ok\n",
        )
        self.assertEqual(
            [r.check for r in readiness.results if not r.ok], [Check.LISTENING, Check.STORE]
        )


class _Port:
    def __init__(self, connected: bool) -> None:
        self.connected = connected


class ProbeTests(SynchronousTestCase):
    """L{ReadinessProbe} pings the store, reads the time from its clock, and shares pings."""

    def probe(self, ping: Any = None, expires_in: float = 30 * DAY) -> ReadinessProbe:
        clock = Clock()
        clock.advance(NOW)
        self.clock = clock
        return ReadinessProbe(clock, lambda: True, lambda: NOW + expires_in, ping)

    def check(self, probe: ReadinessProbe) -> Deferred[Any]:
        return Deferred.fromCoroutine(probe.check())

    def test_memory_store_is_always_reachable(self) -> None:
        """With no ping (the in-memory store), the store check passes at once."""
        self.assertTrue(self.successResultOf(self.check(self.probe())).ready)

    def test_failed_ping_is_unreachable(self) -> None:
        """A ping that fails (StoreUnavailable, or anything else) makes the store unreachable."""
        for error in (StoreUnavailable("Redis at 10.0.0.7:6379 did not answer"), ValueError()):
            readiness = self.successResultOf(self.check(self.probe(lambda e=error: fail(e))))
            self.assertEqual(readiness.status, 503)
            self.assertIn(b"store: unreachable\n", readiness.body())
            self.assertNotIn(b"10.0.0.7", readiness.body())

    def test_clock_decides_certificate(self) -> None:
        """The certificate is judged at the clock's time: good now, not 24 days later."""
        probe = self.probe(expires_in=30 * DAY)
        self.assertTrue(self.successResultOf(self.check(probe)).ready)
        self.clock.advance(24 * DAY)
        self.assertFalse(self.successResultOf(self.check(probe)).ready)

    def test_probes_share_a_ping(self) -> None:
        """Probes arriving while a ping is under way wait for it: one PING for all."""
        pings: list[Deferred[str]] = []

        def ping() -> Deferred[str]:
            pings.append(Deferred())
            return pings[-1]

        probe = self.probe(ping)
        first, second = self.check(probe), self.check(probe)
        self.assertNoResult(first)
        self.assertEqual(len(pings), 1)
        pings[0].callback("PONG")
        self.assertTrue(self.successResultOf(first).ready)
        self.assertTrue(self.successResultOf(second).ready)
        self.check(probe)
        self.assertEqual(len(pings), 2)

    def test_listening_follows_the_port(self) -> None:
        """No port yet, or a port that stopped listening: not listening."""
        port: list[Any] = [None]
        check = listening(lambda: port[0])
        self.assertFalse(check())
        port[0] = _Port(True)
        self.assertTrue(check())
        port[0] = _Port(False)
        self.assertFalse(check())

    def test_ping_answer_is_not_inspected(self) -> None:
        """Any answer to the ping counts as reachable (Redis answers PONG)."""
        self.assertTrue(self.successResultOf(self.check(self.probe(lambda: succeed(None)))).ready)


class ReadyResourceTests(SynchronousTestCase):
    """C{/readyz} as a resource: the probe's verdict, or 503 when the checks themselves fail."""

    def render(self, probe: ReadinessProbe) -> DummyRequest:
        request = DummyRequest([b""])
        self.assertEqual(Ready(probe).render_GET(request), NOT_DONE_YET)  # type: ignore[arg-type]
        return request

    def test_verdict_is_the_answer(self) -> None:
        """A ready relay: 200, plain text, not cached, a line per check."""
        clock = Clock()
        request = self.render(ReadinessProbe(clock, lambda: True, lambda: 30 * DAY))
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(
            b"".join(request.written), b"ready\nlistening: ok\nstore: ok\ncertificate: ok\n"
        )
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_failing_check_is_503(self) -> None:
        """A check that raises (an unreadable certificate): 503, logged, no traceback sent."""

        def unreadable() -> float:
            raise ValueError("no PEM here")

        request = self.render(ReadinessProbe(Clock(), lambda: True, unreadable))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(
            b"".join(request.written), b"not ready\nthe checks failed: see the relay's log\n"
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
