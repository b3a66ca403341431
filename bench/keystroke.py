"""
1. Keystroke round trip: one character typed on the browser's side travels to the
terminal's program and its echo comes back.

Every system runs C{sh -c 'stty raw -echo; exec cat'} on a pseudo-terminal, so each
character goes through a real program (C{cat} writes back what it reads) and nothing
is line-buffered.  The naive echo peer has no terminal: it is the bare Autobahn
baseline.  One keystroke is in flight at a time; each round opens a fresh terminal,
types C{warmup} characters (not counted), then C{count} characters, and keeps their
p50 and p99.  Systems take turns within a round, so a slow moment of the machine
hits them alike.  Relay CPU per keystroke is that of the processes named relay (all
the relay nodes a keystroke and its echo pass through; not the bridge, not the peers'
servers), over the counted keystrokes.
"""

from __future__ import annotations

import time
from typing import Any

from bench import harness as h
from bench import terminals
from bench.stats import Metric, Table, percentile

COMMAND = "stty raw -echo; exec cat"
DEFAULT_SYSTEMS = ["naive", "coder1", "naive-pty", "termpair", "terminado"]
BASELINE = "naive autobahn relay + echo peer"


async def keystrokes(system: terminals.System, count: int) -> list[float]:
    """Round trips, in seconds, of C{count} characters typed one at a time."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    samples = []
    for i in range(count):
        char = letters[i % len(letters) : i % len(letters) + 1]
        arrived = system.output.expect(char)
        start = time.perf_counter()
        system.send(char)
        end: float = await h.with_timeout(arrived, 10, f"{system.name}: echo of a keystroke")
        samples.append(end - start)
    return samples


async def run(options: Any) -> Table:
    count = 200 if options.quick else 2000
    count = options.count or count
    warmup = max(10, count // 20)
    systems, skipped = terminals.available(options.systems or DEFAULT_SYSTEMS)
    table = Table(
        "Keystroke round trip (loopback, one character at a time)",
        [
            Metric("p50", "p50", "us", digits=0),
            Metric("p99", "p99", "us", digits=0),
            Metric("mean", "mean", "us", digits=0),
            Metric("cpu", "relay CPU per keystroke", "us", digits=0),
        ],
        terminals.baseline(systems, BASELINE),
        notes=[
            f"{count} keystrokes per round after {warmup} not counted; "
            "TLS 1.3 on every WebSocket; coder1 and termpair also encrypt end to end",
            *skipped,
        ],
    )
    for system in systems:
        table.row(system.name)
    try:
        for system in systems:
            await system.setup(COMMAND)
        for _ in range(options.rounds):
            for system in systems:
                await system.open()
                await h.sleep(0.2)
                await keystrokes(system, warmup)
                relays = [p for n, p in system.pids().items() if n.startswith("relay")]
                cpu = sum(h.cpu_seconds(p) for p in relays)
                samples = await keystrokes(system, count)
                cpu = sum(h.cpu_seconds(p) for p in relays) - cpu
                await system.close()
                row = table.row(system.name)
                row.add("p50", percentile(samples, 50) * 1e6)
                row.add("p99", percentile(samples, 99) * 1e6)
                row.add("mean", sum(samples) / len(samples) * 1e6)
                if relays:
                    row.add("cpu", cpu / count * 1e6)
    finally:
        for system in systems:
            try:
                await system.teardown()
            except Exception as e:  # keep stopping the others
                table.notes.append(f"{system.name}: teardown failed: {e!r}")
    return table
