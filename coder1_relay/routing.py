"""
Routing: which browser connections and which bridge belong together.

The hub sees each frame's envelope (kind, peer, stream, seq) and nothing
else: end-to-end payloads are forwarded as the very bytes that arrived.  A
frame goes only to connections of the session it came from; there is no
fallback route, so a frame for a bridge that is not connected is answered
with an error, never sent elsewhere.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from coder1_relay.store import BridgeRecord, IRelayStore, Presence
from coder1_relay.telemetry import Telemetry
from coder1_wire import closecodes
from coder1_wire.envelope import (
    Envelope,
    EnvelopeError,
    Kind,
    control,
    decode,
    is_end_to_end,
    is_to_browser,
)
from coder1_wire.heartbeat import Heartbeat


class Link(Protocol):
    """One WebSocket connection, as the hub needs it."""

    def send(self, frame: bytes) -> None:
        """Send one binary message."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection with a close code and a short reason."""

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""


@attrs.frozen
class HubSettings:
    """Heartbeat timing; parties are told the interval in WELCOME."""

    heartbeat_interval: float = 15.0
    heartbeat_timeout: float = 45.0


@attrs.define(eq=False)
class Endpoint:
    """One party's connection: an IDE tab or a bridge."""

    hub: Hub
    link: Link
    session: str
    peer: int  # 0 for a browser
    counted: bool
    connection_id: str
    heartbeat: Heartbeat | None = None
    expiry: IDelayedCall | None = None
    last_exit: int | None = None

    @property
    def is_bridge(self) -> bool:
        return self.peer != 0

    def receive(self, frame: bytes) -> None:
        """A binary message arrived on this connection."""
        if self.heartbeat is not None:
            self.heartbeat.feed()
        self.hub.route(self, frame)

    def send(self, envelope: Envelope) -> None:
        self.link.send(envelope.encode())

    def close(self, code: int, reason: str) -> None:
        self.link.close(code, reason)


