"""
Tests for L{coder1_relay.redis_telemetry}: the telemetry of several relay
processes in one Redis (a real redis-server of each test's own).
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent

from coder1_relay.redis_telemetry import DAY, HOUR, RedisTelemetry
from coder1_relay.telemetry import RETENTION, Telemetry

from .loopback import reactor
from .test_redis_store import RedisTestCase
from .test_telemetry import _frame, _report

CANARY = "CANARY_7f3a9"
_NOTHING = {"counts": [], "connections": 0, "crash_reports": 0}


class SharedTelemetryTests(RedisTestCase):
    """Two relay processes' telemetry ends up in the same hourly and daily keys."""

    async def node(self, clock: Clock, per_day: int = 1000) -> Telemetry:
        """A relay process's telemetry, writing to the test's Redis."""
        client = await self.client()
        await client.when_ready()
        telemetry = Telemetry(None, clock, shared=RedisTelemetry(client, RETENTION, per_day))
        telemetry.startService()
        self.addCleanup(telemetry.stopService)
        return telemetry

    async def keys(self, part: str, n: int) -> None:
        """Wait until Redis has C{n} keys with C{part} in their names."""

        async def there() -> bool:
            found = await (await self.client()).call("KEYS", "*")
            return len([k for k in found if part in k]) == n

        await self.eventually(there, f"{n} {part} keys")

    async def everything(self) -> dict[str, Any]:
        """Every key in Redis with its value and time to live."""
        redis = (await self.client()).call
        found: dict[str, Any] = {}
        for key in await redis("KEYS", "*"):
            kind = await redis("TYPE", key)
            if kind == "hash":
                flat = await redis("HGETALL", key)
                value: Any = dict(zip(flat[::2], flat[1::2], strict=True))
            else:
                value = await redis("LRANGE", key, 0, -1)
            found[key] = (value, await redis("TTL", key))
        return found

    async def test_counts_from_every_node(self) -> None:
        """
        Counts, closed connections (count and seconds a role an hour) and crash
        rows of two nodes are added up in one key each; every key expires when
        its period is 30 days old.
        """
        await self.start_server()
        clock = Clock()
        now = time.time()
        clock.advance(now // HOUR * HOUR + 60)  # all in one hour: 2 connections, 30 + 90 s
        a, b = await self.node(clock), await self.node(clock)
        for node, seconds in ((a, 30), (b, 90)):
            node.command_started()
            node.connection_opened("bridge", "c1")
            clock.advance(seconds)
            node.connection_closed("c1")
            node.crash_report(_report(), "s", 1)
        a.crash_report(_frame(function=CANARY), "s", 2)
        clock.advance(10)
        await self.keys(":", 3)
        await self.eventually(
            lambda: succeed(all(n.snapshot()["pending"] == _NOTHING for n in (a, b))), "writes"
        )

        found = await self.everything()
        hour = int(clock.seconds() // HOUR) * HOUR
        day = int(clock.seconds() // DAY) * DAY
        counts, counts_ttl = found[f"coder1:telemetry:counts:{hour}"]
        self.assertEqual(counts, {"command_started|": "2"})
        connections, _ = found[f"coder1:telemetry:connections:{hour}"]
        self.assertEqual(connections, {"bridge|count": "2", "bridge|seconds": "120"})
        crashes, crashes_ttl = found[f"coder1:telemetry:crashes:{day}"]
        rows = [json.loads(row) for row in crashes]
        self.assertEqual([row["type"] for row in rows], [_report()["type"]] * 3)
        # The two nodes' rows in the order their writes arrived.
        functions = sorted(row["frames"][0]["function"] for row in rows)
        self.assertEqual(functions, ["?", "_spawn", "_spawn"])
        self.assertNotIn(CANARY, json.dumps(found))
        expires = hour + HOUR + RETENTION - now
        self.assertTrue(expires - 60 <= counts_ttl <= expires + 1, counts_ttl)
        self.assertTrue(day + DAY + RETENTION - now - 60 <= crashes_ttl, crashes_ttl)

    async def test_crash_rows_a_day_bounded(self) -> None:
        """Past the day's crash rows across all nodes, more are dropped and counted."""
        await self.start_server()
        clock = Clock()
        clock.advance(time.time())
        a, b = await self.node(clock, per_day=3), await self.node(clock, per_day=3)
        for n in range(2):
            a.crash_report(_report(), f"a{n}", 1)
            b.crash_report(_report(), f"b{n}", 1)
        clock.advance(10)

        def dropped() -> Deferred[bool]:
            return succeed(any(n.snapshot()["pending"]["counts"] for n in (a, b)))  # type: ignore[index]

        await self.eventually(dropped, "the dropped row counted")
        clock.advance(10)
        await self.keys(":counts:", 1)
        found = await self.everything()
        (crashes,) = [v for k, (v, _) in found.items() if ":crashes:" in k]
        self.assertEqual(len(crashes), 3)
        (counts,) = [v for k, (v, _) in found.items() if ":counts:" in k]
        self.assertEqual(counts, {"crash_report_dropped|full": "1"})

    async def test_redis_gone(self) -> None:
        """Without Redis, a batch is dropped with one warning line; nothing is raised."""
        server = await self.start_server()
        clock = Clock()
        clock.advance(time.time())
        node = await self.node(clock)
        await server.stop()
        with capturedLogs() as events:
            node.command_started()
            clock.advance(10)
            for _ in range(100):
                if any("Telemetry not written" in formatEvent(e) for e in events):
                    break
                await deferLater(reactor, 0.05)
        (line,) = [formatEvent(e) for e in events if "Telemetry" in formatEvent(e)]
        self.assertRegex(line, r"^Telemetry not written \(.*Redis.*\); this batch is dropped$")
