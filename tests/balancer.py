"""
A TCP balancer for tests: what an operator puts in front of several relay
nodes (HAProxy, nginx C{stream}), in this process.  It passes bytes, never
TLS, to one of its backends; the test chooses which ones are in rotation, and
a backend that refuses the connection is skipped for the next.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.portforward import Proxy, ProxyClient, ProxyClientFactory

from .loopback import reactor


class _Backend(Proxy):
    """The balancer's side towards a client; it picks a backend when the client connects."""

    factory: Balancer  # type: ignore[assignment]

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.pauseProducing()
        self.factory.live.add(self)
        Deferred.fromCoroutine(self._connect(list(self.factory.rotation())))

    async def _connect(self, ports: list[int]) -> None:
        for port in ports:
            client = ProxyClientFactory()
            client.protocol = ProxyClient
            client.setServer(self)
            try:
                await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2).connect(client)
            except Exception:  # noqa: S112  # refused: the next backend
                continue
            return
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


@attrs.define(eq=False)
class Balancer(Factory):
    """Round robin over C{backends} (ports on loopback), skipping ones that refuse."""

    backends: list[int]
    port: IListeningPort | None = None
    live: set[_Backend] = attrs.field(factory=set)
    _next: int = 0

    protocol = _Backend  # type: ignore[assignment]  # Twisted's annotation is for instances

    def rotation(self) -> list[int]:
        """The backends, starting with the next in turn."""
        start = self._next % max(1, len(self.backends))
        self._next += 1
        return self.backends[start:] + self.backends[:start]

    async def listen(self) -> int:
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self)
        address: Any = self.port.getHost()
        return int(address.port)

    async def stop(self) -> None:
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        for each in list(self.live):
            transport: Any = each.transport
            transport.abortConnection()
