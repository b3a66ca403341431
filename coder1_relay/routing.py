"""
Routing: which browser connections and which bridge belong together.

The hub sees each frame's envelope (kind, peer, stream, seq) and nothing
else: end-to-end payloads are forwarded as the very bytes that arrived.  A
frame goes only to connections of the session it came from; there is no
fallback route, so a frame for a bridge that is not connected is answered
with an error, never sent elsewhere.

Flow control: a reader that stops reading holds up what feeds it, all the
way back, and nothing is dropped.  Each connection's L{Endpoint} is the
push producer registered on its transport (TLS over TCP), which calls
C{pauseProducing} when more than C{HubSettings.send_buffer} bytes wait to go
out to it and C{resumeProducing} once they have all gone into the kernel
(its low-water mark is empty: a hold lasts until the buffer has drained, and
what the released connections read meanwhile is handled in that same turn,
once every hold it ends is released).
While an endpoint is I{congested} the hub stops reading (L{Endpoint.hold})
the connections whose frames go to it -- every bridge of its session for a
browser tab, every tab of its session for a bridge -- and the congested
connection itself, whose own frames (pings) would be answered on it.  Holds
are counted by reason (each congested endpoint, and the bridge rate limit of
C{coder1_relay.websocket}), so a connection is read again only once every
reason is gone: with several tabs, a bridge is read while no tab is
congested.  Held, a bridge stops sending; the bridge then stops reading its
processes' output (C{coder1_bridge.connection}), and they block on write.

The bound: what the relay holds for a session is, for each of its
connections (at most C{Limits.ide_connections_per_session} tabs and
C{Limits.bridges_per_session} bridges),

  - on the way out, C{send_buffer} (64 KiB) in the TCP transport, plus what
    was under way when that mark was passed: the TLS layer's held writes
    (at most 16 KiB, C{coder1_relay.tls_server}) and the message being
    forwarded (at most C{Limits.max_message_size}, 1 MiB; a bridge's output
    frames are at most 64 KiB), as everything that feeds the connection is
    held at once;
  - on the way in, what was read before the connection was held and one
    read more (its socket is stopped when data arrives while it is held, so
    a hold that ends before then costs no system call): two socket reads
    (Twisted reads C{send_buffer} at a time) and the message being assembled
    (at most C{Limits.max_message_size}), in Autobahn's buffer;
  - and the relay's own small frames (a ping every C{heartbeat_interval},
    presence when a bridge comes or goes), which are never held.

With one tab and one bridge sending output that is 64 + 16 + 64 (out to the
tab) + 128 + 64 (in from the bridge), about 340 KiB; at worst, 16 tabs and 16
bridges sending 1 MiB messages, about 72 MiB.  The kernel's socket buffers
behind it (a few MiB each, autotuned) are not the relay's memory.
tests/test_flow.py measures it: a tab that stops reading a 200 MB output
grows the relay by a few hundred KiB.

The relay does not hear a held connection, so its heartbeat waits while
others hold it; a congested connection's waits only until it drains, which
counts as hearing from it.  So only a connection that stays congested for
C{heartbeat_timeout} (a tab that stopped reading altogether) is closed for
silence, and the rest of its session goes on.

The hot path: an end-to-end frame is routed on its header alone, read in
place (no L{Envelope}, no copy of the payload), and the very bytes that
arrived are sent on.  Hearing a frame only notes the time: each connection
has one timer, which pings it after a silence (L{Hub._quiet}) and, when it fires,
compares the time last heard with C{heartbeat_timeout} (a timer is not moved
per frame).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_relay.store import BridgeRecord, IRelayStore, Presence, StoreUnavailable
from coder1_relay.telemetry import Telemetry
from coder1_wire import closecodes
from coder1_wire.crash import MAX_REPORT_BYTES
from coder1_wire.envelope import (
    FIRST_END_TO_END,
    HEADER_SIZE,
    LAST_END_TO_END,
    TO_BROWSER_BIT,
    WIRE_VERSION,
    Envelope,
    EnvelopeError,
    Kind,
    control,
    decode,
    is_end_to_end,
    is_to_browser,
)

#: What routing reads of the 20-byte header: version, kind, flags, peer, stream (not seq).
_ROUTING = struct.Struct("!BBHII")
_NO_BRIDGES: dict[int, Endpoint] = {}
_NO_IDES: frozenset[Endpoint] = frozenset()
#: Plain ints: comparing with an IntEnum member costs a call.
_CMD_START, _CMD_EXIT = int(Kind.CMD_START), int(Kind.CMD_EXIT)
_KEY_OFFER = int(Kind.KEY_OFFER)
#: Channels remembered per tab and bridge, to tell the bridge when the tab is gone.
MAX_OFFERED = 32
_PING, _PONG = Envelope(Kind.PING).encode(), Envelope(Kind.PONG).encode()


class Link(Protocol):
    """One WebSocket connection, as the hub needs it."""

    def send(self, frame: bytes) -> None:
        """Send one binary message."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection with a close code and a short reason."""

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""


