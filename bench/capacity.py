"""
4. Capacity: idle paired sessions held by one relay process, and pairings per second.

A session is what one user has once paired: a browser session (cookie), a pairing code
redeemed for a bridge token, the bridge's WebSocket and the IDE's WebSocket, both open
and idle (answering the relay's PINGs).  Client processes (L{bench.capacity_worker},
each session from its own loopback address) pair sessions until the relay holds each
target count; then, after a pause, the relay's RSS is read.  RSS per session is
(RSS at N - RSS after 10 warm-up sessions) / (N - 10).

A pairing here is everything between "I want a bridge" and both sockets open: POST
/api/session (cookie JWT), POST /api/pairing-codes, POST /api/pair (code redeemed,
bridge JWT signed, pairings.json written), the bridge WebSocket (token verified) and the
IDE WebSocket: four TLS handshakes.  Pairings per second is observed with the clients
on the same two cores as the relay; the relay's CPU time per pairing gives the rate one
relay process could sustain with its own core (1 / CPU per pairing).  After each
step the relay's CPU is read for IDLE_SECONDS with nothing happening but the
heartbeats: CPU per second, per 1,000 sessions held.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from bench import harness as h
from bench.stats import Metric, Table, percentile
from coder1_relay.context import FD_RESERVE

WARMUP = 10
#: Seconds the relay's CPU is read after each step, with nothing happening but the
#: heartbeats (one interval: every connection PINGs once).
IDLE_SECONDS = 15.0
#: At most this long for one step's pairings (each worker stops starting new ones).
STEP_SECONDS = 240.0
#: File descriptors a relay keeps beside its connections: its --max-connections
#: default leaves them out of the open-file limit.
SPARE_FDS = FD_RESERVE


def fd_capacity() -> int:
    """How many sessions (two sockets each) one process can hold under this machine's limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 10**9
    return (hard - SPARE_FDS) // 2


async def run(options: Any) -> list[Table]:
    if getattr(options, "store", "memory") == "redis":
        from bench import capacity_mesh

        return await capacity_mesh.run(options)
    if (getattr(options, "relays", None) or 1) > 1:
        raise SystemExit("several relay processes share their state through Redis: --store redis")
    targets = options.sessions or ([200, 1000] if options.quick else [1000, 10000])
    limit = fd_capacity()
    notes = []
    capped = [min(t, limit) for t in targets]
    if capped != targets:
        notes.append(
            f"targets capped at {limit} sessions: this machine's hard RLIMIT_NOFILE is "
            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]} and cannot be raised here "
            "(no CAP_SYS_RESOURCE); one relay needs two sockets per session"
        )
    table = Table(
        "Capacity: idle paired sessions (browser + bridge connection each) in one relay process",
        [
            Metric("rss", "relay RSS", "MiB", digits=0),
            Metric("per", "RSS per session", "KiB", digits=1),
            Metric("rate", "pairings/s observed", "", False, digits=0),
            Metric("end", "pairings/s in the step's last 30 s", "", False, digits=0),
            Metric("cpu", "relay CPU per pairing", "ms", digits=2),
            Metric("cap", "pairings/s, relay CPU-bound", "", False, digits=0),
            Metric("p50", "pairing p50", "ms", digits=0),
            Metric("p99", "pairing p99", "ms", digits=0),
            Metric("idle", "relay CPU idle, per 1,000 sessions", "ms/s", digits=2),
        ],
        "",
        notes=notes,
    )
    trees: list[Path | None] = [None] if h.BEFORE is None else [h.BEFORE, None]
    for _ in range(options.rounds):
        for tree in trees:
            await _round(table, capped, options, tree)
    return [table]