@attrs.define
class Hub:
    """All connections of this relay process, by browser session."""

    store: IRelayStore
    telemetry: Telemetry
    clock: IReactorTime
    settings: HubSettings = HubSettings()
    _ides: dict[str, set[Endpoint]] = attrs.field(factory=dict)
    _bridges: dict[tuple[str, int], Endpoint] = attrs.field(factory=dict)
    log: Logger = attrs.field(factory=Logger, init=False)

    def _start(self, endpoint: Endpoint) -> None:
        endpoint.heartbeat = Heartbeat(
            self.clock,
            self.settings.heartbeat_interval,
            self.settings.heartbeat_timeout,
            ping=lambda: endpoint.send(Envelope(Kind.PING)),
            on_timeout=lambda: endpoint.close(
                closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you"
            ),
        )
        endpoint.heartbeat.start()
        if endpoint.counted:
            self.telemetry.connection_opened(
                "bridge" if endpoint.is_bridge else "ide", endpoint.connection_id
            )
        endpoint.send(
            control(
                Kind.WELCOME,
                {"peer": endpoint.peer, "heartbeat": self.settings.heartbeat_interval},
            )
        )

    def attach_ide(self, session: str, link: Link, connection_id: str) -> Endpoint:
        """A browser tab of C{session} connected."""
        endpoint = Endpoint(self, link, session, 0, True, connection_id)
        self._ides.setdefault(session, set()).add(endpoint)
        self._start(endpoint)
        self._send_presence(session, [endpoint])
        return endpoint

    def attach_bridge(
        self,
        session: str,
        peer: int,
        link: Link,
        connection_id: str,
        *,
        version: str,
        label: str,
        telemetry: bool,
        expires_at: float,
        bridge_key: str,
    ) -> Endpoint:
        """
        Bridge C{peer} of C{session} connected; an older connection of it is
        replaced.  It is closed when its token expires.
        """
        old = self._bridges.get((session, peer))
        if old is not None:
            self.detach(old)
            old.close(closecodes.REPLACED, "this bridge connected again elsewhere")
        endpoint = Endpoint(self, link, session, peer, telemetry, connection_id)
        self._bridges[(session, peer)] = endpoint
        self._start(endpoint)
        endpoint.expiry = self.clock.callLater(
            max(0.0, expires_at - self.clock.seconds()),
            lambda: self.disconnect_bridge(
                session, peer, closecodes.EXPIRED, "token has expired; pair again"
            ),
        )
        if telemetry:
            self.telemetry.bridge_version(version)
        presence = Presence(peer, label, version, self.clock.seconds(), bridge_key)
        self.store.set_presence(session, presence).addCallback(
            lambda _: self._send_presence(session)
        )
        return endpoint

    def detach(self, endpoint: Endpoint) -> None:
        """A connection closed (or was replaced); forget it.  Idempotent."""
        if endpoint.heartbeat is None:
            return
        endpoint.heartbeat.stop()
        endpoint.heartbeat = None
        if endpoint.expiry is not None and endpoint.expiry.active():
            endpoint.expiry.cancel()
        if endpoint.counted:
            self.telemetry.connection_closed(endpoint.connection_id)
        if not endpoint.is_bridge:
            ides = self._ides.get(endpoint.session, set())
            ides.discard(endpoint)
            if not ides:
                self._ides.pop(endpoint.session, None)
            return
        key = (endpoint.session, endpoint.peer)
        if self._bridges.get(key) is endpoint:
            del self._bridges[key]
            self.store.clear_presence(*key).addCallback(
                lambda _: self._send_presence(endpoint.session)
            )

    def paired(self, session: str, record: BridgeRecord) -> None:
        """
        A bridge of C{session} redeemed C{record.code} and presented its key:
        tell the tabs (the one showing that code shows the verification string).
        """
        body = {
            "peer": record.peer,
            "label": record.label,
            "bridge_key": record.bridge_key,
            "code": record.code,
        }
        for ide in self._ides.get(session, ()):
            ide.send(control(Kind.PAIRED, body))

    def disconnect_bridge(self, session: str, peer: int, code: int, reason: str) -> None:
        """Close bridge C{peer} of C{session} if it is connected here (it was revoked)."""
        endpoint = self._bridges.get((session, peer))
        if endpoint is not None:
            self.detach(endpoint)
            endpoint.close(code, reason)

    def ide_count(self, session: str) -> int:
        """How many IDE connections C{session} has attached now."""
        return len(self._ides.get(session, ()))

    def endpoints(self) -> list[Endpoint]:
        """Every connection attached now."""
        return [*self._bridges.values(), *(e for ides in self._ides.values() for e in ides)]

    def route(self, source: Endpoint, frame: bytes) -> None:
        """Check a frame's envelope and forward it, untouched, to where it belongs."""
        try:
            envelope = decode(frame)
        except EnvelopeError as e:
            source.close(closecodes.PROTOCOL_ERROR, str(e))
            return
        if not is_end_to_end(envelope.kind):
            self._control(source, envelope)
        elif is_to_browser(envelope.kind) != source.is_bridge:
            source.close(closecodes.PROTOCOL_ERROR, "frame kind travels the other way")
        elif source.is_bridge:
            self._from_bridge(source, envelope, frame)
        else:
            self._from_ide(source, envelope, frame)

    def _from_ide(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
        bridge = self._bridges.get((source.session, envelope.peer))
        if bridge is None:
            source.send(
                control(
                    Kind.ERROR,
                    {"error": "bridge-offline", "message": "that bridge is not connected"},
                    stream=envelope.stream,
                    peer=envelope.peer,
                )
            )
            return
        if envelope.kind == Kind.CMD_START and bridge.counted:
            self.telemetry.command_started()
        bridge.link.send(frame)

    def _from_bridge(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
        if envelope.peer != source.peer:
            source.close(closecodes.PROTOCOL_ERROR, "frame names another bridge")
            return
        # One CMD_EXIT goes out once per browser channel; count the command once.
        if (
            envelope.kind == Kind.CMD_EXIT
            and source.counted
            and source.last_exit != envelope.stream
        ):
            source.last_exit = envelope.stream
            self.telemetry.command_completed()
        for ide in self._ides.get(source.session, ()):
            ide.link.send(frame)

    def _control(self, source: Endpoint, envelope: Envelope) -> None:
        if envelope.kind == Kind.PING:
            source.send(Envelope(Kind.PONG))
        elif envelope.kind == Kind.PONG:
            pass
        elif envelope.kind == Kind.CRASH and source.is_bridge:
            if source.counted:
                self._crash(source, envelope)
        else:
            source.close(closecodes.PROTOCOL_ERROR, "control frame not allowed here")

    def _crash(self, source: Endpoint, envelope: Envelope) -> None:
        try:
            report: Any = envelope.json()
        except EnvelopeError:
            report = None
        if not self.telemetry.crash_report(report):
            self.log.info("refused a malformed crash report from a bridge")

    def _send_presence(self, session: str, to: list[Endpoint] | None = None) -> None:
        def send(bridges: list[Presence]) -> None:
            body = {"bridges": [attrs.asdict(p) for p in bridges]}
            for ide in to if to is not None else self._ides.get(session, ()):
                ide.send(control(Kind.PRESENCE, body))

        self.store.presence(session).addCallback(send)
