"""
The relay's metrics: content-free by construction, counted where things
happen, served on a private listener with health and readiness.
"""

from __future__ import annotations

import io
import threading
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from zope.interface.verify import verifyObject

from coder1_relay.context import Connections
from coder1_relay.health import MetricsService
from coder1_relay.metrics import (
    Direction,
    PairingOutcome,
    RelayCollector,
    RelayMetrics,
    Role,
    Snapshot,
    ThrottleReason,
    TimedStore,
    snapshot,
)
from coder1_relay.service import RelayService
from coder1_relay.store import IRelayStore, MemoryStore, PendingCode
from coder1_relay.tap import Options
from coder1_relay.telemetry import THROTTLE_REASONS
from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind

from .logs import capture_logs
from .loopback import (
    Browser,
    around_make_service,
    pair_bridge,
    reactor,
    settle,
    start_bridge,
    start_relay,
    stop_all,
)
from .test_mesh import MeshTestCase
from .test_routing import FakeLink, HubCase

#: What the command prints: it must never appear in the metrics.
CANARY = "canary-5be1d0c9-metrics"


def _snapshot(**fields: Any) -> Snapshot:
    values: dict[str, Any] = {
        "connections": dict.fromkeys(Role, 0),
        "paired_sessions": 0,
        "held_connections": 0,
        "frames": dict.fromkeys(Direction, 0),
        "bytes": dict.fromkeys(Direction, 0),
        "heartbeat_closes": 0,
        "throttles": dict.fromkeys(ThrottleReason, 0),
        "certificate_expires_at": 1_800_000_000.0,
    }
    return Snapshot(**{**values, **fields})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class VocabularyTests(SynchronousTestCase):
    """Labels come from enums only, and the enums match the relay's own vocabularies."""

    def test_throttle_reasons_match_telemetry(self) -> None:
        """The throttle label's enum is telemetry's list of reasons, no more, no less."""
        self.assertEqual({r.value for r in ThrottleReason}, THROTTLE_REASONS)

    def test_every_label_value_is_an_enum_value(self) -> None:
        """Whatever the counts, the exposition's label values are all enum values."""
        registry = CollectorRegistry()
        snapshot = _snapshot(
            connections={Role.IDE: 3, Role.BRIDGE: 2, Role.NODE: 1},
            frames={Direction.TO_BRIDGE: 7, Direction.TO_BROWSER: 9},
            throttles={reason: 1 for reason in ThrottleReason},
        )
        registry.register(RelayCollector(lambda: snapshot))
        allowed = {
            member.value
            for vocabulary in (Role, Direction, ThrottleReason, PairingOutcome)
            for member in vocabulary
        }
        found = samples(generate_latest(registry).decode())
        values = {value for _, labels in found for _, value in labels}
        self.assertLessEqual(values, allowed)
        self.assertEqual(found["coder1_relay_connections", (("role", "node"),)], 1)
        self.assertEqual(
            found["coder1_relay_forwarded_frames_total", (("direction", "to_browser"),)], 9
        )

    def test_scrape_thread_reads_the_snapshot(self) -> None:
        """
        Collected in another thread (the WSGI resource's), the collector reports
        the snapshot taken in the reactor thread, and reads nothing live.
        """
        taken: list[int] = []

        def take() -> Snapshot:
            taken.append(1)
            return _snapshot(paired_sessions=len(taken))

        collector = RelayCollector(take)
        collector.refresh()
        reported: list[Any] = []
        thread = threading.Thread(target=lambda: reported.extend(collector.collect()))
        thread.start()
        thread.join()
        self.assertEqual(len(taken), 1)
        [paired] = [f for f in reported if f.name == "coder1_relay_paired_sessions"]
        self.assertEqual(paired.samples[0].value, 1)


class _SlowStore(MemoryStore):
    """A store whose take_code answers when the test says."""

    def take_code(self, code: str, now: float) -> Deferred[PendingCode | None]:
        self.answer: Deferred[PendingCode | None] = Deferred()
        return self.answer


class _Answered(Deferred[Any]):
    """A Deferred that counts the times its callbacks were run."""

    runs = 0

    def _runCallbacks(self) -> None:
        self.runs += 1
        super()._runCallbacks()


class _AtOnceStore(MemoryStore):
    """A store whose hit answers at once, and whose count fails at once."""

    def hit(self, key: str, now: float, window: float, limit: int) -> Deferred[float | None]:
        self.answer = _Answered()
        self.answer.callback(None)
        return self.answer

    def count(self, key: str, now: float, window: float) -> Deferred[int]:
        return fail(ValueError("boom"))


