"""
Benchmark harness only: one of the capacity benchmark's client processes.

Pairs sessions with a relay and holds them open, idle: per session a browser session,
a pairing code, its redemption, a bridge WebSocket and an IDE WebSocket, each from its
own loopback address (127.x.y.z), so that the relay's per-address limits apply per
simulated user as in real life.  Both connections PING the relay every heartbeat
interval (WELCOME's) and answer its PINGs, as the page and the bridge do.  Reads commands on stdin:

    grow N S    pair until this worker holds N sessions, or for at most S seconds, then
                print ``held N {json}``
    held        print ``holding N``: the sessions this worker holds
    reconnect N close both connections of N sessions held and open them again (a few
                at a time), then print ``reconnected {json}``
    quit        close everything and exit

    python -m bench.capacity_worker PORT CERT_PEM FIRST_INDEX CONCURRENCY [NODE_PORTS]

With NODE_PORTS (comma-separated), PORT is a deployment's public port, named in
every URL, and each connection goes to one of NODE_PORTS picked at random, as
through a round-robin TCP balancer in front of several relay processes
(L{bench.mesh.Nodes}); with NODE_PORTS written C{source:P1,P2}, picked by its
source address (every connection of a session to one node).
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.protocols.basic import LineReceiver

from bench import harness as h
from coder1_wire.e2e import Identity
from coder1_wire.tls import client_tls_options

#: Seconds one pairing may take before it is given up (an answer that never comes).
PAIRING_TIMEOUT = 60.0


def source_address(index: int) -> str:
    """A distinct loopback address per session (never .0 or .255)."""
    return f"127.{1 + index // 62500}.{(index // 250) % 250 + 1}.{index % 250 + 1}"


class Worker(LineReceiver):
    delimiter = b"\n"

    def __init__(self, relay: h.Relay, first: int, concurrency: int) -> None:
        self.relay = relay
        self.next_index = first
        self.creator = client_tls_options("localhost", relay.cert_pem)
        self.lanes = concurrency
        self.browser, self.bridge = Identity.generate(), Identity.generate()
        self.links: list[h.RelayLink] = []
        #: Per session held (links 2i and 2i + 1): its pairing and source address.
        self.sessions: list[tuple[h.Pairing, str]] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.finished_at: list[float] = []
        self.finished: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        command, _, arg = line.decode().strip().partition(" ")
        if command == "grow":
            target, _, seconds = arg.partition(" ")
            grown = self.grow(int(target), float(seconds or "inf"))
            Deferred.fromCoroutine(grown).addErrback(self._failed)
        elif command == "reconnect":
            reconnected = self.reconnect(int(arg))
            Deferred.fromCoroutine(reconnected).addErrback(self._failed)
        elif command == "held":
            self.sendLine(f"holding {len(self.links) // 2}".encode())
        elif command == "quit":
            self.finished.callback(None)

    def _failed(self, failure: Any) -> None:
        self.sendLine(f"error {failure.getErrorMessage()}".encode())

    def bounded(self, deadline: float) -> Deferred[None]:
        """
        One pairing; after PAIRING_TIMEOUT seconds it is counted as failed and left to
        finish in the background (cancelling a half-closed TLS connection may hang).
        """
        done: Deferred[None] = Deferred()

        def finish(result: object) -> None:
            if not done.called:
                done.callback(None)

        def give_up() -> None:
            if not done.called:
                self.failures.append(f"no answer in {PAIRING_TIMEOUT:g}s")
                done.callback(None)

        timer = h.reactor.callLater(PAIRING_TIMEOUT, give_up)
        attempt = Deferred.fromCoroutine(self.one(deadline))
        attempt.addBoth(finish)
        attempt.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return done

    async def one(self, deadline: float) -> None:
        if time.perf_counter() > deadline:
            return
        index = self.next_index
        self.next_index += 1
        source = source_address(index)
        start = time.perf_counter()
        try:
            pairing = await h.pair(
                self.relay, self.browser, self.bridge, source=source, creator=self.creator
            )
            bridge, ide = await self.connect(pairing, source)
        except Exception as e:
            self.failures.append(repr(e)[:200])
            return
        self.latencies.append(time.perf_counter() - start)
        self.finished_at.append(time.perf_counter())
        self.links += [bridge, ide]
        self.sessions.append((pairing, source))

    async def connect(self, pairing: Any, source: str) -> tuple[Any, Any]:
        """A paired session's two connections, from C{source}: the bridge's, the tab's."""
        bridge = await h.open_bridge_link(
            self.relay, pairing.token, source=source, creator=self.creator
        )
        ide = await h.open_ide_link(self.relay, pairing.cookie, source=source, creator=self.creator)
        bridge.keep_pinging()
        ide.keep_pinging()
        return bridge, ide

    async def again(self, index: int) -> None:
        """Close session C{index}'s two connections and open them again, as after a sleep."""
        pairing, source = self.sessions[index]
        for link in self.links[2 * index : 2 * index + 2]:
            await h.with_timeout(link.close(), 30, "closing a connection")
        start = time.perf_counter()
        try:
            bridge, ide = await self.connect(pairing, source)
        except Exception as e:
            self.failures.append(repr(e)[:200])
            return
        self.latencies.append(time.perf_counter() - start)
        self.links[2 * index : 2 * index + 2] = [bridge, ide]

    async def reconnect(self, count: int) -> None:
        self.latencies, self.failures = [], []
        todo = list(range(min(count, len(self.sessions))))

        async def lane() -> None:
            while todo:
                await self.again(todo.pop())

        await h.gatherResults([Deferred.fromCoroutine(lane()) for _ in range(self.lanes)])
        report = {
            "reconnected": len(self.latencies),
            "latencies": self.latencies,
            "failures": self.failures[:5],
            "failed": len(self.failures),
        }
        self.sendLine(f"reconnected {json.dumps(report)}".encode())

    async def grow(self, target: int, seconds: float) -> None:
        self.latencies, self.failures, self.finished_at = [], [], []
        start = time.perf_counter()
        deadline = start + seconds
        todo = [target - len(self.links) // 2]

        async def lane() -> None:
            # A few lanes, each one pairing at a time, until done or out of time (no
            # queue of thousands of waiters: those would run as one deep call chain).
            while todo[0] > 0 and time.perf_counter() < deadline:
                todo[0] -= 1
                await self.bounded(deadline)

        await h.gatherResults([Deferred.fromCoroutine(lane()) for _ in range(self.lanes)])
        end = time.perf_counter()
        report = {
            "seconds": end - start,
            "last30": sum(1 for t in self.finished_at if t > end - 30),
            "paired": len(self.latencies),
            "latencies": self.latencies,
            "failures": self.failures[:5],
            "failed": len(self.failures),
        }
        self.sendLine(f"held {len(self.links) // 2} {json.dumps(report)}".encode())


async def _run(reactor: Any, argv: list[str]) -> None:
    port, cert, first, concurrency = int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    with open(cert, "rb") as f:
        pem = f.read()
    relay = h.Relay(None, port, True, pem, "")  # type: ignore[arg-type]
    if len(argv) > 5:
        from bench.mesh import Nodes

        by_source = argv[5].startswith("source:")
        ports = [int(p) for p in argv[5].removeprefix("source:").split(",")]
        relay = Nodes(None, port, True, pem, "", ports, random.Random(first), by_source)  # type: ignore[arg-type]
    worker = Worker(relay, first, concurrency)
    stdio.StandardIO(worker)
    worker.sendLine(b"worker ready")
    await worker.finished


def main() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, sys.argv)))


if __name__ == "__main__":
    main()
