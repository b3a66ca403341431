"""
Smoke runs of every benchmark in bench/ at tiny sizes, so that they keep working.

These check that each benchmark runs end to end and fills its table, not how fast
anything is: the numbers come from ``python -m bench`` (docs/performance.md).  The
peer baselines (termpair, terminado) run only where they are installed, in the
interpreter named by CODER1_BENCH_PEER_PYTHON or in this one; elsewhere those tests skip.
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from bench import (
    bulk,
    capacity,
    capacity_mesh,
    forward,
    harness,
    keystroke,
    mesh,
    startup,
    terminals,
)
from bench.__main__ import parser, rounds
from bench.stats import Spread, Table, percentile


def options(**given: Any) -> argparse.Namespace:
    """The options `python -m bench` would parse, with tiny sizes."""
    defaults = parser().parse_args(["all", "--quick", "--rounds", "1"])
    for key, value in given.items():
        setattr(defaults, key, value)
    return defaults


class BenchTestCase(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(harness.settle()))
        self.addCleanup(lambda: Deferred.fromCoroutine(harness.stop_all()))

    def assertFilled(self, table: Table, rows: list[str], metric: str) -> None:
        """Each named row has a finite, positive value for C{metric}."""
        names = [r.name for r in table.rows]
        for name in rows:
            self.assertIn(name, names)
            value = table.median(name, metric)
            self.assertTrue(math.isfinite(value) and value > 0, (name, metric, value))
        self.assertIn("|", table.render())

    def needs(self, module: str) -> None:
        if not harness.peer_available(module):
            raise SkipTest(f"{module} is not installed in {harness.peer_python()}")

    def needs_redis(self) -> None:
        """Skip, saying why, where redis-server (or its client library) is missing."""
        missing = mesh.redis_missing()
        if missing:
            print(f"skipped: {missing}")
            raise SkipTest(missing)


class StatsTests(TestCase):
    def test_percentile_and_spread(self) -> None:
        """Percentiles interpolate between ranks; a spread is median, min and max."""
        self.assertEqual(percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50), 3.0)
        self.assertEqual(percentile([0.0, 10.0], 99), 9.9)
        self.assertEqual(Spread.of([3.0, 1.0, 2.0]), Spread(2.0, 1.0, 3.0, 3))

    def test_ratio_against_baseline(self) -> None:
        """The ratio column divides each row's median by the baseline row's."""
        table = Table("t", [forward.Metric("m", "m")], "base")
        table.row("base").add("m", 2.0)
        table.row("other").add("m", 3.0)
        self.assertIn("1.50x", table.render())

    def test_rounds_as_asked(self) -> None:
        """
        --rounds is what every benchmark runs, capacity included; without it,
        capacity runs once (its steps take minutes) and the others five times.
        """
        self.assertEqual(rounds("capacity", 3), 3)
        self.assertEqual(rounds("capacity", None), 1)
        self.assertEqual(rounds("keystroke", None), 5)
        self.assertEqual(rounds("keystroke", 2), 2)

    def test_pooled_keystrokes(self) -> None:
        """
        The pooled columns are the p99 of all rounds' keystrokes together, not a
        median of per-round p99s, and the share of them over 1 ms.
        """
        row = Table("t", [], "").row("coder1")
        # Two rounds of 100: the first has two slow keystrokes, the second none.
        # Their own p99s are 3.01 and 0.5 ms (median 1.755); pooled, 2 of 200 are
        # slow and the p99 is 0.525 ms.
        samples = [0.0005] * 98 + [0.003, 0.004] + [0.0005] * 100
        keystroke.add_pooled(row, samples)
        self.assertAlmostEqual(row.values["pooled"][0], 525.0)
        self.assertEqual(row.values["slow"], [1.0])


class KeystrokeTests(BenchTestCase):
    async def test_coder1_and_naive(self) -> None:
        """A few keystrokes through the full system and through the naive relay."""
        table = await keystroke.run(options(count=5, systems=["naive", "coder1"]))
        self.assertFilled(table, [keystroke.BASELINE, "coder1"], "p99")
        self.assertFilled(table, [keystroke.BASELINE, "coder1"], "pooled")

    async def test_stages(self) -> None:
        """
        The --stages pass stamps every keystroke in the bridge and on the browser's
        side, and fills each stage's row: the hops through the relay, the bridge's
        steps, the reactor turns counted, and each stage's mean over the slowest
        keystrokes.
        """
        table = await keystroke.stages(options(count=20))
        stages = [name for name, _, _ in keystroke.STAGES]
        self.assertFilled(table, stages, "p50")
        self.assertFilled(table, ["round trip", "relay, both hops"], "slow")
        self.assertGreaterEqual(
            table.median("round trip", "slow"), table.median("round trip", "mean")
        )
        self.assertIn("20 of 20 keystrokes matched", "\n".join(table.notes))
        self.assertIn("bridge: reactor turns, read to socket write (a count)", table.render())

    async def test_faster_than_a_person(self) -> None:
        """
        A thousand keystrokes sent back to back, more than the relay's default
        message burst (400): the benchmark's relay has its limits raised, or it
        would close the IDE (4029) part way, as it did before those options
        were passed, and the benchmark would time out.
        """
        system = terminals.Coder1()
        await system.setup(keystroke.COMMAND)
        self.addCleanup(lambda: Deferred.fromCoroutine(system.teardown()))
        await system.open()
        arrived = system.output.expect(b"z")
        for _ in range(999):
            system.send(b"a")
        system.send(b"z")
        await harness.with_timeout(arrived, 30, "the last keystroke's echo")
        self.assertEqual(system.output.total, 1000)

    async def test_across_nodes(self) -> None:
        """
        A few keystrokes with the tab and the bridge on different relay processes
        of one Redis, and on the same one: the ratios are against the same node.
        """
        self.needs_redis()
        table = await keystroke.run(options(count=5, systems=["coder1-node", "coder1-cross"]))
        self.assertEqual(table.baseline, "coder1 same node of two")
        for metric in ("p50", "cpu"):
            self.assertFilled(table, ["coder1 same node of two", "coder1 across nodes"], metric)

    async def test_peers(self) -> None:
        """A few keystrokes through termpair and terminado, where installed."""
        self.needs("termpair")
        self.needs("terminado")
        table = await keystroke.run(options(count=5, systems=["termpair", "terminado"]))
        self.assertFilled(table, ["termpair", "terminado"], "p50")


class BulkTests(BenchTestCase):
    async def test_coder1_and_naive(self) -> None:
        """A little output through the full system (terminal, command) and the naive relay."""
        table = await bulk.run(
            options(size="64K", systems=["naive-pty", "coder1", "coder1-command"])
        )
        self.assertFilled(table, [bulk.BASELINE, "coder1", "coder1 command"], "mbps")

    async def test_coder1_alone_several_rounds(self) -> None:
        """
        The product alone, two rounds: the next round's terminal opens as the last one's
        PTY_EXIT arrives, and that frame does not end the new one.
        """
        table = await bulk.run(options(size="64K", systems=["coder1"], rounds=2))
        self.assertFilled(table, ["coder1"], "mbps")
        self.assertEqual(len(table.row("coder1").values["mbps"]), 2)

    async def test_other_output(self) -> None:
        """
        A file listing and random base64 arrive in full as the output, each
        named in the table's title (the listing's file is removed after).
        """
        for output, named in (("listing", "file listing"), ("random", "random bytes")):
            table = await bulk.run(options(size="64K", systems=["coder1"], output=output))
            self.assertFilled(table, ["coder1"], "mbps")
            self.assertIn(named, table.title)
        self.assertEqual(glob.glob(f"{tempfile.gettempdir()}/{harness.TMP_PREFIX}listing-*"), [])

    async def test_across_nodes(self) -> None:
        """A little output to a tab on one relay process from a bridge on another."""
        self.needs_redis()
        table = await bulk.run(options(size="64K", systems=["coder1", "coder1-cross"]))
        self.assertEqual(table.baseline, "coder1")
        self.assertFilled(table, ["coder1", "coder1 across nodes"], "mbps")

    async def test_peers(self) -> None:
        """A little output through termpair and terminado, where installed."""
        self.needs("termpair")
        self.needs("terminado")
        table = await bulk.run(options(size="64K", systems=["termpair", "terminado"]))
        self.assertFilled(table, ["termpair", "terminado"], "mbps")


class ForwardTests(BenchTestCase):
    async def test_forward(self) -> None:
        """Frames of both sizes through our relay and the naive one, ws and wss."""
        table = await forward.run(options(messages=64))
        rows = [f"{r} relay ({s})" for s in ("ws", "wss") for r in ("naive", "coder1")]
        self.assertFilled(table, rows, "cpu 100")
        self.assertFilled(table, rows, "rate 65536")


class BeforeTests(BenchTestCase):
    def before_tree(self) -> Path:
        """Another source tree: this one's packages, linked from a directory of its own."""
        tree = Path(self.mktemp())
        tree.mkdir()
        for name in ("bench", "coder1_bridge", "coder1_relay", "coder1_wire", "twisted"):
            (tree / name).symlink_to(harness.ROOT / name)
        self.patch(harness, "BEFORE", tree)
        return tree

    def record_processes(self) -> list[harness.Process]:
        """Every process the benchmark starts from now on."""
        started: list[harness.Process] = []

        class Recorded(harness.Process):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                started.append(self)

        self.patch(harness, "Process", Recorded)
        return started

    async def test_keystroke_rows_from_both_trees(self) -> None:
        """
        With --before DIR, the keystroke table has a row for this tree and one for
        DIR, and that row's relay and bridge ran from DIR.
        """
        tree = self.before_tree()
        started = self.record_processes()
        table = await keystroke.run(options(count=5, systems=["coder1"]))
        self.assertFilled(table, ["coder1", "coder1 (before)"], "p50")
        cwds = {(p.name, p.cwd) for p in started}
        self.assertIn(("relay", str(tree)), cwds)
        self.assertIn(("bridge", str(tree)), cwds)
        self.assertIn(("relay", str(harness.TREE)), cwds)

    async def test_forward_rows_from_both_trees(self) -> None:
        """With --before DIR, the forwarding table has our relay from both trees, ws and wss."""
        self.before_tree()
        table = await forward.run(options(messages=16))
        rows = [f"coder1 relay{t} ({s})" for s in ("ws", "wss") for t in ("", " (before)")]
        self.assertFilled(table, rows, "cpu 100")

    def test_before_must_be_a_source_tree(self) -> None:
        """--before with a directory that holds no relay is refused in one line."""
        from bench.__main__ import main

        with self.assertRaises(SystemExit) as raised:
            main(["forward", "--before", self.mktemp()])
        self.assertIn("not a coder1-bridge source tree", str(raised.exception))