class TimedStoreTests(SynchronousTestCase):
    """L{TimedStore} times every store call on the injected clock."""

    def test_latency_is_observed_by_operation(self) -> None:
        """A take_code answered 0.3 s later is observed as 0.3 s, labelled take_code."""
        clock, metrics, store = Clock(), RelayMetrics(), _SlowStore()
        timed = TimedStore(store, metrics.store_seconds, clock)
        self.assertTrue(verifyObject(IRelayStore, timed))
        answer = timed.take_code("123456", 0)
        clock.advance(0.3)
        store.answer.callback(None)
        self.assertIsNone(self.successResultOf(answer))
        self.successResultOf(timed.hit("k", 0, 60, 5))
        value = metrics.registry.get_sample_value
        labels = {"operation": "take_code"}
        self.assertAlmostEqual(value("coder1_relay_store_operation_seconds_sum", labels), 0.3)
        self.assertEqual(
            value("coder1_relay_store_operation_seconds_bucket", {**labels, "le": "0.25"}), 0
        )
        self.assertEqual(
            value("coder1_relay_store_operation_seconds_count", {"operation": "hit"}), 1
        )

    def test_failures_are_timed_and_passed_on(self) -> None:
        """A failed call is observed too, and its failure reaches the caller unchanged."""
        clock, metrics, store = Clock(), RelayMetrics(), _SlowStore()
        answer = TimedStore(store, metrics.store_seconds, clock).take_code("1", 0)
        store.answer.errback(ValueError("boom"))
        self.failureResultOf(answer, ValueError)
        count = metrics.registry.get_sample_value(
            "coder1_relay_store_operation_seconds_count", {"operation": "take_code"}
        )
        self.assertEqual(count, 1)

    def test_answered_at_once_timed_without_a_callback(self) -> None:
        """
        A call answered at once (a store in memory) is observed then and its
        answer handed back as it is, with no callback added to run; a failure
        answered at once too.
        """
        clock, metrics, store = Clock(), RelayMetrics(), _AtOnceStore()
        timed = TimedStore(store, metrics.store_seconds, clock)
        answer = timed.hit("k", 0, 60, 5)
        self.assertIs(answer, store.answer)
        self.assertEqual(store.answer.runs, 1)  # by its own callback(), only
        self.failureResultOf(timed.count("k", 0, 60), ValueError)
        value = metrics.registry.get_sample_value
        for operation in ("hit", "count"):
            labels = {"operation": operation}
            self.assertEqual(value("coder1_relay_store_operation_seconds_count", labels), 1)

    def test_registries_are_the_relays_own(self) -> None:
        """Two relays' metrics in one process do not collide (no global registry)."""
        first, second = RelayMetrics(), RelayMetrics()
        first.paired(PairingOutcome.OK)
        value = "coder1_relay_pairings_total"
        self.assertEqual(first.registry.get_sample_value(value, {"outcome": "ok"}), 1)
        self.assertEqual(second.registry.get_sample_value(value, {"outcome": "ok"}), 0)


def metrics_port(relay: RelayService) -> int:
    """The port C{relay}'s metrics listener has (its child service)."""
    [service] = [s for s in relay if isinstance(s, MetricsService)]
    assert service.port is not None
    port: int = service.port.getHost().port  # type: ignore[attr-defined]
    return port


async def fetch(relay: RelayService, path: str) -> tuple[int, str]:
    """GET C{path} on C{relay}'s metrics listener (plain HTTP): status and body."""
    url = f"http://127.0.0.1:{metrics_port(relay)}{path}"
    response = await Agent(reactor).request(b"GET", url.encode())
    return response.code, (await readBody(response)).decode()


