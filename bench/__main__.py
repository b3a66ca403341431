"""
Run the benchmarks by hand:

    python -m bench keystroke|bulk|forward|capacity|startup|all [--quick] [--rounds N]
    python -m bench capacity --relays 2 --store redis
    python -m bench keystroke|bulk --systems coder1-node,coder1-cross

Each prints a Markdown table: per system the median over the rounds with the minimum
and maximum, and the ratio to the baseline measured in the same invocation.
docs/performance.md says what each one measures and records the latest results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from bench import harness as h
from bench.stats import emit

BENCHMARKS = ["keystroke", "bulk", "forward", "capacity", "startup"]
#: Rounds per benchmark unless --rounds says otherwise.
DEFAULT_ROUNDS = {"capacity": 1}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    p.add_argument("--quick", action="store_true", help="small sizes, for a first look")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds per system (default 5; capacity 1, its steps take minutes)",
    )
    p.add_argument(
        "--systems",
        type=lambda s: s.split(","),
        help="keystroke, bulk: comma-separated subset of "
        "coder1,coder1-command,naive,naive-pty,termpair,terminado, and on two relay "
        "processes and a Redis: coder1-cross (tab and bridge on different nodes), "
        "coder1-node (on the same node)",
    )
    p.add_argument("--count", type=int, help="keystroke: keystrokes per round")
    p.add_argument(
        "--stages",
        action="store_true",
        help="keystroke: also a pass that times each stage of a coder1 keystroke",
    )
    p.add_argument("--size", help="bulk: bytes of zeros before base64 (e.g. 200M)")
    p.add_argument(
        "--output",
        choices=["zeros", "listing", "random"],
        help="bulk: what the terminal prints: base64 of zeros (default), a file listing "
        "(compresses as real output does), base64 of random bytes",
    )
    p.add_argument("--messages", type=int, help="forward: messages per round and size")
    p.add_argument(
        "--sessions",
        type=lambda s: [int(n) for n in s.split(",")],
        help="capacity: session counts to measure at (default 1000,10000)",
    )
    p.add_argument(
        "--relays",
        type=int,
        help="capacity: relay processes, compared with one in the same run (needs --store redis)",
    )
    p.add_argument(
        "--store",
        choices=["memory", "redis"],
        default="memory",
        help="capacity: the relays' store: in memory (default) or a Redis the run starts",
    )
    p.add_argument(
        "--before",
        metavar="DIR",
        help="keystroke, bulk, forward, capacity: also run the relay and bridge of the source "
        "tree DIR (e.g. git archive of the commit before a change, unpacked), as rows "
        "suffixed '(before)' in the same tables",
    )
    p.add_argument("--json", help="also append each table as one JSON line to this file")
    p.add_argument("--profile", help="write a cProfile of the relay (forward) to this file")
    return p


def rounds(benchmark: str, given: int | None) -> int:
    """The rounds C{benchmark} runs: C{--rounds} if given, else its default."""
    return given if given is not None else DEFAULT_ROUNDS.get(benchmark, 5)


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    from bench import bulk, capacity, forward, keystroke, startup

    modules = {
        "keystroke": keystroke,
        "bulk": bulk,
        "forward": forward,
        "capacity": capacity,
        "startup": startup,
    }
    chosen = BENCHMARKS if options.benchmark == "all" else [options.benchmark]
    json_out = open(options.json, "a") if options.json else None  # noqa: SIM115
    try:
        sys.stdout.write("## Machine\n\n")
        for key, value in h.machine().items():
            sys.stdout.write(f"- {key}: {value}\n")
        sys.stdout.write("\n")
        if json_out is not None:
            json_out.write(json.dumps({"machine": h.machine()}) + "\n")
        given = options.rounds
        for name in chosen:
            options.rounds = rounds(name, given)
            result = await modules[name].run(options)
            for table in result if isinstance(result, list) else [result]:
                emit(table, sys.stdout, json_out)
            if name == "keystroke" and options.stages:
                emit(await keystroke.stages(options), sys.stdout, json_out)
    finally:
        await h.stop_all()
        if json_out is not None:
            json_out.close()


def main(argv: list[str] | None = None) -> None:
    options = parser().parse_args(argv)
    if options.before:
        before = Path(options.before).resolve()
        if not (before / "coder1_relay").is_dir():
            raise SystemExit(f"--before {options.before}: not a coder1-bridge source tree")
        h.BEFORE = before
    try:
        react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))
    finally:
        h.kill_all_now()


if __name__ == "__main__":
    main()
