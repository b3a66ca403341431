"""
Benchmark harness only: where an idle paired session's memory goes in the relay.

Runs the relay (the real L{RelayService}, TLS and all) in this process under
tracemalloc, pairs sessions with the capacity benchmark's client processes
(L{bench.capacity_worker}), and compares two snapshots: after C{--warm} sessions and
after C{--warm} + C{--sessions}.  Prints RSS per session, the Python allocations per
session (what tracemalloc sees) and the lines that allocated most of them.  With
C{--profile FILE} it profiles the relay (cProfile, no tracemalloc) while it pairs the
sessions instead, and prints its CPU per pairing; with C{--idle-profile FILE}, while
it holds C{--warm} sessions and nothing happens but their heartbeats.

    python -m bench.memprofile [--sessions 500] [--warm 20] [--top 25] [--profile FILE]
        [--idle-profile FILE [--idle 30]]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.filepath import FilePath

from bench import harness as h

WORKERS = 2


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    from coder1_relay.context import Limits
    from coder1_relay.service import RelayService, RelaySettings

    # As the capacity benchmark does: two sockets a session, as many as this user may open.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the workers inherit it
    if not options.profile:
        tracemalloc.start(options.depth)
    state = FilePath(tempfile.mkdtemp(prefix="coder1-memprofile-"))
    unlimited = Limits(
        messages_per_second=1e6,
        message_burst=1_000_000,
        bridge_messages_per_second=1e6,
        bridge_message_burst=1_000_000,
    )
    relay = RelayService(
        reactor,
        RelaySettings(listen="tcp:0:interface=127.0.0.1", state_dir=state, limits=unlimited),
    )
    relay.startService()
    address: Any = (await relay.listening).getHost()
    port = address.port
    workers = []
    try:
        for i in range(WORKERS):
            argv = [sys.executable, "-m", "bench.capacity_worker", str(port)]
            argv += [str(Path(state.path, "dev-cert.pem")), str(i * 1_000_000), "4"]
            worker = h.Process(f"worker{i}", argv, cwd=str(h.ROOT))
            await worker.wait_for("worker ready", timeout=60)
            workers.append(worker)

        async def grow(total: int) -> None:
            for i, worker in enumerate(workers):
                share = total // WORKERS + (1 if i < total % WORKERS else 0)
                worker.write(f"grow {share} 600\n".encode())
            failures = []
            for worker in workers:
                match = await worker.wait_for(r"held (\d+) (\{.*\})\n", timeout=900)
                failures += json.loads(match.group(2))["failures"]
                del worker.output[: match.end()]
            held = len(relay.context.hub.endpoints()) // 2
            if held < total:  # numbers of a relay that refused pairings would mean nothing
                raise SystemExit(f"the relay holds {held} sessions, not {total}: {failures[:3]}")
            await h.sleep(2.0)
            gc.collect()

        await grow(options.warm)
        if options.profile:
            await _profile(grow, options)
            return
        if options.idle_profile:
            await _idle_profile(options, len(relay.context.hub.endpoints()) // 2)
            return
        rss0 = h.memory(h.os.getpid())["rss"]
        before = tracemalloc.take_snapshot()
        await grow(options.warm + options.sessions)
        rss1 = h.memory(h.os.getpid())["rss"]
        after = tracemalloc.take_snapshot()
        held = len(relay.context.hub.endpoints()) // 2
        n = options.sessions
        stats = after.compare_to(before, "traceback" if options.traceback else "lineno")
        python = sum(s.size_diff for s in stats)
        out = sys.stdout
        out.write(f"sessions held: {held} (grew by {n})\n")
        out.write(f"RSS per session: {(rss1 - rss0) / n / 1024:.1f} KiB (with tracemalloc)\n")
        out.write(f"Python allocations per session: {python / n / 1024:.1f} KiB\n\n")
        for stat in stats[: options.top]:
            out.write(f"{stat.size_diff / n:8.0f} B/session {stat.count_diff / n:6.1f} blocks\n")
            for line in stat.traceback.format()[-2 * options.depth :]:
                out.write(f"    {line}\n")
    finally:
        for worker in workers:  # each closes its sessions on "quit", one after the other
            if worker.running:
                worker.write(b"quit\n")
            await worker.stop(grace=30)
        await relay.stopService()


async def _profile(grow: Any, options: argparse.Namespace) -> None:
    # As under twistd: the log (the access log's lines, too) goes to a file.
    log = open(options.profile + ".log", "a")  # noqa: SIM115  (open until the process ends)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
    # CPU time, not wall-clock time: the machine is shared, and waits are not costs.
    profile = cProfile.Profile(time.process_time)
    cpu = time.process_time()
    profile.enable()
    await grow(options.warm + options.sessions)
    profile.disable()
    cpu = time.process_time() - cpu
    profile.dump_stats(options.profile)
    sys.stdout.write(f"relay CPU per pairing (profiled): {cpu / options.sessions * 1000:.1f} ms\n")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(options.top)


async def _idle_profile(options: argparse.Namespace, held: int) -> None:
    """The relay's CPU while it holds C{held} sessions and nothing happens but heartbeats."""
    profile = cProfile.Profile(time.process_time)
    cpu, start = time.process_time(), time.perf_counter()
    profile.enable()
    await h.sleep(options.idle)
    profile.disable()
    cpu, seconds = time.process_time() - cpu, time.perf_counter() - start
    profile.dump_stats(options.idle_profile)
    per = cpu / seconds / held * 1000 * 1000
    sys.stdout.write(f"relay CPU idle (profiled): {per:.1f} ms/s per 1,000 of {held} sessions\n")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(options.top)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memprofile", description=__doc__)
    p.add_argument("--sessions", type=int, default=500)
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--depth", type=int, default=1, help="frames kept per allocation")
    p.add_argument("--traceback", action="store_true", help="group by whole traceback")
    p.add_argument("--profile", help="cProfile the relay while it pairs, to this file")
    p.add_argument(
        "--idle-profile", help="cProfile the relay holding --warm sessions idle, to this file"
    )
    p.add_argument("--idle", type=float, default=30.0, help="seconds of --idle-profile")
    options = p.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()