class ListenerTests(TestCase):
    """A real relay with --metrics-listen, a paired bridge, a browser with a tab open."""

    timeout = 120

    async def start(self) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.relay = await start_relay(
            FilePath(self.mktemp()), metrics_listen="tcp:0:interface=127.0.0.1"
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        [service] = [s for s in self.relay if isinstance(s, MetricsService)]
        assert service.listening is not None
        await service.listening
        self.browser = Browser(self.relay)
        await self.browser.open_page()
        config = await pair_bridge(self.browser, FilePath(self.mktemp()), io.StringIO())
        self.bridge = await start_bridge(config, label="metrics-label-host")
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.bridge)))
        self.ide = await self.browser.connect_ide()
        self.addCleanup(self.ide.close)
        await self.ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))

    async def scrape(self) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        status, text = await fetch(self.relay, "/metrics")
        self.assertEqual(status, 200)
        return text, samples(text)

    async def test_metrics_hold_no_content(self) -> None:
        """
        After a command printed a canary through the relay, /metrics holds
        neither the canary, nor a session or connection id, nor the bridge's
        label or key, nor the clients' address, though it counted the frames.
        """
        await self.start()
        result = await self.ide.run(1, {"shell": f"printf '%s\\n' {CANARY}"})
        self.assertEqual(result.stdout, f"{CANARY}\n".encode())
        text, found = await self.scrape()
        endpoints = self.relay.context.hub.endpoints()
        sessions = {e.session for e in endpoints}
        self.assertTrue(sessions)
        [record] = await self.relay.context.store.bridges(sessions.pop(), reactor.seconds())
        secret_ish = [
            CANARY,
            "127.0.0.1",
            "metrics-label-host",
            record.label,
            record.jti,
            record.bridge_key,
            *(e.session for e in endpoints),
            *(e.connection_id for e in endpoints),
        ]
        for value in secret_ish:
            self.assertNotIn(value, text)
        self.assertGreater(
            found["coder1_relay_forwarded_frames_total", (("direction", "to_browser"),)], 2
        )
        self.assertGreater(
            found["coder1_relay_forwarded_bytes_total", (("direction", "to_bridge"),)], 0
        )

    async def test_metrics_follow_what_happens(self) -> None:
        """
        The pairing made at start counts as one code issued and one pairing
        "ok"; a wrong code counts as "invalid_code"; the tab and the bridge
        show up by role, and their session as paired.
        """
        await self.start()
        _, before = await self.scrape()
        self.assertEqual(before["coder1_relay_codes_issued_total", ()], 1)
        self.assertEqual(before["coder1_relay_pairings_total", (("outcome", "ok"),)], 1)
        self.assertEqual(before["coder1_relay_pairings_total", (("outcome", "invalid_code"),)], 0)
        for role, count in (("ide", 1), ("bridge", 1), ("node", 0)):
            self.assertEqual(before["coder1_relay_connections", (("role", role),)], count)
        self.assertEqual(before["coder1_relay_paired_sessions", ()], 1)
        status, _, _ = await self.browser.request(
            b"POST", "/api/pair", {"code": "000000", "label": "x"}, origin=False
        )
        self.assertEqual(status, 403)
        _, after = await self.scrape()
        self.assertEqual(after["coder1_relay_pairings_total", (("outcome", "invalid_code"),)], 1)
        self.assertEqual(after["coder1_relay_pairings_total", (("outcome", "ok"),)], 1)
        take_code = (("operation", "take_code"),)
        self.assertEqual(after["coder1_relay_store_operation_seconds_count", take_code], 2)
        expiry = after["coder1_relay_certificate_expiry_timestamp_seconds", ()]
        self.assertGreater(expiry, reactor.seconds() + 30 * 86400)

    async def test_public_port_serves_no_metrics(self) -> None:
        """The public (TLS) port has no /metrics, /healthz or /readyz: only the private one."""
        await self.start()
        for path in ("/metrics", "/healthz", "/readyz"):
            status, _, _ = await self.browser.request(b"GET", path, origin=False)
            self.assertEqual(status, 404, path)

    async def test_health_and_readiness(self) -> None:
        """
        /healthz says ok; /readyz says ready with each check, and 503 once the
        public listener has stopped (a relay draining or failed).
        """
        await self.start()
        self.assertEqual(await fetch(self.relay, "/healthz"), (200, "ok\n"))
        self.assertEqual(
            await fetch(self.relay, "/readyz"),
            (200, "ready\nlistening: ok\nstore: ok\ncertificate: ok\n"),
        )
        assert self.relay.port is not None
        await maybeDeferred(self.relay.port.stopListening)
        status, body = await fetch(self.relay, "/readyz")
        self.assertEqual(
            (status, body.splitlines()[:2]), (503, ["not ready", "listening: not listening"])
        )
        self.assertEqual((await fetch(self.relay, "/nothing"))[0], 404)


