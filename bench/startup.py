"""
5. Start-up: the relay from start to listening, the bridge from start to connected
(its own "ready" and the IDE's PRESENCE), the end-to-end channel, and a one-shot
C{echo hi} through the relay: CMD_START to its first byte and to CMD_EXIT.

Each round starts a new bridge process with the same pairing (the previous one
stopped), opens a new channel, and runs C{echo} three times (the first, then the
median of two more: a warm bridge).  Baselines in the same run: an interpreter that
does nothing (C{python -c pass}), the one every command starts through
(C{python -I -S -c pass}: the bridge's trampoline), and the bridge's imports alone.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet.defer import Deferred

from bench import harness as h
from bench.stats import Metric, Table
from coder1_wire.e2e import Identity
from coder1_wire.envelope import Envelope, Kind, control

BASELINE = "baseline: python -c pass"


async def _spawn_to_exit(argv: list[str]) -> float:
    process = h.Process(argv[1], argv, cwd=str(h.TREE))
    await h.with_timeout(process.exited, 60, " ".join(argv))
    return time.perf_counter() - process.started


async def _echo(ide: h.IDE, stream: int) -> tuple[float, float]:
    first: Deferred[float] = Deferred()
    done: Deferred[float] = Deferred()

    def frame(envelope: Envelope) -> None:
        if envelope.stream != stream:
            return
        if envelope.kind == Kind.CMD_STDOUT and not first.called:
            first.callback(time.perf_counter())
        elif envelope.kind in (Kind.CMD_EXIT, Kind.CMD_ERROR) and not done.called:
            done.callback(time.perf_counter())

    ide.on_frame = frame
    start = time.perf_counter()
    ide.send(control(Kind.CMD_START, {"argv": ["echo", "hi"]}, stream=stream, peer=1))
    byte: float = await h.with_timeout(first, 30, "echo's first byte")
    end: float = await h.with_timeout(done, 30, "echo's CMD_EXIT")
    return byte - start, end - start


async def run(options: Any) -> Table:
    table = Table(
        "Start-up and first byte (ms)",
        [Metric("ms", "time", "ms", digits=1)],
        BASELINE,
    )
    rows = [
        BASELINE,
        "baseline: python -I -S -c pass (the command trampoline)",
        "baseline: python -c 'import coder1_bridge.service'",
        "relay: start to listening",
        "bridge: start to connected (its own ready)",
        "bridge: start to PRESENCE at the IDE",
        "E2E channel: KEY_OFFER to KEY_ANSWER",
        "echo, first after start: CMD_START to first byte",
        "echo, first after start: CMD_START to CMD_EXIT",
        "echo, warm: CMD_START to first byte",
        "echo, warm: CMD_START to CMD_EXIT",
    ]
    for name in rows:
        table.row(name)
    relays: list[h.Relay] = []
    try:
        for i in range(options.rounds):
            py = sys.executable
            table.row(rows[0]).add("ms", await _spawn_to_exit([py, "-c", "pass"]) * 1000)
            table.row(rows[1]).add("ms", await _spawn_to_exit([py, "-I", "-S", "-c", "pass"]) * 1e3)
            imports = [py, "-c", "import coder1_bridge.service"]
            table.row(rows[2]).add("ms", await _spawn_to_exit(imports) * 1000)

            start = time.perf_counter()
            relay = await h.start_relay()
            relays.append(relay)
            table.row(rows[3]).add("ms", (time.perf_counter() - start) * 1000)
            browser = Identity.generate()
            pairing = await h.pair(relay, browser, Identity.generate())
            config_dir = tempfile.mkdtemp(prefix=h.TMP_PREFIX + "bridge-")
            pairing.bridge_config(relay).save(h._filepath(config_dir))
            ide = h.IDE(browser)
            await ide.connect(relay, pairing.cookie)

            bridge = h.spawn_bridge(config_dir)
            await bridge.wait_for("bench-bridge ready", timeout=60)
            ready = time.perf_counter() - bridge.started
            await ide.bridge_present()
            present = time.perf_counter() - bridge.started
            table.row(rows[4]).add("ms", ready * 1000)
            table.row(rows[5]).add("ms", present * 1000)
            start = time.perf_counter()
            await ide.handshake(pairing.peer)
            table.row(rows[6]).add("ms", (time.perf_counter() - start) * 1000)
            byte, end = await _echo(ide, 1)
            table.row(rows[7]).add("ms", byte * 1000)
            table.row(rows[8]).add("ms", end * 1000)
            warm = [await _echo(ide, 2 + j) for j in range(2)]
            table.row(rows[9]).add("ms", statistics.median(w[0] for w in warm) * 1000)
            table.row(rows[10]).add("ms", statistics.median(w[1] for w in warm) * 1000)
            await bridge.stop()
            await relay.process.stop()
            del i
    finally:
        for relay in relays:
            await relay.process.stop()
    return table