class CapacityTests(BenchTestCase):
    async def test_capacity(self) -> None:
        """
        A few sessions paired and held through client processes; RSS, rates and
        the idle CPU (the idle wait shortened) filled.
        """
        self.patch(capacity, "IDLE_SECONDS", 1.0)
        [table] = await capacity.run(options(sessions=[16]))
        self.assertFilled(table, ["16 sessions"], "per")
        self.assertFilled(table, ["16 sessions"], "rate")
        self.assertFilled(table, ["16 sessions"], "idle")

    async def test_capacity_on_two_relays(self) -> None:
        """
        One relay process against two on a Redis of the run's own: the pairing
        rows filled; then sessions held across the two, with Redis's memory and
        its idle commands (the idle wait shortened); then every session's
        connections closed and opened again.
        """
        self.needs_redis()
        self.patch(capacity_mesh, "IDLE_WAIT", 2.0)
        pairing, held, reconnect = await capacity.run(
            options(relays=2, store="redis", sessions=[8, 16])
        )
        self.assertEqual(len(pairing.rows), 3)  # one; two at random; two by source address
        for metric in ("rate", "cpu", "cap", "redis", "ops", "client"):
            self.assertFilled(pairing, [r.name for r in pairing.rows], metric)
        for metric in ("rss", "files", "keys"):
            self.assertFilled(held, ["16 sessions", "16 sessions, 2 s later (idle)"], metric)
        # Redis's memory moves by more than a few sessions' worth on its own: measured only.
        self.assertTrue(math.isfinite(held.median("16 sessions", "redis")))
        self.assertFilled(held, ["16 sessions, 2 s later (idle)"], "idle ops")
        self.assertFilled(held, ["16 sessions, 2 s later (idle)"], "idle cpu")
        [row] = reconnect.rows
        for metric in ("rate", "cpu", "ops", "p50"):
            self.assertFilled(reconnect, [row.name], metric)

    test_capacity_on_two_relays.timeout = 300  # type: ignore[attr-defined]

    async def test_redis_needs_several_relays(self) -> None:
        """One relay process on Redis alone is refused, saying what to ask for."""
        with self.assertRaises(SystemExit) as raised:
            await capacity.run(options(relays=1, store="redis", sessions=[8]))
        self.assertIn("--relays 2", str(raised.exception))

    async def test_several_relays_need_redis(self) -> None:
        """Several relay processes in memory are refused, saying what to add."""
        with self.assertRaises(SystemExit) as raised:
            await capacity.run(options(relays=2, sessions=[8]))
        self.assertIn("--store redis", str(raised.exception))


class StartupTests(BenchTestCase):
    async def test_startup(self) -> None:
        """One round of relay and bridge start-up and a one-shot echo."""
        table = await startup.run(options())
        self.assertFilled(
            table,
            [startup.BASELINE, "bridge: start to connected (its own ready)"],
            "ms",
        )
        self.assertFilled(table, ["echo, warm: CMD_START to first byte"], "ms")


class RedisMemoryTests(TestCase):
    timeout = 30

    async def test_redis_memory(self) -> None:
        """
        A few sessions written to a scratch Redis: every figure filled, and
        every key the benchmark wrote deleted again.
        """
        from bench import redis_memory
        from coder1_relay.redis_client import RedisClient

        from .loopback import reactor
        from .redis_server import start_redis

        server = await start_redis(self)
        results = await redis_memory.measure(reactor, server.url, 8, io.StringIO())
        self.assertEqual(len(results), 4)
        self.assertTrue(all(math.isfinite(v) and v > 0 for v in results.values()), results)
        client = RedisClient(reactor, server.settings())
        client.startService()
        self.addCleanup(client.stopService)
        self.assertEqual(await client.call("KEYS", "*"), [])
