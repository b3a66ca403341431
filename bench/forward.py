"""
3. Relay forwarding cost: opaque frames through the relay, against the naive Autobahn
relay, with 100-byte and 64 KiB messages, over plain WebSockets and over TLS.

A sender (the browser's side) sends frames to a receiver (the bridge's side) through
the relay; the receiver acknowledges every C{ACK_EVERY}-th frame, and the sender keeps
at most C{WINDOW} frames unacknowledged, so nothing piles up in buffers and the relay
is kept busy.  Both ends are connections of this process; the relay runs alone in its
process, and its CPU time (every thread, from /proc schedstat) over a round, divided by
the frames forwarded, is the CPU per message.  The frames are envelopes (PTY_INPUT to
bridge 1) with random payloads, the same bytes for both relays.

Our relay over plain WebSockets is L{bench.relay_main}: the same service without its
TLS layer, which C{twistd coder1-relay} always adds (the wss rows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from bench import harness as h
from bench.stats import Metric, Table
from coder1_wire.e2e import Identity
from coder1_wire.envelope import HEADER, WIRE_VERSION, Kind

SIZES = (100, 64 * 1024)
#: (window, ack every) per message size: about 50 KiB or 2 MiB in flight.
FLOW = {100: (512, 64), 64 * 1024: (32, 8)}
ACK = HEADER.pack(WIRE_VERSION, Kind.PTY_OUTPUT, 0, 1, 1, 0)


def frame(size: int) -> bytes:
    """A PTY_INPUT envelope to bridge 1, C{size} bytes in all."""
    return HEADER.pack(WIRE_VERSION, Kind.PTY_INPUT, 0, 1, 1, 0) + os.urandom(size - HEADER.size)


@attrs.define(eq=False)
class Pipe:
    """A sender and a receiver connected through one relay."""

    name: str
    pid: int
    send: Callable[[bytes], None] = attrs.field(default=lambda b: None)
    ack: Callable[[bytes], None] = attrs.field(default=lambda b: None)
    on_data: Callable[[], None] = attrs.field(default=lambda: None)
    on_ack: Callable[[], None] = attrs.field(default=lambda: None)
    stop: Callable[[], Any] = attrs.field(default=lambda: None)


async def coder1_pipe(tls: bool, tree: Path | None = None) -> Pipe:
    """Our relay (from C{tree}, else L{h.TREE}) with a paired sender and receiver."""
    with h.running_from(tree):
        relay = await h.start_relay(tls=tls)
        pairing = await h.pair(relay, Identity.generate(), Identity.generate())
    suffix = h.BEFORE_SUFFIX if tree is not None else ""
    pipe = Pipe(f"coder1 relay{suffix} ({'wss' if tls else 'ws'})", relay.process.pid)
    bridge = await h.open_bridge_link(relay, pairing.token, on_frame=lambda f: pipe.on_data())
    ide = await h.open_ide_link(relay, pairing.cookie)
    ide.on_frame = lambda f: pipe.on_ack() if f[1] == Kind.PTY_OUTPUT else None
    pipe.send, pipe.ack = ide.send, bridge.send

    async def stop() -> None:
        await relay.process.stop()

    pipe.stop = stop
    return pipe


async def naive_pipe(tls: bool, cert: h.CertFiles) -> Pipe:
    relay = await h.start_naive_relay(tls=tls, cert=cert)
    pipe = Pipe(f"naive relay ({'wss' if tls else 'ws'})", relay.process.pid)
    b = await h.connect_ws(
        relay.endpoint(), relay.ws_url("/f/b"), on_message=lambda p, binary: pipe.on_data()
    )
    a = await h.connect_ws(
        relay.endpoint(), relay.ws_url("/f/a"), on_message=lambda p, binary: pipe.on_ack()
    )
    pipe.send = lambda data: a.sendMessage(data, isBinary=True)
    pipe.ack = lambda data: b.sendMessage(data, isBinary=True)

    async def stop() -> None:
        await relay.process.stop()

    pipe.stop = stop
    return pipe


async def transfer(pipe: Pipe, size: int, count: int) -> tuple[float, float]:
    """Send C{count} frames of C{size} bytes; (seconds, relay CPU seconds)."""
    data = frame(size)
    window, every = FLOW[size]
    state = {"sent": 0, "received": 0, "acked": 0}
    done: Deferred[float] = Deferred()

    def pump() -> None:
        while state["sent"] < count and state["sent"] - state["acked"] < window:
            pipe.send(data)
            state["sent"] += 1

    def on_data() -> None:
        state["received"] += 1
        if state["received"] % every == 0 or state["received"] == count:
            pipe.ack(ACK)
        if state["received"] == count and not done.called:
            done.callback(time.perf_counter())

    def on_ack() -> None:
        state["acked"] = min(state["acked"] + every, count)
        pump()

    pipe.on_data, pipe.on_ack = on_data, on_ack
    cpu = h.cpu_seconds(pipe.pid)
    start = time.perf_counter()
    pump()
    end: float = await h.with_timeout(done, 300, f"{pipe.name}: {count} frames")
    return end - start, h.cpu_seconds(pipe.pid) - cpu


async def run(options: Any) -> Table:
    counts = {100: 5000, 64 * 1024: 300} if options.quick else {100: 50000, 64 * 1024: 3000}
    if options.messages:
        counts = {100: options.messages, 64 * 1024: max(1, options.messages // 16)}
    metrics = []
    for size in SIZES:
        label = "100 B" if size == 100 else "64 KiB"
        metrics += [
            Metric(f"cpu {size}", f"CPU per message, {label}", "us", digits=1),
            Metric(f"rate {size}", f"throughput, {label}", "msg/s", False, digits=0),
        ]
    tables = {}
    cert = h.make_cert()
    pipes: list[Pipe] = []
    try:
        for tls in (False, True):
            scheme = "wss" if tls else "ws"
            table = Table(
                f"Relay forwarding cost over {scheme}: CPU of the relay process per forwarded "
                "message, and messages per second",
                metrics,
                f"naive relay ({scheme})",
                notes=[
                    f"{counts[100]} messages of 100 B and {counts[64 * 1024]} of 64 KiB per "
                    "round; relay CPU from /proc/PID/task/*/schedstat",
                ],
            )
            tables[tls] = table
            pair = [await naive_pipe(tls, cert), await coder1_pipe(tls)]
            if h.BEFORE is not None:
                pair.append(await coder1_pipe(tls, h.BEFORE))
            pipes += pair
            for _ in range(options.rounds):
                for size in SIZES:
                    for pipe in pair:
                        seconds, cpu = await transfer(pipe, size, counts[size])
                        row = table.row(pipe.name)
                        row.add(f"cpu {size}", cpu / counts[size] * 1e6)
                        row.add(f"rate {size}", counts[size] / seconds)
                        row.add(f"util {size}", cpu / seconds)
            for pipe in pair:
                await pipe.stop()
    finally:
        for pipe in pipes:
            await pipe.stop()
    merged = tables[False]
    merged.title = (
        "Relay forwarding cost: CPU of the relay process per forwarded message, "
        "and messages per second (ratios against the naive relay over the same transport)"
    )
    merged.rows += tables[True].rows
    merged.baseline = "naive relay (ws)"
    merged.notes.append(
        "ratio column: against naive relay (ws) for every row; "
        "docs/performance.md compares each transport with its own naive row"
    )
    return merged
