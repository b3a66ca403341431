"""The relay's parts, wired once by tap.py and shared by the web and WebSocket layers."""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from coder1_relay.pairing import Pairing
from coder1_relay.routing import Hub
from coder1_relay.store import IRelayStore
from coder1_relay.telemetry import Telemetry
from coder1_relay.tokens import TokenAuthority

#: The browser session cookie; C{__Host-} makes browsers insist on Secure, Path=/ and no Domain.
SESSION_COOKIE = "__Host-coder1-session"


@attrs.frozen
class Limits:
    """Per-connection limits (docs/protocol.md lists them)."""

    max_message_size: int = 1024 * 1024
    handshake_timeout: float = 10.0
    max_body_size: int = 16 * 1024


class Closable(Protocol):
    """A live connection, as shutdown needs it."""

    def close(self, code: int, reason: str) -> None:
        """Close with a close code and reason."""

    def abort(self) -> None:
        """Drop at once."""


@attrs.define
class Connections:
    """Every WebSocket connection the relay holds, so shutdown can wait for them."""

    live: set[Closable] = attrs.field(factory=set)
    _idle: list[Deferred[None]] = attrs.field(factory=list)

    def add(self, connection: Closable) -> None:
        self.live.add(connection)

    def remove(self, connection: Closable) -> None:
        self.live.discard(connection)
        if not self.live:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection is left."""
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


@attrs.define
class RelayContext:
    """Everything a request handler needs; nothing else reaches relay state."""

    clock: IReactorTime
    store: IRelayStore
    tokens: TokenAuthority
    pairing: Pairing
    hub: Hub
    telemetry: Telemetry
    public_url: str
    extra_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    connections: Connections = attrs.field(factory=Connections)

    @property
    def allowed_origins(self) -> set[str]:
        """The relay's own origin plus the operator's C{--allowed-origin}s."""
        return {self.public_url.rstrip("/"), *self.extra_origins}