async def _round(table: Table, targets: list[int], options: Any, tree: Path | None) -> None:
    """One relay (from C{tree}, else L{h.TREE}) grown to each target in turn."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    with h.running_from(tree):
        relay = await h.start_relay()
    suffix = h.BEFORE_SUFFIX if tree is not None else ""
    workers: list[h.Process] = []
    count = 4 if max(targets) > 2000 else 2
    concurrency = 4
    try:
        await h.sleep(1.0)
        for i in range(count):
            argv = [sys.executable, "-m", "bench.capacity_worker", str(relay.port)]
            argv += [str(Path(relay.state_dir, "dev-cert.pem")), str(i * 1_000_000)]
            argv += [str(concurrency)]
            worker = h.Process(f"worker{i}", argv, cwd=str(h.ROOT))
            await worker.wait_for("worker ready", timeout=60)
            workers.append(worker)
        warmup = [WARMUP] + [0] * (count - 1)
        base = await _grow(relay, workers, warmup, table, f"warm-up{suffix}")
        for target in targets:
            share = [target // count + (1 if i < target % count else 0) for i in range(count)]
            try:
                await _grow(relay, workers, share, table, f"{target} sessions{suffix}", base)
            except h.Timeout as e:
                table.notes.append(f"{target} sessions{suffix}: gave up: {e}")
                break
    finally:
        for worker in workers:
            if worker.running:
                worker.write(b"quit\n")
        for worker in workers:
            await worker.stop(grace=30)
        await relay.process.stop(grace=30)


@attrs.define
class Step:
    """What one growth step measured: sessions held after it, pairings made, CPU spent."""

    held: int
    paired: int
    seconds: float
    #: CPU seconds of each watched process during the step (by pid).
    cpu: dict[int, float]
    latencies: list[float]
    last30: int
    failed: int
    failures: list[str]


async def _grow_step(
    workers: list[h.Process], share: list[int], watched: list[int], seconds_limit: float
) -> Step:
    """Grow each worker to its share, watching the CPU time of the processes C{watched}."""
    before = {pid: h.cpu_seconds(pid) for pid in watched}
    start = time.perf_counter()
    marks = []
    for worker, target in zip(workers, share, strict=True):
        if target == 0:
            continue
        marks.append(worker)
        worker.write(f"grow {target} {seconds_limit}\n".encode())
    step = Step(0, 0, 0.0, {}, [], 0, 0, [])
    for worker in marks:
        match = await worker.wait_for(r"held (\d+) (\{.*\})\n", timeout=seconds_limit + 180.0)
        report = json.loads(match.group(2))
        del worker.output[: match.end()]  # each report is read once
        step.latencies += report["latencies"]
        step.paired += report["paired"]
        step.last30 += report["last30"]
        step.failed += report["failed"]
        step.failures += report["failures"]
    step.seconds = time.perf_counter() - start
    step.cpu = {pid: h.cpu_seconds(pid) - before[pid] for pid in watched}
    # Sessions held: every worker's (not only those that grew).
    for worker in workers:
        worker.write(b"held\n")
    for worker in workers:
        match = await worker.wait_for(r"holding (\d+)\n", timeout=60)
        step.held += int(match.group(1))
        del worker.output[: match.end()]  # after reading it: the match reads the buffer
    return step


async def _grow(
    relay: h.Relay,
    workers: list[h.Process],
    share: list[int],
    table: Table,
    name: str,
    base: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Grow each worker to its share; record the row.  Returns (sessions, RSS) after."""
    pid = relay.process.pid
    step = await _grow_step(workers, share, [pid], STEP_SECONDS)
    await h.sleep(3.0)
    rss = h.memory(pid)["rss"]
    held, paired, seconds, cpu = step.held, step.paired, step.seconds, step.cpu[pid]
    idle, start = h.cpu_seconds(pid), time.perf_counter()
    await h.sleep(IDLE_SECONDS)
    idle = (h.cpu_seconds(pid) - idle) / (time.perf_counter() - start)
    if base is not None and held < sum(share):
        name = f"{held} sessions (of {sum(share)} in {STEP_SECONDS:.0f} s)"
        table.notes.append(
            f"{name}: the step stopped at its time limit; pairing slows as sessions grow "
            f"({step.last30 / 30:.0f} pairings/s in its last 30 s)"
        )
    row = table.row(name)
    row.add("rss", rss / 2**20)
    if base is not None and held > base[0]:
        row.add("per", (rss - base[1]) / (held - base[0]) / 1024)
    if paired:
        row.add("rate", paired / seconds)
        row.add("cpu", cpu / paired * 1000)
        row.add("cap", paired / cpu if cpu else float("nan"))
        row.add("p50", percentile(step.latencies, 50) * 1000)
        row.add("p99", percentile(step.latencies, 99) * 1000)
        if seconds > 60:
            row.add("end", step.last30 / 30)
    if held:
        row.add("idle", idle * 1000 / held * 1000)
    if step.failed:
        table.notes.append(f"{name}: {step.failed} pairings failed, e.g. {step.failures[:2]}")
    return held, rss