def scrape_registry(relay: RelayService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """C{relay}'s metrics, collected here in the reactor thread (no listener)."""
    assert relay.metrics is not None
    return samples(generate_latest(relay.metrics.registry).decode())


class AcrossNodesMetricsTests(MeshTestCase):
    """Two relay nodes in one process: each reports its own connections, by role."""

    async def test_node_links_counted_by_role(self) -> None:
        """
        With the tab on node A and its bridge on node B (which holds the
        session), A counts an ide connection, B a bridge and a node link; the
        command's frames are counted on B, where they are routed.
        """
        a, b = await self.start_nodes(metrics_listen="tcp:0:interface=127.0.0.1")
        browser = Browser(self.deployment)
        await browser.open_page()
        await self.pair_bridge(browser, code_on=0, redeem_on=1)
        ide = await self.connect(browser, a)
        result = await ide.run(1, {"shell": "echo across"})
        self.assertEqual(result.stdout, b"across\n")
        found = {name: scrape_registry(node) for name, node in (("a", a), ("b", b))}
        roles = {
            name: {
                role.value: metrics["coder1_relay_connections", (("role", role.value),)]
                for role in Role
            }
            for name, metrics in found.items()
        }
        self.assertEqual(
            roles,
            {"a": {"ide": 1, "bridge": 0, "node": 0}, "b": {"ide": 0, "bridge": 1, "node": 1}},
        )
        to_browser = ("coder1_relay_forwarded_frames_total", (("direction", "to_browser"),))
        self.assertEqual(found["a"][to_browser], 0)
        self.assertGreater(found["b"][to_browser], 0)
        self.assertEqual(found["b"]["coder1_relay_paired_sessions", ()], 1)


class HubCountsTests(HubCase):
    """The hub's own counts, as the collector's snapshot reads them (no network, a Clock)."""

    def state(self) -> Snapshot:
        return snapshot(self.hub, Connections(), self.telemetry, 0.0)

    def test_forwarded_frames_and_bytes(self) -> None:
        """A frame to the bridge, and one to two tabs: counted by direction, each copy."""
        self.hub.attach_ide("alice", FakeLink(), "c3")
        to_bridge = Envelope(Kind.PTY_INPUT, stream=1, peer=1, payload=b"ab").encode()
        to_browser = Envelope(Kind.CMD_STDOUT, stream=1, peer=1, payload=b"xyz").encode()
        self.ide.receive(to_bridge)
        self.bridge.receive(to_browser)
        state = self.state()
        self.assertEqual(state.frames, {Direction.TO_BRIDGE: 1, Direction.TO_BROWSER: 2})
        self.assertEqual(
            state.bytes,
            {Direction.TO_BRIDGE: len(to_bridge), Direction.TO_BROWSER: 2 * len(to_browser)},
        )
        self.assertEqual(state.paired_sessions, 1)

    def test_held_connections_and_heartbeat_closes(self) -> None:
        """
        A congested tab holds itself and its bridge (two held); a bridge silent
        for the heartbeat timeout is closed and counted.
        """
        self.hub.congested(self.ide)
        self.assertEqual(self.state().held_connections, 2)
        self.hub.drained(self.ide)
        self.assertEqual(self.state().held_connections, 0)
        for _ in range(4):
            self.clock.advance(15)
            self.ide.receive(Envelope(Kind.PING).encode())
        self.assertEqual(self.bridge_link.closed[0], closecodes.HEARTBEAT_TIMEOUT)  # type: ignore[index]
        self.assertEqual(self.state().heartbeat_closes, 1)

    def test_throttles_by_reason(self) -> None:
        """Telemetry's throttles since the start are reported by reason, every reason listed."""
        self.telemetry.throttled("rate")
        self.telemetry.throttled("rate")
        self.telemetry.throttled("timeout")
        throttles = self.state().throttles
        self.assertEqual(throttles[ThrottleReason.RATE], 2)
        self.assertEqual(throttles[ThrottleReason.TIMEOUT], 1)
        self.assertEqual(set(throttles), set(ThrottleReason))


class OptionTests(TestCase):
    """C{--metrics-listen} as an operator meets it."""

    def test_option_reaches_settings(self) -> None:
        """The option is an endpoint string, passed on as is; without it nothing is served."""
        options = Options()
        options.parseOptions(["--metrics-listen", "unix:/run/coder1/metrics.sock"])
        self.assertEqual(options.settings().metrics_listen, "unix:/run/coder1/metrics.sock")
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options.settings().metrics_listen)

    def loads_prometheus_client(self, *args: str) -> bool:
        """
        Whether making the relay with C{args} as C{twistd coder1-relay} does,
        in a process of its own, loads prometheus_client.
        """
        _, after = around_make_service(self.mktemp(), "'prometheus_client' in sys.modules", *args)
        return after == "True"

    def test_prometheus_client_only_when_served(self) -> None:
        """
        A relay without C{--metrics-listen} does not load prometheus_client (about
        1 MiB it would keep for nothing); with it, it does.
        """
        self.assertFalse(self.loads_prometheus_client())
        self.assertTrue(
            self.loads_prometheus_client("--metrics-listen", "tcp:0:interface=127.0.0.1")
        )

    async def test_port_in_use_is_one_line(self) -> None:
        """
        A metrics endpoint that cannot listen (its port is taken) is said in one
        error line naming it; the relay itself serves on.
        """
        events = capture_logs(self)
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        self.addCleanup(taken.stopListening)
        address: Any = taken.getHost()
        endpoint = f"tcp:{address.port}:interface=127.0.0.1"
        relay = await start_relay(FilePath(self.mktemp()), metrics_listen=endpoint)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        [service] = [s for s in relay if isinstance(s, MetricsService)]
        assert service.listening is not None
        await service.listening
        said = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(said), 1, said)
        self.assertTrue(said[0].startswith(f"cannot serve metrics on {endpoint}: "), said)
        self.assertNotIn("Traceback", said[0])
        status, _, _ = await Browser(relay).request(b"GET", "/", origin=False)
        self.assertEqual(status, 200)
