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
servers), over the counted keystrokes; the bridge's (or the naive peer's, its
counterpart) likewise.

With C{--stages}, a separate pass after the timed rounds (on a relay and bridge of its
own, so the stamps cost the timed rounds nothing) says where a coder1 keystroke's time
goes: L{bench.bridge_main} stamps the bridge's steps (C{CODER1_BENCH_STAGES}), this
process stamps the browser's side, and C{time.perf_counter()} is the same clock in
every process (CLOCK_MONOTONIC), so the hops through the relay are the time between
a socket write on one side and the socket read on the other.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.python.filepath import FilePath

from bench import harness as h
from bench import terminals
from bench.stats import Metric, Row, Table, percentile
from coder1_wire.e2e import Identity

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
            Metric("pooled", "p99 of every round's keystrokes pooled", "us", digits=0),
            Metric("slow", "keystrokes over 1 ms, pooled", "%", digits=2),
            Metric("cpu", "relay CPU per keystroke", "us", digits=0),
            Metric("far", "bridge (or peer) CPU per keystroke", "us", digits=0),
        ],
        terminals.baseline(systems, BASELINE),
        notes=[
            f"{count} keystrokes per round after {warmup} not counted; "
            "TLS 1.3 on every WebSocket; coder1 and termpair also encrypt end to end",
            "the pooled columns are one value each, over every round's keystrokes together: "
            "a round's p99 is its 1 % slowest, so it moves with the machine's rare stalls",
            *skipped,
        ],
    )
    pooled: dict[str, list[float]] = {}
    for system in systems:
        table.row(system.name)
        pooled[system.name] = []
    try:
        for system in systems:
            await system.setup(COMMAND)
        for _ in range(options.rounds):
            for system in systems:
                await system.open()
                await h.sleep(0.2)
                await keystrokes(system, warmup)
                relays = [p for n, p in system.pids().items() if n.startswith("relay")]
                far = [p for n, p in system.pids().items() if n in ("bridge", "peer")]
                cpu = sum(h.cpu_seconds(p) for p in relays)
                far_cpu = sum(h.cpu_seconds(p) for p in far)
                samples = await keystrokes(system, count)
                cpu = sum(h.cpu_seconds(p) for p in relays) - cpu
                far_cpu = sum(h.cpu_seconds(p) for p in far) - far_cpu
                await system.close()
                row = table.row(system.name)
                row.add("p50", percentile(samples, 50) * 1e6)
                row.add("p99", percentile(samples, 99) * 1e6)
                row.add("mean", sum(samples) / len(samples) * 1e6)
                pooled[system.name] += samples
                if relays:
                    row.add("cpu", cpu / count * 1e6)
                if far:
                    row.add("far", far_cpu / count * 1e6)
        for name, every in pooled.items():
            add_pooled(table.row(name), every)
    finally:
        for system in systems:
            try:
                await system.teardown()
            except Exception as e:  # keep stopping the others
                table.notes.append(f"{system.name}: teardown failed: {e!r}")
    return table


def add_pooled(row: Row, samples: list[float]) -> None:
    """
    The pooled columns of C{row}: the p99 of C{samples} (every round's keystrokes
    together) and the share of them over 1 ms, one value each.
    """
    if samples:
        row.add("pooled", percentile(samples, 99) * 1e6)
        row.add("slow", sum(1 for s in samples if s > 0.001) / len(samples) * 100)


# --------------------------------------------------------------------------- --stages

#: The stages of a keystroke: (row, from stamp, to stamp).  Stamps starting with
#: C{c_} are this process's (the browser's side), the others the bridge's
#: (L{bench.bridge_main.STAMPS}).
STAGES: list[tuple[str, str | None, str | None]] = [
    ("browser: seal, frame, to the socket", "typed", "c_sock_out"),
    ("hop in: kernel, relay, kernel", "c_sock_out", "sock_in"),
    ("bridge: TLS and WebSocket parse", "sock_in", "message"),
    ("bridge: decode", "message", "decoded"),
    ("bridge: open", "decoded", "opened"),
    ("bridge: to the terminal's transport", "opened", "pty_write"),
    ("bridge: until written to the terminal", "pty_write", "pty_written"),
    ("terminal: cat's echo (write to read)", "pty_written", "pty_read"),
    ("bridge: seal (from the read)", "pty_read", "sealed"),
    ("bridge: to sendMessage", "sealed", "send"),
    ("bridge: sendMessage (frame, TLS) to the socket write", "send", "sock_out"),
    ("hop out: kernel, relay, kernel", "sock_out", "c_sock_in"),
    ("browser: TLS and WebSocket parse", "c_sock_in", "c_message"),
    ("browser: open, to the echo", "c_message", "end"),
    ("bridge, in all (socket to socket)", "sock_in", "sock_out"),
    ("relay, both hops", None, None),
    ("round trip", "typed", "end"),
]


