"""
4b. Capacity of several relay processes on one Redis (docs/scaling.md), against one.

    python -m bench capacity --relays 2 --store redis [--sessions 1000,10000] [--rounds N]

Each round runs the same client processes (L{bench.capacity_worker}) against a
deployment of one relay process and then of C{--relays} (twice, see below), each on a
Redis of the run's own (L{bench.mesh}), and pairs the first C{--sessions} count on each: pairings a
second observed, the relays' CPU per pairing (all nodes), Redis's CPU and commands per
pairing, and the rate the deployment could sustain with a core per relay process (the
pairings over the CPU time of its busiest process).  There is no balancer process:
each client connection goes to a node picked at random (L{bench.mesh.Nodes}), as a
round-robin TCP balancer shared by many users spreads them; so about half the sessions
of two nodes have their tab and bridge on different nodes, joined by a node link.  A
third deployment per round picks the node by the client's source address instead
(HAProxy's C{balance source}; here every connection of a session comes from one
address), so no session crosses nodes: what the node links cost is the difference.

After the last round, the C{--relays} deployment goes on to hold the other counts:
RSS of each relay process, per session it carries (its growth over the sessions held,
divided by the number of nodes), open files of the busiest process, and Redis's
memory per session (C{INFO memory} C{used_memory} growth over the sessions held);
then once more 65 s later, when the pairings' rate windows have expired (an idle
session), with the Redis commands a second the idle deployment sends and the relays'
CPU meanwhile (heartbeats: every connection is pinged every 15 s).  Last, 2,000 of the
sessions close both connections and open them again (as after a laptop sleeps): relay
CPU, Redis CPU and Redis commands per reconnection.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

from bench import harness as h
from bench.capacity import SPARE_FDS, STEP_SECONDS, WARMUP, Step, _grow_step
from bench.mesh import Mesh, redis_missing, start_mesh
from bench.stats import Metric, Table, percentile

#: Seconds after the last step before the idle figures: the pairings' rate windows
#: (60 s) have expired by then.
IDLE_WAIT = 65.0
#: Sessions closed and opened again at the end (all of them at tiny sizes).
RECONNECT = 2000


def per_node_capacity(nodes: int) -> int:
    """
    Sessions the deployment can hold with each process under the open-file limit: a
    session on one node takes two sockets there; one across two nodes (a share of
    1 - 1/nodes of them, when connections are spread at random) takes four, two on each.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 10**9
    sockets_per_session = (2 + 2 * (1 - 1 / nodes)) / nodes
    return int((hard - SPARE_FDS) / sockets_per_session / 1.05)


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def run(options: Any) -> list[Table]:
    relays = options.relays or 2
    if relays < 2:
        raise SystemExit(
            "capacity --store redis compares several relay processes with one: --relays 2"
        )
    missing = redis_missing()
    if missing:
        raise SystemExit(f"capacity --store redis needs Redis: {missing}")
    targets = options.sessions or ([200, 1000] if options.quick else [1000, 10000])
    limit = per_node_capacity(relays)
    notes = [
        "each client connection goes to a node picked at random (a round-robin TCP "
        "balancer as one user sees it); the clients run on the same cores as the relays",
        f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"({os.cpu_count()} cores, shared with other work)",
    ]
    if max(targets) > limit:
        notes.append(
            f"targets capped at {limit} sessions: the hard RLIMIT_NOFILE is "
            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]} per process"
        )
        targets = [min(t, limit) for t in targets]
    one, many = "1 relay process", f"{relays} relay processes"
    sticky = f"{relays} relay processes, balanced by source address"
    pairing = Table(
        f"Pairings: {relays} relay processes against 1, on one Redis (same run, "
        f"{targets[0]} sessions paired each)",
        [
            Metric("rate", "pairings/s observed", "", False, digits=0),
            Metric("cpu", "relay CPU per pairing, all nodes", "ms", digits=2),
            Metric("cap", "pairings/s, a core per relay process", "", False, digits=0),
            Metric("redis", "Redis CPU per pairing", "ms", digits=2),
            Metric("ops", "Redis commands per pairing", "", digits=1),
            Metric("client", "client CPU per pairing", "ms", digits=2),
            Metric("per", "relay RSS per session, all nodes", "KiB", digits=1),
            Metric("p50", "pairing p50", "ms", digits=0),
            Metric("p99", "pairing p99", "ms", digits=0),
        ],
        one,
        notes=notes,
    )
    pairing.row(one)
    pairing.row(many)
    pairing.row(sticky)
    held = Table(
        f"Idle paired sessions held by {relays} relay processes on one Redis",
        [
            Metric("rss", "relay RSS, all nodes", "MiB", digits=0),
            Metric("per", "relay RSS per session, all nodes", "KiB", digits=1),
            *[
                Metric(f"per {n}", f"RSS per session, node {n}", "KiB", digits=1)
                for n in _names(relays)
            ],
            Metric("files", "open files, busiest node", "", digits=0),
            Metric("redis", "Redis used_memory per session", "KiB", digits=2),
            Metric("keys", "Redis keys per session", "", digits=1),
            Metric("idle ops", "Redis commands/s, idle", "", digits=1),
            Metric("idle cpu", "relay CPU idle, all nodes", "% of a core", digits=1),
            Metric("rate", "pairings/s observed", "", False, digits=0),
        ],
        "",
        notes=[
            "RSS per session, node X: node X's RSS growth over the sessions paired, "
            f"times {relays} (per session of its share)"
        ],
    )
    reconnect = Table(
        f"Reconnections: idle sessions' two connections closed and opened again, "
        f"{relays} relay processes",
        [
            Metric("rate", "reconnections/s observed", "", False, digits=0),
            Metric("cpu", "relay CPU per reconnection, all nodes", "ms", digits=2),
            Metric("redis", "Redis CPU per reconnection", "ms", digits=3),
            Metric("ops", "Redis commands per reconnection", "", digits=1),
            Metric("p50", "reconnection p50", "ms", digits=0),
            Metric("p99", "reconnection p99", "ms", digits=0),
        ],
        "",
        notes=["the sessions closed and opened again after the idle row, a few at a time"],
    )
    rounds = max(1, options.rounds)
    for index in range(rounds):
        await _deployment(one, 1, targets[:1], pairing, held, options)
        await _deployment(sticky, relays, targets[:1], pairing, held, options, by_source=True)
        last = index == rounds - 1
        await _deployment(
            many, relays, targets if last else targets[:1], pairing, held, options, reconnect
        )
    pairing.notes.append(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return [pairing, held, reconnect]


def _names(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


async def _deployment(
    name: str,
    count: int,
    targets: list[int],
    pairing: Table,
    held: Table,
    options: Any,
    reconnect: Table | None = None,
    *,
    by_source: bool = False,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    mesh = await start_mesh(count)
    workers: list[h.Process] = []
    clients = 4 if max(targets) > 2000 or not options.quick else 2
    try:
        await h.sleep(1.0)
        cert = os.path.join(mesh.state_dirs[0], "dev-cert.pem")
        ports = ("source:" if by_source else "") + ",".join(map(str, mesh.ports))
        for i in range(clients):
            argv = [sys.executable, "-m", "bench.capacity_worker", str(mesh.public_port), cert]
            argv += [str(i * 1_000_000), "4", ports]
            worker = h.Process(f"worker{i}", argv, cwd=str(h.ROOT))
            await worker.wait_for("worker ready", timeout=60)
            workers.append(worker)
        relay_pids = [p.pid for p in mesh.nodes]
        redis_pid = mesh.redis.process.pid
        watched = [*relay_pids, redis_pid, *(w.pid for w in workers)]
        await _grow_step(workers, [WARMUP] + [0] * (clients - 1), watched, STEP_SECONDS)
        base_rss = {pid: h.memory(pid)["rss"] for pid in relay_pids}
        base_redis, base_keys = await mesh.redis.used_memory(), await mesh.redis.keys()
        base_held = WARMUP
        for number, target in enumerate(targets):
            share = [target // clients + (1 if i < target % clients else 0) for i in range(clients)]
            calls = sum((await mesh.redis.command_stats()).values())
            limit = STEP_SECONDS if count == 1 else 2 * STEP_SECONDS
            step = await _grow_step(workers, share, watched, limit)
            calls = sum((await mesh.redis.command_stats()).values()) - calls
            await h.sleep(3.0)  # for RSS: what the step freed is returned
            if number == 0:
                _pairing_row(pairing.row(name), step, relay_pids, redis_pid, calls)
                growth = sum(h.memory(pid)["rss"] - base_rss[pid] for pid in relay_pids)
                if step.held > base_held:
                    pairing.row(name).add("per", growth / (step.held - base_held) / 1024)
                if step.failed:
                    pairing.notes.append(
                        f"{name}: {step.failed} pairings failed, e.g. {step.failures[:2]}"
                    )
            if count > 1 and len(targets) > 1:
                label = f"{target} sessions" if step.held >= target else f"{step.held} sessions"
                row = held.row(label)
                if step.paired:
                    row.add("rate", step.paired / step.seconds)
                await _held_row(row, mesh, step.held - base_held, base_rss, base_redis, base_keys)
                if step.held < target:
                    held.notes.append(
                        f"{step.held} sessions (of {target}): the step stopped at its time "
                        f"limit ({step.last30 / 30:.0f} pairings/s in its last 30 s)"
                    )
        if count > 1 and len(targets) > 1:
            calls = sum((await mesh.redis.command_stats()).values())
            cpu = sum(h.cpu_seconds(pid) for pid in relay_pids)
            await h.sleep(IDLE_WAIT)
            cpu = sum(h.cpu_seconds(pid) for pid in relay_pids) - cpu
            calls = sum((await mesh.redis.command_stats()).values()) - calls
            row = held.row(f"{label}, {IDLE_WAIT:.0f} s later (idle)")
            row.add("idle ops", calls / IDLE_WAIT)
            row.add("idle cpu", cpu / IDLE_WAIT * 100)
            await _held_row(row, mesh, step.held - base_held, base_rss, base_redis, base_keys)
            stats = await mesh.redis.command_stats()
            top = sorted(stats.items(), key=lambda kv: -kv[1])[:6]
            if reconnect is not None:
                count = step.held if options.quick else min(step.held, RECONNECT)
                await _reconnect(reconnect, mesh, workers, count, relay_pids)
            held.notes.append(
                "Redis commands over the whole run (INFO commandstats): "
                + ", ".join(f"{name} {calls}" for name, calls in top)
            )
    finally:
        for worker in workers:
            if worker.running:
                worker.write(b"quit\n")
        for worker in workers:
            await worker.stop(grace=30)
        await mesh.stop()


async def _reconnect(
    table: Table, mesh: Mesh, workers: list[h.Process], count: int, relays: list[int]
) -> None:
    """Close and open again the connections of C{count} sessions held; the row."""
    redis = mesh.redis.process.pid
    before = {pid: h.cpu_seconds(pid) for pid in [*relays, redis]}
    calls = sum((await mesh.redis.command_stats()).values())
    start = time.perf_counter()
    share = [
        count // len(workers) + (1 if i < count % len(workers) else 0) for i in range(len(workers))
    ]
    for worker, n in zip(workers, share, strict=True):
        worker.write(f"reconnect {n}\n".encode())
    latencies: list[float] = []
    done = failed = 0
    for worker in workers:
        match = await worker.wait_for(r"reconnected (\{.*\})\n", timeout=600)
        report = json.loads(match.group(1))
        del worker.output[: match.end()]
        latencies += report["latencies"]
        done += report["reconnected"]
        failed += report["failed"]
        if report["failures"]:
            table.notes.append(f"reconnection failures, e.g. {report['failures'][:2]}")
    seconds = time.perf_counter() - start
    calls = sum((await mesh.redis.command_stats()).values()) - calls
    cpu = {pid: h.cpu_seconds(pid) - before[pid] for pid in before}
    if not done:
        return
    row = table.row(f"{done} sessions")
    row.add("rate", done / seconds)
    row.add("cpu", sum(cpu[pid] for pid in relays) / done * 1000)
    row.add("redis", cpu[redis] / done * 1000)
    row.add("ops", calls / done)
    row.add("p50", percentile(latencies, 50) * 1000)
    row.add("p99", percentile(latencies, 99) * 1000)
    if failed:
        table.notes.append(f"{failed} reconnections failed")


def _pairing_row(row: Any, step: Step, relays: list[int], redis: int, calls: int) -> None:
    if not step.paired:
        return
    paired = step.paired
    relay_cpu = [step.cpu[pid] for pid in relays]
    client_cpu = sum(cpu for pid, cpu in step.cpu.items() if pid not in relays and pid != redis)
    row.add("rate", paired / step.seconds)
    row.add("cpu", sum(relay_cpu) / paired * 1000)
    row.add("cap", paired / max(relay_cpu) if max(relay_cpu) else float("nan"))
    row.add("redis", step.cpu[redis] / paired * 1000)
    row.add("ops", calls / paired)
    row.add("client", client_cpu / paired * 1000)
    row.add("p50", percentile(step.latencies, 50) * 1000)
    row.add("p99", percentile(step.latencies, 99) * 1000)


async def _held_row(
    row: Any, mesh: Mesh, sessions: int, base_rss: dict[int, int], base_redis: int, base_keys: int
) -> None:
    if sessions <= 0:
        return
    nodes = len(mesh.nodes)
    rss = {p.pid: h.memory(p.pid)["rss"] for p in mesh.nodes}
    row.add("rss", sum(rss.values()) / 2**20)
    row.add("per", sum(rss[pid] - base_rss[pid] for pid in rss) / sessions / 1024)
    for name, process in zip(_names(nodes), mesh.nodes, strict=True):
        growth = rss[process.pid] - base_rss[process.pid]
        row.add(f"per {name}", growth / (sessions / nodes) / 1024)
    row.add("files", max(open_files(p.pid) for p in mesh.nodes))
    row.add("redis", (await mesh.redis.used_memory() - base_redis) / sessions / 1024)
    row.add("keys", (await mesh.redis.keys() - base_keys) / sessions)
