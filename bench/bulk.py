"""
2. Bulk output: C{head -c SIZE /dev/zero | base64} on the terminal, streamed to the
browser's side, end to end.

Every system runs C{sh -c 'read x; head -c SIZE /dev/zero | base64; echo BENCH-DONE'}
on a pseudo-terminal; the clock starts when the browser's side types C{go} and Enter
and stops when C{BENCH-DONE} arrives.  MB/s counts the terminal's output bytes that
arrived (decrypted, where the system encrypts), in 10^6 bytes per second.  C{coder1
command} is the same output through a one-shot command (CMD_START, pipes instead of a
terminal).  CPU is that of the system's own processes (relay, bridge, servers; not
the command's), per MB delivered.  Peak RSS is sampled every 100 ms.

C{--output listing} prints a file listing instead (C{find /usr -ls}, taken once
and repeated up to SIZE bytes: terminal output that compresses about as real output
does), C{--output random} base64 of random bytes (SIZE bytes of it, which hardly
compresses): the zeros flatter what keeps output compressed (the bridge's
scrollback).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet.defer import Deferred

from bench import harness as h
from bench import terminals
from bench.stats import Metric, Table
from coder1_wire.envelope import Envelope, Kind, control

DEFAULT_SYSTEMS = ["naive-pty", "coder1", "coder1-command", "termpair", "terminado"]
BASELINE = "naive autobahn relay + PTY peer"
MARKER = b"BENCH-DONE"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1:].upper()])
    return int(text)


OUTPUTS = ("zeros", "listing", "random")


def command(size: int, output: str = "zeros", listing: str = "") -> str:
    if output == "listing":
        source = f"while cat {shlex.quote(listing)}; do :; done | head -c {size}"
    elif output == "random":
        source = f"head -c {size * 3 // 4} /dev/urandom | base64"
    else:
        source = f"head -c {size} /dev/zero | base64"
    return f"read x; {source}; echo {MARKER.decode()}"


def _listing() -> str:
    """A file of C{find /usr -ls} (at most 16 MiB), made once per run (removed after it)."""
    fd, path = tempfile.mkstemp(prefix=h.TMP_PREFIX + "listing-")
    with os.fdopen(fd, "wb") as out:
        find = shutil.which("find") or "/usr/bin/find"
        found = subprocess.run([find, "/usr", "-ls"], capture_output=True, check=False)
        out.write(found.stdout[: 16 * 2**20])
    os.chmod(path, 0o644)
    return path


class Coder1Command(terminals.Coder1):
    """The product, the output through a one-shot command (pipes) instead of a terminal."""

    name = "coder1 command"

    async def open(self) -> None:
        self.output = terminals.Output()
        self.stream += 1
        self._exited = Deferred()

    def _frame(self, envelope: Envelope) -> None:
        if envelope.stream != self.stream:
            return
        if envelope.kind == Kind.CMD_STDOUT:
            self.output.feed(envelope.payload)
        elif envelope.kind in (Kind.CMD_EXIT, Kind.CMD_ERROR) and self._exited is not None:
            self._exited.callback(None)

    def send(self, data: bytes) -> None:
        shell = self.command.removeprefix("read x; ")
        body = {"argv": ["sh", "-c", shell]}
        self.system.ide.send(control(Kind.CMD_START, body, stream=self.stream, peer=1))

    async def close(self, *, exits: bool = False) -> None:
        assert self._exited is not None
        await h.with_timeout(self._exited, 60, "CMD_EXIT")


def _systems(names: list[str]) -> tuple[list[terminals.System], list[str]]:
    plain = [n for n in names if n != "coder1-command"]
    systems, skipped = terminals.available(plain)
    if "coder1-command" in names:
        commands = [Coder1Command()]
        if h.BEFORE is not None:
            commands.append(Coder1Command(tree=h.BEFORE))
        at = next((i + 1 for i, s in enumerate(systems) if s.name == "coder1"), len(systems))
        systems[at:at] = commands
    return systems, skipped


async def run(options: Any) -> Table:
    size = parse_size(options.size or ("20M" if options.quick else "200M"))
    systems, skipped = _systems(options.systems or DEFAULT_SYSTEMS)
    output = getattr(options, "output", None) or "zeros"
    what = {
        "zeros": "of zeros through base64",
        "listing": "of a file listing (find /usr -ls, repeated)",
        "random": "of random bytes through base64",
    }[output]
    table = Table(
        f"Bulk output ({size / 2**20:g} MiB {what}, to the browser's side)",
        [
            Metric("mbps", "throughput", "MB/s", lower_is_better=False),
            Metric("cpu", "system CPU", "ms/MB", digits=2),
            Metric("peak", "peak RSS of the system's processes", "MiB", digits=0),
        ],
        terminals.baseline(systems, BASELINE),
        notes=[
            "TLS 1.3 on every WebSocket; coder1 and termpair also encrypt end to end",
            *skipped,
        ],
    )
    for system in systems:
        table.row(system.name)
    listing = _listing() if output == "listing" else ""
    try:
        for system in systems:
            await system.setup(command(size, output, listing))
        for _ in range(options.rounds):
            for system in systems:
                await _round(system, table, size)
    finally:
        for system in systems:
            try:
                await system.teardown()
            except Exception as e:
                table.notes.append(f"{system.name}: teardown failed: {e!r}")
        if listing:
            os.remove(listing)
    return table


async def _round(system: terminals.System, table: Table, size: int) -> None:
    await system.open()
    await h.sleep(0.3)
    pids = system.pids()
    sampler = h.PeakSampler(pids)
    cpu = sum(h.cpu_seconds(p) for p in pids.values())
    done = system.output.expect(MARKER)
    before = system.output.total
    start = time.perf_counter()
    system.send(b"go\r")
    timeout = max(120.0, size / 1e6 * 2)
    end: float = await h.with_timeout(done, timeout, f"{system.name}: bulk output")
    received = system.output.total - before
    cpu = sum(h.cpu_seconds(p) for p in pids.values()) - cpu
    peak = sampler.stop()
    await system.close(exits=True)
    row = table.row(system.name)
    megabytes = received / 1e6
    row.add("mbps", megabytes / (end - start))
    row.add("cpu", cpu * 1000 / megabytes)
    row.add("peak", sum(peak.values()) / 2**20)
    for name, value in peak.items():
        row.add(f"peak {name}", value / 2**20)