class _ClientStamps:
    """This process's stamps on a keystroke's way: wrappers put on and taken off again."""

    def __init__(self) -> None:
        self.sock_out = 0.0
        self.sock_in = 0.0
        self.message = 0.0
        self.message_sock_in = 0.0
        self.sending = False
        self._undo: list[Callable[[], None]] = []

    def _wrap(
        self,
        owner: Any,
        name: str,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            result = original(*args, **kwargs)
            if after is not None:
                after()
            return result

        had = name in owner.__dict__
        setattr(owner, name, wrapper)
        self._undo.append(
            (lambda: setattr(owner, name, original)) if had else (lambda: delattr(owner, name))
        )

    def install(self) -> None:
        from twisted.internet import tcp
        from twisted.protocols import tls

        def sock_out() -> None:
            if self.sending:
                self.sending = False
                self.sock_out = time.perf_counter()

        def sock_in() -> None:
            self.sock_in = time.perf_counter()

        def message() -> None:
            self.message = time.perf_counter()
            self.message_sock_in = self.sock_in

        # Before the send: a send that wakes the relay often lets it run in our place.
        self._wrap(tcp.Connection, "writeSomeData", before=sock_out)
        self._wrap(tls.TLSMemoryBIOProtocol, "dataReceived", before=sock_in)
        self._wrap(h.WSProtocol, "onMessage", before=message)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


class _StagedCoder1(terminals.Coder1):
    """The product, its bridge stamping its steps (L{bench.bridge_main})."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    async def start(self) -> h.FullSystem:
        relay = await h.start_relay()
        browser = Identity.generate()
        pairing = await h.pair(relay, browser, Identity.generate())
        config_dir = tempfile.mkdtemp(prefix=h.TMP_PREFIX + "bridge-")
        pairing.bridge_config(relay).save(FilePath(config_dir))
        # This tree's bridge_main, whichever tree (CODER1_BENCH_TREE) the bridge is from.
        script = str(h.ROOT / "bench" / "bridge_main.py")
        run = f"import runpy; runpy.run_path({script!r}, run_name='__main__')"
        bridge = h.Process(
            "bridge",
            [sys.executable, "-c", run, config_dir],
            env=h.child_env(CODER1_BENCH_STAGES=self.path),
            cwd=str(h.TREE),
        )
        await bridge.wait_for(r"bench-bridge ready", timeout=60)
        ide = h.IDE(browser)
        await ide.connect(relay, pairing.cookie)
        await ide.bridge_present()
        await ide.handshake(pairing.peer)
        return h.FullSystem(relay, bridge, ide)


async def stages(options: Any) -> Table:
    """Where a coder1 keystroke's time goes: one pass of C{--count} keystrokes, stamped."""
    count = options.count or (200 if options.quick else 2000)
    warmup = max(10, count // 20)
    path = os.path.join(tempfile.mkdtemp(prefix=h.TMP_PREFIX + "stages-"), "bridge.json")
    system = _StagedCoder1(path)
    client = _ClientStamps()
    records: list[dict[str, float]] = []
    await system.setup(COMMAND)
    try:
        await system.open()
        await h.sleep(0.2)
        await keystrokes(system, warmup)
        client.install()
        letters = b"abcdefghijklmnopqrstuvwxyz"
        for i in range(count):
            char = letters[i % 26 : i % 26 + 1]
            arrived = system.output.expect(char)
            client.sending = True
            typed = time.perf_counter()
            system.send(char)
            end = await h.with_timeout(arrived, 10, "coder1: echo of a keystroke")
            records.append(
                {
                    "typed": typed,
                    "c_sock_out": client.sock_out,
                    "c_sock_in": client.message_sock_in,
                    "c_message": client.message,
                    "end": end,
                }
            )
        client.uninstall()
        await system.close()
        with open(path) as f:
            bridge = json.load(f)
    finally:
        client.uninstall()
        await system.teardown()
    return stage_table(records, bridge, count)


def _stage(matched: list[dict[str, float]], start: str | None, stop: str | None) -> list[float]:
    """One stage's time in each keystroke that has both its stamps (both relay hops if None)."""
    if start is None or stop is None:
        return [
            (m["sock_in"] - m["c_sock_out"]) + (m["c_sock_in"] - m["sock_out"]) for m in matched
        ]
    return [m[stop] - m[start] for m in matched if m.get(start) and m.get(stop)]


def stage_table(
    records: list[dict[str, float]], bridge: list[dict[str, float]], count: int
) -> Table:
    """The stages of each keystroke whose bridge record was found: p50, p99, mean."""
    table = Table(
        "Where a coder1 keystroke's time goes (--stages)",
        [
            Metric("p50", "p50", "us", digits=0),
            Metric("p99", "p99", "us", digits=0),
            Metric("mean", "mean", "us", digits=0),
            Metric("slow", "mean of the slowest 2 %", "us", digits=0),
        ],
        "",
        notes=[
            f"one pass of {count} keystrokes; each stage's percentiles are its own (they do "
            "not add up); time.perf_counter() stamps, one clock for every process",
            "the last column is each stage's mean over the same keystrokes, the 2 % whose "
            "round trip was slowest (it adds up): where the slow ones lose their time",
            f"bridge from {h.TREE}, stamped by this tree's bench/bridge_main.py",
        ],
    )
    matched = []
    for record in records:
        found = next(
            (b for b in bridge if record["typed"] < b.get("sock_in", 0) < record["end"]), None
        )
        if found is not None and found.get("sock_out"):
            matched.append({**record, **found})
    table.notes.append(f"{len(matched)} of {len(records)} keystrokes matched to the bridge's")
    by_round_trip = sorted(matched, key=lambda m: m["end"] - m["typed"])
    slowest = by_round_trip[len(by_round_trip) * 98 // 100 :]
    for name, start, stop in STAGES:
        values = _stage(matched, start, stop)
        row = table.row(name)
        if values:
            row.add("p50", percentile(values, 50) * 1e6)
            row.add("p99", percentile(values, 99) * 1e6)
            row.add("mean", sum(values) / len(values) * 1e6)
        slow = _stage(slowest, start, stop)
        if slow:
            row.add("slow", sum(slow) / len(slow) * 1e6)
    turns = [m["turns"] for m in matched if "turns" in m]
    row = table.row("bridge: reactor turns, read to socket write (a count)")
    if turns:
        row.add("p50", percentile(turns, 50))
        row.add("p99", percentile(turns, 99))
        row.add("mean", sum(turns) / len(turns))
    return table