class Reader(Protocol):
    """A connection whose reading the hub can stop and start again (flow control)."""

    def pause_reading(self) -> None:
        """Stop reading the socket, and handling what was read of it already."""

    def resume_reading(self, later: bool = True) -> None:
        """
        Read it again; what was read while it was held is handled in a
        moment, or, with C{later} false, at L{handle_held}.
        """

    def handle_held(self) -> None:
        """Handle what was read while it was held, now."""


@attrs.frozen
class HubSettings:
    """
    Heartbeat timing (parties are told the interval in WELCOME), and the
    high-water mark of every connection's send buffer (see Flow control).
    """

    heartbeat_interval: float = 15.0
    heartbeat_timeout: float = 45.0
    #: Bytes waiting to go out to a connection past which the hub stops reading
    #: what feeds it (Twisted's own default for a TCP transport).
    send_buffer: int = attrs.field(default=64 * 1024, validator=attrs.validators.gt(0))


#: The reason a bridge past its message rate is held (C{coder1_relay.websocket}).
RATE = "rate"


@implementer(IPushProducer)
@attrs.define(eq=False)
class Endpoint:
    """
    One party's connection: an IDE tab or a bridge.  It is the push producer
    registered on its connection's transport: that tells it when the
    connection is congested, and it tells the hub.
    """

    hub: Hub
    link: Link
    session: str
    peer: int  # 0 for a browser
    counted: bool
    connection_id: str
    #: When anything last arrived from it (or it drained, or was released).
    heard: float = 0.0
    #: When it is next pinged.
    next_ping: float = math.inf
    #: When its token expires (a bridge's; never for a tab).
    expires_at: float = math.inf
    #: Its one timer: pings it, checks C{heard}, and ends it at C{expires_at}; None
    #: once detached.
    watch: IDelayedCall | None = None
    last_exit: int | None = None
    #: Stops and starts reading its connection; without one, holds are only counted.
    reader: Reader | None = None
    #: Whether more than C{HubSettings.send_buffer} bytes wait to go out to it.
    congested: bool = False
    #: Why its connection is not read now: the congested endpoints it would
    #: send to (itself included), and L{RATE}.
    holds: set[object] = attrs.field(factory=set)
    #: A tab's channels, by bridge: the C{channel} of each KEY_OFFER it sent,
    #: so that the bridge hears (GONE) when the tab's connection is.
    offered: dict[int, list[int]] = attrs.field(factory=dict)

    @property
    def is_bridge(self) -> bool:
        return self.peer != 0

    @property
    def held(self) -> bool:
        """Whether its connection is not read now."""
        return bool(self.holds)

    def hold(self, reason: object) -> None:
        """Stop reading its connection until C{reason}, and every other, is released."""
        if not self.holds and self.reader is not None:
            self.reader.pause_reading()
        self.holds.add(reason)

    def release(self, reason: object, later: bool = True) -> bool:
        """
        C{reason} no longer holds it; with no other, its connection is read
        again (L{Reader.resume_reading}): whether it is.
        """
        if reason not in self.holds:
            return False
        self.holds.discard(reason)
        if self.holds:
            return False
        # Unheard only because unread: its silence starts now.
        self.heard = self.hub.clock.seconds()
        if self.reader is not None:
            self.reader.resume_reading(later)
        return True

    # IPushProducer, for its transport.

    def pauseProducing(self) -> None:
        self.hub.congested(self)

    def resumeProducing(self) -> None:
        self.hub.drained(self, now=True)

    def stopProducing(self) -> None:
        self.hub.drained(self)

    def receive(self, frame: bytes) -> None:
        """A binary message arrived on this connection."""
        self.heard = self.hub.clock.seconds()
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
    _bridges: dict[str, dict[int, Endpoint]] = attrs.field(factory=dict)
    #: Called with a session once this hub holds no connection of it (the
    #: mesh gives the session up, C{coder1_relay.mesh}).
    on_empty: Callable[[str], None] | None = None
    log: Logger = attrs.field(factory=Logger, init=False)
    #: Whether a subclass overrides L{_from_ide} or L{_from_bridge}: it gets
    #: every frame decoded, through them.
    _envelope_hooks: bool = attrs.field(init=False)
    #: Counts for the metrics (C{coder1_relay.metrics}): plain integers, as
    #: they are kept for every frame.
    frames_to_bridge: int = attrs.field(default=0, init=False)
    bytes_to_bridge: int = attrs.field(default=0, init=False)
    frames_to_browser: int = attrs.field(default=0, init=False)
    bytes_to_browser: int = attrs.field(default=0, init=False)
    heartbeat_closes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        hub = type(self)
        self._envelope_hooks = (
            hub._from_ide is not Hub._from_ide or hub._from_bridge is not Hub._from_bridge
        )

    def _start(self, endpoint: Endpoint) -> None:
        now = self.clock.seconds()
        endpoint.heard = now
        endpoint.next_ping = now + self._quiet()
        self._rewatch(endpoint, now)
        for other in self._facing(endpoint):
            if other.congested:
                endpoint.hold(other)
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

    def attach_ide(
        self, session: str, link: Link, connection_id: str, *, reader: Reader | None = None
    ) -> Endpoint:
        """A browser tab of C{session} connected."""
        endpoint = Endpoint(self, link, session, 0, True, connection_id, reader=reader)
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
        reader: Reader | None = None,
    ) -> Endpoint:
        """
        Bridge C{peer} of C{session} connected; an older connection of it is
        replaced.  It is closed when its token expires.
        """
        old = self._bridges.get(session, {}).get(peer)
        if old is not None:
            self.detach(old)
            old.close(closecodes.REPLACED, "this bridge connected again elsewhere")
        endpoint = Endpoint(
            self,
            link,
            session,
            peer,
            telemetry,
            connection_id,
            expires_at=expires_at,
            reader=reader,
        )
        self._bridges.setdefault(session, {})[peer] = endpoint
        self._start(endpoint)
        if telemetry:
            self.telemetry.bridge_version(version)
        presence = Presence(peer, label, version, self.clock.seconds(), bridge_key)
        self.store.set_presence(session, presence).addCallbacks(
            lambda _: self._send_presence(session), self._presence_failed
        )
        return endpoint

    def detach(self, endpoint: Endpoint) -> None:
        """A connection closed (or was replaced); forget it.  Idempotent."""
        if endpoint.watch is None:
            return
        if endpoint.watch.active():
            endpoint.watch.cancel()
        endpoint.watch = None
        if endpoint.counted:
            self.telemetry.connection_closed(endpoint.connection_id)
        # What it held is read again, and so is it, so that it can finish closing.
        self.drained(endpoint)
        if endpoint.holds:
            endpoint.holds.clear()
            if endpoint.reader is not None:
                endpoint.reader.resume_reading()
        if not endpoint.is_bridge:
            ides = self._ides.get(endpoint.session, set())
            ides.discard(endpoint)
            if not ides:
                self._ides.pop(endpoint.session, None)
            self._gone(endpoint)
        else:
            bridges = self._bridges.get(endpoint.session, {})
            if bridges.get(endpoint.peer) is endpoint:
                del bridges[endpoint.peer]
                if not bridges:
                    del self._bridges[endpoint.session]
                self.store.clear_presence(endpoint.session, endpoint.peer).addCallbacks(
                    lambda _: self._send_presence(endpoint.session), self._presence_failed
                )
        if self.on_empty is not None and not self.holds(endpoint.session):
            self.on_empty(endpoint.session)

    def holds(self, session: str) -> bool:
        """Whether any connection of C{session} is attached here."""
        return session in self._ides or session in self._bridges

    def close_session(self, session: str, code: int, reason: str) -> None:
        """Close every connection of C{session} here (it is held elsewhere now)."""
        for endpoint in [
            *self._ides.get(session, ()),
            *self._bridges.get(session, {}).values(),
        ]:
            self.detach(endpoint)
            endpoint.close(code, reason)

    def congested(self, endpoint: Endpoint) -> None:
        """
        More than C{send_buffer} bytes wait to go out to C{endpoint}: stop
        reading it and the other side of its session until they have gone.
        """
        if endpoint.congested or endpoint.watch is None:  # or it is detached
            return
        endpoint.congested = True
        endpoint.hold(endpoint)
        for other in self._facing(endpoint):
            other.hold(endpoint)

    def drained(self, endpoint: Endpoint, *, now: bool = False) -> None:
        """
        What waited to go out to C{endpoint} has gone (or it has): release its
        holds.  With C{now} (its transport drained), what the connections it
        releases read while held is handled at once, once every hold is
        released (so what that sends finds the holds as they are); else in a
        moment.
        """
        if not endpoint.congested:
            return
        endpoint.congested = False
        released = [endpoint] if endpoint.release(endpoint, not now) else []
        for other in self._facing(endpoint):
            if other.release(endpoint, not now):
                released.append(other)
        if now:
            for other in released:
                # Held again by what an earlier one sent: handled when released again.
                if not other.holds and other.reader is not None:
                    other.reader.handle_held()

    def _facing(self, endpoint: Endpoint) -> list[Endpoint]:
        """The other side of its session: its bridges for a tab, its tabs for a bridge."""
        if endpoint.is_bridge:
            return list(self._ides.get(endpoint.session, ()))
        return list(self._bridges.get(endpoint.session, {}).values())

    def _rewatch(self, endpoint: Endpoint, now: float) -> None:
        """Set its timer for its next ping or the end of its allowed silence."""
        due = min(
            endpoint.next_ping,
            endpoint.heard + self.settings.heartbeat_timeout,
            endpoint.expires_at,
        )
        endpoint.watch = self.clock.callLater(max(0.0, due - now), self._heartbeat, endpoint)

    def _heartbeat(self, endpoint: Endpoint) -> None:
        """
        Its timer: end it when its token expires, close it if silent too long
        (L{_silent}), ping it when due.
        """
        now = self.clock.seconds()
        if now >= endpoint.expires_at:
            self.detach(endpoint)
            endpoint.close(closecodes.EXPIRED, "token has expired; pair again")
            return
        if now >= endpoint.heard + self.settings.heartbeat_timeout and self._silent(endpoint):
            # Its timer stays stopped; detach() (on close) forgets the rest.
            self.heartbeat_closes += 1
            endpoint.close(closecodes.HEARTBEAT_TIMEOUT, "no heartbeat from you")
            return
        if now >= endpoint.next_ping:
            if now - endpoint.heard >= self._quiet():
                endpoint.next_ping = now + self.settings.heartbeat_interval
                endpoint.link.send(_PING)
            else:  # it spoke (its own PING): no PING needed until it falls quiet
                endpoint.next_ping = endpoint.heard + self._quiet()
        if endpoint.watch is not None:  # not detached by what the ping set off
            self._rewatch(endpoint, now)

    def _quiet(self) -> float:
        """
        Silence after which it is PINGed: a party that PINGs on its own every
        C{heartbeat_interval} (the bridge, the page) is only answered, never
        PINGed; a silent one after two intervals, or one interval before its
        timeout if that comes sooner (docs/protocol.md, section 7).
        """
        interval, timeout = self.settings.heartbeat_interval, self.settings.heartbeat_timeout
        return min(2 * interval, max(interval, timeout - interval))

    def _silent(self, endpoint: Endpoint) -> bool:
        """
        Nothing heard from C{endpoint} for C{heartbeat_timeout}: whether to
        close it.  Not if the relay has not been reading it for another's sake
        (or its rate); then it is given another C{heartbeat_timeout}.
        """
        if endpoint.holds - {endpoint}:
            endpoint.heard = self.clock.seconds()
            return False
        return True

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
        endpoint = self._bridges.get(session, {}).get(peer)
        if endpoint is not None:
            self.detach(endpoint)
            endpoint.close(code, reason)

    def ide_count(self, session: str) -> int:
        """How many IDE connections C{session} has attached now."""
        return len(self._ides.get(session, ()))

    def paired_sessions(self) -> int:
        """How many sessions have a bridge attached here."""
        return len(self._bridges)

    def endpoints(self) -> list[Endpoint]:
        """Every connection attached now."""
        return [
            *(b for bridges in self._bridges.values() for b in bridges.values()),
            *(e for ides in self._ides.values() for e in ides),
        ]

    def route(self, source: Endpoint, frame: bytes) -> None:
        """
        Check a frame's envelope and forward it, untouched, to where it belongs.

        End-to-end frames take the fast path: their header is read in place
        and nothing else.  Everything else (control frames, and every frame
        that would be refused) goes through L{decode}.
        """
        if len(frame) >= HEADER_SIZE:
            version, kind, flags, peer, stream = _ROUTING.unpack_from(frame)
            if (
                version == WIRE_VERSION
                and not flags
                and FIRST_END_TO_END <= kind <= LAST_END_TO_END
            ):
                # source.peer, not is_bridge: this runs for every frame.
                source_peer = source.peer
                if (not kind & TO_BROWSER_BIT) != (not source_peer):
                    source.close(closecodes.PROTOCOL_ERROR, "frame kind travels the other way")
                elif self._envelope_hooks:
                    self._checked_route(source, frame)
                elif source_peer:
                    if peer != source_peer or kind == _CMD_EXIT:
                        self._to_browsers(source, kind, peer, stream, frame)
                    else:
                        # _to_browsers, inlined for what most bridge frames are.
                        ides = self._ides.get(source.session, _NO_IDES)
                        for ide in ides:
                            ide.link.send(frame)
                        sent = len(ides)
                        self.frames_to_browser += sent
                        self.bytes_to_browser += sent * len(frame)
                else:
                    # _to_bridge, inlined for what most tab frames are.
                    bridge = self._bridges.get(source.session, _NO_BRIDGES).get(peer)
                    if bridge is None or kind in (_CMD_START, _KEY_OFFER):
                        self._to_bridge(source, kind, peer, stream, frame)
                    else:
                        bridge.link.send(frame)
                        self.frames_to_bridge += 1
                        self.bytes_to_bridge += len(frame)
                return
            if frame == _PING:
                # The heartbeat every bridge and tab sends every 15 s: what an
                # idle relay does most.  Answered as _control does, undecoded.
                source.link.send(_PONG)
                return
        self._checked_route(source, frame)

    def _checked_route(self, source: Endpoint, frame: bytes) -> None:
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
        """
        An end-to-end frame from a tab, decoded (the checked path).  A subclass
        that overrides this (or L{_from_bridge}) gets every frame through it.
        """
        self._to_bridge(source, envelope.kind, envelope.peer, envelope.stream, frame)

    def _from_bridge(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
        """An end-to-end frame from a bridge, decoded (see L{_from_ide})."""
        self._to_browsers(source, envelope.kind, envelope.peer, envelope.stream, frame)

    def _to_bridge(self, source: Endpoint, kind: int, peer: int, stream: int, frame: bytes) -> None:
        bridge = self._bridges.get(source.session, _NO_BRIDGES).get(peer)
        if bridge is None:
            source.send(
                control(
                    Kind.ERROR,
                    {"error": "bridge-offline", "message": "that bridge is not connected"},
                    stream=stream,
                    peer=peer,
                )
            )
            return
        if kind == _CMD_START and bridge.counted:
            self.telemetry.command_started()
        elif kind == _KEY_OFFER:
            self._offered(source, peer, frame)
        bridge.link.send(frame)
        self.frames_to_bridge += 1
        self.bytes_to_bridge += len(frame)

    def _offered(self, source: Endpoint, peer: int, frame: bytes) -> None:
        """Note the channel a tab's KEY_OFFER names (public, as the offer is)."""
        try:
            channel = json.loads(frame[HEADER_SIZE:]).get("channel")
        except (ValueError, AttributeError, RecursionError):
            return  # the bridge refuses it
        if not isinstance(channel, int) or isinstance(channel, bool) or not 0 < channel < 2**32:
            return
        channels = source.offered.setdefault(peer, [])
        if channel not in channels:
            channels.append(channel)
            del channels[:-MAX_OFFERED]

    def _gone(self, ide: Endpoint) -> None:
        """A tab's connection is gone: its bridges forget its channels (GONE)."""
        bridges = self._bridges.get(ide.session, _NO_BRIDGES)
        for peer, channels in ide.offered.items():
            bridge = bridges.get(peer)
            if bridge is not None:
                bridge.link.send(control(Kind.GONE, {"channels": channels}, peer=peer).encode())
        ide.offered = {}

    def _to_browsers(
        self, source: Endpoint, kind: int, peer: int, stream: int, frame: bytes
    ) -> None:
        if peer != source.peer:
            source.close(closecodes.PROTOCOL_ERROR, "frame names another bridge")
            return
        # One CMD_EXIT goes out once per browser channel; count the command once.
        if kind == _CMD_EXIT and source.counted and source.last_exit != stream:
            source.last_exit = stream
            self.telemetry.command_completed()
        ides = self._ides.get(source.session, _NO_IDES)
        for ide in ides:
            ide.link.send(frame)
        self.frames_to_browser += len(ides)
        self.bytes_to_browser += len(ides) * len(frame)

    def _control(self, source: Endpoint, envelope: Envelope) -> None:
        if envelope.kind == Kind.PING:
            source.link.send(_PONG)
        elif envelope.kind == Kind.PONG:
            pass
        elif envelope.kind == Kind.CRASH and source.is_bridge:
            if source.counted:
                self._crash(source, envelope)
        else:
            source.close(closecodes.PROTOCOL_ERROR, "control frame not allowed here")

    def _crash(self, source: Endpoint, envelope: Envelope) -> None:
        if len(envelope.payload) > MAX_REPORT_BYTES:
            self.telemetry.crash_report_refused()
            self.log.info("refused an oversized crash report from a bridge")
            return
        try:
            report: Any = envelope.json()
        except EnvelopeError:
            report = None
        self.telemetry.crash_report(report, source.session, source.peer)

    def _send_presence(self, session: str, to: list[Endpoint] | None = None) -> None:
        def send(bridges: list[Presence]) -> None:
            body = {"bridges": [attrs.asdict(p) for p in bridges]}
            for ide in to if to is not None else self._ides.get(session, ()):
                ide.send(control(Kind.PRESENCE, body))

        self.store.presence(session).addCallbacks(send, self._presence_failed)

    def _presence_failed(self, failure: Failure) -> None:
        """
        A shared store that does not answer: presence (which the page also asks
        for) is behind until the next change; forwarding goes on.
        """
        failure.trap(StoreUnavailable)
        self.log.warn("presence not updated: the relay's store is unavailable")
