"""
The bridge's side of the relay connection.

L{BridgeSession} holds the logic (dispatch, heartbeat, crash reports) with
no network in it; L{BridgeClientProtocol} is the thin Autobahn adapter.  The
session outlives connections, so commands keep running across a reconnect.

Flow control: each connection registers a L{SendBuffer} on its transport (TLS
over TCP), which pauses it once more than Twisted's high-water mark (64 KiB)
waits to go to the relay and resumes it once all of that has gone into the
kernel.  Meanwhile the session leaves every process's output unread
(C{ProcessManager.pause_output}), so the processes block on write when their
pipe or terminal is full, and nothing is dropped.  The relay stops reading a
bridge whose browser tabs do not read (C{coder1_relay.routing}), so a slow tab
pauses the processes, all the way back.  What the bridge holds past the mark
is bounded: what was read in the same turn of the reactor, at most
C{writes.MAX_READ} (64 KiB) per process, sealed once per channel.  A connection
that is lost resumes the output (sent nowhere, as before: the session has no
channel then).

Latency: what the bridge sends goes to the socket within the call when nothing
is queued before it (L{writes.send_at_once}), not on the reactor's next turn.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_bridge.commands import CommandRunner
from coder1_bridge.crash_log import CrashLog
from coder1_bridge.processes import ProcessManager
from coder1_bridge.replay import (
    PTY,
    STARTS,
    BadResume,
    InputLedger,
    Key,
    Outbox,
    ReplaySettings,
    input_key,
    key_of,
    parse_client,
    parse_positions,
    positions_body,
)
from coder1_bridge.terminals import TerminalManager
from coder1_bridge.writes import send_at_once
from coder1_wire import closecodes
from coder1_wire.crash import build_crash_report
from coder1_wire.e2e import (
    E2EError,
    Identity,
    IntegrityError,
    Responder,
    SecureChannel,
    channel_of,
)
from coder1_wire.envelope import (
    Envelope,
    EnvelopeError,
    Kind,
    control,
    decode,
    is_end_to_end,
    is_to_browser,
)
from coder1_wire.frames import WholeMessages, binary_frame_bounds, masked_binary_message
from coder1_wire.heartbeat import MAX_INTERVAL, MIN_INTERVAL, Heartbeat, interval_from

#: Browser tabs one bridge keeps channels with at once.
MAX_CHANNELS = 16
#: Seconds the bridge waits to acknowledge input, so that one INPUT_ACK covers a burst.
INPUT_ACK_DELAY = 0.05
#: Seconds a channel may hold a stream without acknowledging anything before the
#: bridge takes it for gone and ends it (its tab, if alive, makes a new one and resumes).
SILENT_CHANNEL = 60.0
#: How Autobahn reports a handshake the relay refused for the token (401), in onClose's reason.
_REFUSED = re.compile(r'upgrade failed \[401\]: ([^"]*)')
_COMMAND_KINDS = frozenset({Kind.CMD_START, Kind.CMD_STDIN, Kind.CMD_CANCEL})
_TERMINAL_KINDS = frozenset(
    {Kind.PTY_OPEN, Kind.PTY_INPUT, Kind.PTY_RESIZE, Kind.PTY_CLOSE, Kind.PTY_LIST}
)


class Link(Protocol):
    """The current WebSocket connection, as the session needs it."""

    def send(self, frame: bytes) -> None:
        """Send one binary message."""

    def abort(self) -> None:
        """Drop the connection at once (the relay stopped answering)."""


@attrs.define
class BridgeSession:
    """
    Everything the bridge does with frames, whichever connection carries them.

    End-to-end frames travel only sealed (docs/e2e.md): each browser tab opens
    a channel with a signed key offer, and what the bridge sends goes out
    sealed on every channel; with no channel, nothing goes out at all.  What
    processes print goes through the L{Outbox}: kept, numbered by byte
    position, and sent to the channels that follow its stream, within their
    windows (docs/protocol.md, section 5.7).
    """

    clock: IReactorTime
    runner: CommandRunner
    terminals: TerminalManager
    version: str
    telemetry: bool
    on_refused: Callable[[str], None]
    identity: Identity
    browser_key: bytes
    peer: int
    heartbeat_timeout: float = 45.0
    link: Link | None = None
    heartbeat: Heartbeat | None = None
    channels: dict[int, SecureChannel] = attrs.field(factory=dict)
    #: The connections with more queued for the relay than they should (the
    #: current one at most, but a lost one may say so late); output waits meanwhile.
    full: list[Link] = attrs.field(factory=list)
    #: Set once the bridge is stopping: output is read to its end from then on.
    stopping: bool = False
    replay: ReplaySettings = attrs.field(factory=ReplaySettings)
    #: Where a copy of each crash report sent is kept, if anywhere.
    crash_log: CrashLog | None = None
    outbox: Outbox = attrs.field(init=False)
    ledger: InputLedger = attrs.field(factory=InputLedger)
    #: Per channel, the streams whose input it is owed an INPUT_ACK for.
    _input_acks: dict[int, set[Key]] = attrs.field(factory=dict, init=False)
    _input_ack_timer: IDelayedCall | None = attrs.field(default=None, init=False)
    #: Stops every process once no tab has had a channel for the grace period.
    _grace_timer: IDelayedCall | None = attrs.field(default=None, init=False)
    #: Looks for silent channels while a replay log is held.
    _silence_timer: IDelayedCall | None = attrs.field(default=None, init=False)
    log: Logger = attrs.field(factory=Logger, init=False)

    def __attrs_post_init__(self) -> None:
        self.outbox = Outbox(
            self.clock,
            self._deliver,
            self._hold,
            lambda key: self._manager(key).release(key[1]),
            capacity=self.replay.capacity,
            window=self.replay.window,
            grace=self.replay.grace,
        )

    def _manager(self, key: Key) -> ProcessManager[Any, Any, Any]:
        return self.terminals if key[0] == PTY else self.runner

    def _hold(self, key: Key) -> None:
        """A replay log is full: pause its process, and look for silent channels in a while."""
        self._manager(key).hold(key[1])
        if self._silence_timer is None:
            self._silence_timer = self.clock.callLater(SILENT_CHANNEL, self._end_silent)

    def _end_silent(self) -> None:
        self._silence_timer = None
        for number in self.outbox.silent(SILENT_CHANNEL):
            self.log.info("ended a channel silent for {age} s", age=SILENT_CHANNEL)
            self._drop_channel(number)
            self._key_error(number, "no-channel", "silent too long; offer a key again")
        if any(log.held for log in self.outbox.logs.values()):
            self._silence_timer = self.clock.callLater(SILENT_CHANNEL, self._end_silent)

    def attach(self, link: Link) -> None:
        """A connection to the relay is open."""
        self.link = link
        self._watch(15.0)

    def _watch(self, interval: float) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        link = self.link
        assert link is not None
        self.heartbeat = Heartbeat(
            self.clock,
            interval,
            max(self.heartbeat_timeout, 3 * interval),
            ping=lambda: self.send(Envelope(Kind.PING)),
            on_timeout=link.abort,
        )
        self.heartbeat.start()

    def pause_output(self, link: Link) -> None:
        """C{link} has too much queued for the relay: leave the processes' output unread."""
        if self.stopping:
            return
        if any(f is link for f in self.full):
            return
        if not self.full:
            self.runner.pause_output()
            self.terminals.pause_output()
            self.outbox.blocked = True
        self.full.append(link)

    def resume_output(self, link: Link) -> None:
        """C{link} has sent what it had queued (or is gone): read output again."""
        if not any(f is link for f in self.full):
            return
        self.full = [f for f in self.full if f is not link]
        if not self.full:
            self.outbox.unblock()
            self.runner.resume_output()
            self.terminals.resume_output()

    def stop_pausing(self) -> None:
        """The bridge is stopping: read the output to its end, so that processes can end."""
        self.stopping = True
        self.outbox.let_go()
        self._cancel_grace()
        for link in list(self.full):
            self.resume_output(link)

    def close(self) -> None:
        """The bridge has stopped: no timer of the session's is left."""
        self.outbox.close()
        self._cancel_grace()
        if self._silence_timer is not None and self._silence_timer.active():
            self._silence_timer.cancel()
        self._silence_timer = None
        if self._input_ack_timer is not None and self._input_ack_timer.active():
            self._input_ack_timer.cancel()
        self._input_ack_timer = None

    def detach(self, link: Link) -> None:
        """That connection closed; its channels went with it."""
        self.resume_output(link)
        if self.link is link:
            self.link = None
            self.channels.clear()
            self.outbox.drop_all()
            self._input_acks.clear()
            self._check_grace()
            if self.heartbeat is not None:
                self.heartbeat.stop()
                self.heartbeat = None

    def send(self, envelope: Envelope) -> None:
        """
        Send a frame if connected: end-to-end frames sealed once per channel,
        control frames as they are.  What processes print goes to their replay
        logs, and from there to the channels that follow them; any other frame
        sent while disconnected is dropped.
        """
        if key_of(envelope) is not None:
            self.outbox.publish(envelope)
            return
        if self.link is None:
            return
        if not is_end_to_end(envelope.kind):
            self.link.send(envelope.encode())
            return
        for channel in self.channels.values():
            self.link.send(channel.seal_frame(envelope))

    def _deliver(self, number: int, envelope: Envelope) -> None:
        """Send C{envelope} on channel C{number} only, sealed, if it is there."""
        channel = self.channels.get(number)
        if self.link is not None and channel is not None:
            self.link.send(channel.seal_frame(envelope))

    def _drop_channel(self, number: int) -> None:
        self.channels.pop(number, None)
        self.outbox.drop(number)
        self._input_acks.pop(number, None)
        self._check_grace()

    def _check_grace(self) -> None:
        """With no channel left, stop every process once the grace period has gone by."""
        if self.channels or self.stopping:
            self._cancel_grace()
            return
        running = self.runner.running + self.terminals.running
        if self._grace_timer is None and running and self.replay.grace > 0:
            self._grace_timer = self.clock.callLater(self.replay.grace, self._grace_over)

    def _cancel_grace(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        self._grace_timer = None

    def _grace_over(self) -> None:
        self._grace_timer = None
        self.log.info(
            "no browser tab for {grace} s: stopping {running} processes",
            grace=self.replay.grace,
            running=self.runner.running + self.terminals.running,
        )
        # Read what they print to its end, kept only as far as each log's size goes.
        self.outbox.letting_go = True

        def done(result: object) -> None:
            self.outbox.letting_go = self.stopping

        gatherResults([self.runner.stop_all(), self.terminals.stop_all()]).addBoth(done)

    def _key_error(self, channel: int, error: str, message: str) -> None:
        if self.link is not None:
            body = {"channel": channel, "error": error, "message": message}
            self.link.send(control(Kind.KEY_ERROR, body, peer=self.peer).encode())

    def receive(self, frame: bytes) -> None:
        """A binary message from the relay."""
        if self.heartbeat is not None:
            self.heartbeat.feed()
        try:
            envelope = decode(frame)
        except EnvelopeError:
            self.log.warn("ignored a malformed frame from the relay")
            return
        try:
            self._dispatch(envelope)
        except Exception as e:
            self.log.failure("handling a frame failed")
            self.report_crash(e)

    def _dispatch(self, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind == Kind.KEY_OFFER:
            self._offered(envelope)
        elif is_end_to_end(kind) and not is_to_browser(kind):
            self._sealed(envelope)
        else:
            self._control(envelope)

    def _offered(self, offer: Envelope) -> None:
        try:
            answer, channel = Responder.answer(self.identity, self.browser_key, self.peer, offer)
        except E2EError as e:
            self.log.warn("refused a key offer: {reason}", reason=str(e))
            # Never name a live channel: anyone with the session cookie could then
            # make its tab start over with a forged offer.
            named = _offered_channel(offer)
            self._key_error(0 if named in self.channels else named, "bad-offer", str(e))
            return
        # A replayed offer replaces its channel; past the cap the oldest goes, so
        # a relay replaying offers cannot multiply what the bridge sends.
        self._drop_channel(channel.channel)
        if len(self.channels) >= MAX_CHANNELS:
            self._drop_channel(next(iter(self.channels)))
        self.channels[channel.channel] = channel
        self._cancel_grace()
        if self.link is not None:
            self.link.send(answer.encode())

    def _sealed(self, envelope: Envelope) -> None:
        number = channel_of(envelope)
        channel = self.channels.get(number) if number is not None else None
        if channel is None:
            self._key_error(number or 0, "no-channel", "no such channel; offer a key first")
            return
        try:
            plain = channel.open(envelope)
        except IntegrityError as e:
            # Nothing of a refused frame is acted on.  A forged or replayed frame
            # leaves the channel as it was (so junk from a cookie holder cannot
            # kill a tab's channel); a gap cannot heal, so the tab starts over.
            if e.verdict == "dropped":
                self._drop_channel(channel.channel)
            self.log.warn("refused a {verdict} frame", verdict=e.verdict)
            self._key_error(channel.channel, e.verdict, str(e))
            return
        self._plain(channel.channel, plain)

    def _plain(self, number: int, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind == Kind.RESUME:
            self._resume(number, envelope)
            return
        if kind == Kind.ACK:
            self._ack(number, envelope)
            return
        if self.outbox.follower(number) is None:
            self.outbox.legacy(number)  # a page older than resume
        if kind in _COMMAND_KINDS or kind in _TERMINAL_KINDS:
            self._input(number, envelope)
        else:
            self.send(
                control(
                    Kind.UNSUPPORTED,
                    {"kind": kind, "error": "unsupported", "message": "this bridge is too old"},
                    stream=envelope.stream,
                    peer=envelope.peer,
                )
            )

    def _input(self, number: int, envelope: Envelope) -> None:
        """A frame for a process: acted on once, however often a page resends it."""
        key = input_key(envelope)
        follower = self.outbox.follower(number)
        client = follower.client if follower is not None else None
        if (
            key is not None
            and client is not None
            and not self.ledger.accept(client, key, envelope.seq)
        ):
            self._ack_input(number, key)
            return
        manager = self._manager(key) if key is not None else self.terminals  # PTY_LIST
        starting = key is not None and envelope.kind in STARTS and not manager.is_running(key[1])
        if starting:
            assert key is not None
            self.outbox.open(key, envelope.peer)
        manager.handle(envelope)
        if envelope.kind == Kind.PTY_CLOSE and key is not None:
            self.outbox.closed(number, key)
        if key is None or client is None:
            return
        if starting and manager.is_running(key[1]):
            self.outbox.subscribe(number, key)
        self._ack_input(number, key, now=envelope.kind in STARTS)

    def _ack_input(self, number: int, key: Key, *, now: bool = False) -> None:
        self._input_acks.setdefault(number, set()).add(key)
        if now:
            self._send_input_acks()
        elif self._input_ack_timer is None:
            self._input_ack_timer = self.clock.callLater(INPUT_ACK_DELAY, self._send_input_acks)

    def _send_input_acks(self) -> None:
        if self._input_ack_timer is not None and self._input_ack_timer.active():
            self._input_ack_timer.cancel()
        self._input_ack_timer = None
        owed, self._input_acks = self._input_acks, {}
        for number, keys in owed.items():
            follower = self.outbox.follower(number)
            if follower is None or follower.client is None:
                continue
            client = follower.client
            positions = [(k, self.ledger.next(client, k) or 0) for k in sorted(keys)]
            body = {"input": positions_body(positions)}
            self._deliver(number, control(Kind.INPUT_ACK, body, peer=self.peer))

    def _resume(self, number: int, envelope: Envelope) -> None:
        try:
            body = envelope.json()
            client = parse_client(body)
            streams = parse_positions(body, "streams")
        except (BadResume, EnvelopeError) as e:
            self.log.warn("ignored a malformed RESUME: {reason}", reason=str(e))
            return
        # A page load keeps one channel per bridge: its earlier ones are gone.
        for earlier in self.outbox.of_client(client):
            if earlier != number:
                self._drop_channel(earlier)
        unknown = self.outbox.resume(number, client, streams)
        known = [k for k, _ in streams if k not in unknown]
        answer = {
            "window": self.replay.window,
            "input": positions_body((k, self.ledger.next(client, k) or 0) for k in known),
            "unknown": [{"type": k[0], "stream": k[1]} for k in unknown],
        }
        self._deliver(number, control(Kind.RESUMED, answer, peer=self.peer))
        self.outbox.flush(number)

    def _ack(self, number: int, envelope: Envelope) -> None:
        try:
            positions = parse_positions(envelope.json(), "streams")
        except (BadResume, EnvelopeError) as e:
            self.log.warn("ignored a malformed ACK: {reason}", reason=str(e))
            return
        self.outbox.ack(number, positions)

    def _control(self, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind == Kind.PING:
            self.send(Envelope(Kind.PONG))
        elif kind == Kind.WELCOME:
            self._welcome(envelope)
        elif kind == Kind.ERROR:
            self.log.warn("the relay reported an error: {error}", error=_error_code(envelope))
        elif kind == Kind.GONE:
            self._gone(envelope)

    def _welcome(self, envelope: Envelope) -> None:
        """Take the relay's ping interval, within bounds (section 7)."""
        try:
            body = envelope.json()
        except EnvelopeError:
            body = None
        asked = body.get("heartbeat") if isinstance(body, dict) else None
        interval = interval_from(asked)
        if interval is None:
            self.log.warn("ignored a WELCOME without a heartbeat interval")
            return
        if interval != asked:
            self.log.warn(
                "the relay asked for a heartbeat outside {low}-{high} s; using {s} s",
                low=MIN_INTERVAL,
                high=MAX_INTERVAL,
                s=interval,
            )
        self._watch(interval)

    def _gone(self, envelope: Envelope) -> None:
        """
        The relay says a tab's connection is gone: forget the channels it had,
        so that what they follow is no longer held for them.  (A relay that says
        so falsely only makes a live tab make a new channel and resume.)
        """
        try:
            channels = envelope.json().get("channels")
        except (EnvelopeError, AttributeError):
            channels = None
        if not isinstance(channels, list):
            self.log.warn("ignored a malformed GONE")
            return
        for number in channels[:64]:
            if isinstance(number, int) and number in self.channels:
                self._drop_channel(number)

    def report_crash(self, error: BaseException) -> None:
        """
        Send a content-free crash report, unless telemetry is off, and keep a copy
        (L{CrashLog}). None is queued: with no connection, none is made.
        """
        if not self.telemetry or self.link is None:
            return
        frame = control(Kind.CRASH, dict(build_crash_report(error, version=self.version)))
        self.send(frame)
        if self.crash_log is not None:
            self.crash_log.record(frame.payload)


def _offered_channel(offer: Envelope) -> int:
    """The channel a (possibly malformed) offer names, so its tab gets the refusal."""
    try:
        channel = offer.json().get("channel")
    except (EnvelopeError, AttributeError):
        return 0
    return channel if isinstance(channel, int) and 0 < channel < 2**32 else 0


def _error_code(envelope: Envelope) -> str:
    try:
        body: Any = envelope.json()
    except EnvelopeError:
        return "malformed"
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) and code.isascii() and len(code) < 40 else "unknown"


@implementer(IPushProducer)
@attrs.define(eq=False)
class SendBuffer:
    """
    The push producer registered on a connection's transport: told when more
    than the high-water mark waits to go to the relay, and when it has gone.
    """

    session: BridgeSession
    link: Link

    def pauseProducing(self) -> None:
        self.session.pause_output(self.link)

    def resumeProducing(self) -> None:
        self.session.resume_output(self.link)

    def stopProducing(self) -> None:
        self.session.resume_output(self.link)


#: Not C{log} on the protocol: that would replace Autobahn's own logger, whose
#: debug messages (dropped by default) include the handshake's token.
_log = Logger()

#: Autobahn's open state, looked up once: it is compared for every frame and message.
_OPEN = WebSocketClientProtocol.STATE_OPEN


class BridgeClientProtocol(WholeMessages, WebSocketClientProtocol):  # type: ignore[misc]  # autobahn's bases
    """
    Adapts one Autobahn connection to the session.

    The hot path: a whole binary message in one frame (nearly every frame
    either way) is read and written by the bridge itself (C{coder1_wire.frames}),
    with the checks Autobahn makes and without its per-frame layers; every
    other frame goes through Autobahn (L{_choose_paths} says when).
    """

    factory: BridgeClientFactory
    #: Why the connection went, as Twisted said it (a refused TLS handshake, say).
    lost_because: Failure | None = None
    #: The close code the relay sent, if it sent one.
    relay_close_code: int | None = None
    # Autobahn's options, which it sets on each connection.
    maskClientFrames: bool
    applyMask: bool
    _masked_in = False  # the relay's frames

    def send(self, frame: bytes) -> None:
        """
        Send C{frame} as one binary message.  Once open, the bridge makes its
        frame, masked with a fresh random mask as a client's must be (RFC 6455,
        section 5.3), and writes it: the very bytes Autobahn's C{sendMessage}
        would write with that mask, without its layers (argument checks,
        compression and fragmentation, its C masker set up for each frame, and
        a debug line formatted for every write and dropped).  Autobahn sends it
        when one of those applies (L{_choose_paths}), or while it has writes of
        its own queued.
        """
        if self.state != _OPEN:
            return
        if self._frames_out and len(frame) <= self._out_limit and not self.send_queue:
            transport: Any = self.transport
            transport.write(masked_binary_message(frame, os.urandom(4)))
        else:
            self.sendMessage(frame, isBinary=True)

    def _may_write_frames(self) -> bool:
        return self.maskClientFrames and self.applyMask

    def _may_read_frames(self) -> bool:
        return True

    def dataReceived(self, data: bytes) -> None:
        """
        Autobahn's, without the debug line its Twisted adapter formats the
        arguments of for every read, logged or not (as the relay's).
        """
        self._dataReceived(data)

    def _whole_messages(self, data: bytes) -> int:
        """
        Handle the whole binary messages at the front of C{data}, each in one
        unmasked frame, as Autobahn would (the size limits, L{onMessage})
        without its ten call layers per frame, its per-frame copy of what is
        left, and the Deferred it makes for every message; stop at any other
        frame, or once the connection is closing.

        @return: how many bytes of C{data} were handled.
        """
        at, size = 0, len(data)
        while (frame := binary_frame_bounds(data, at, masked=False)) is not None:
            start, end = frame
            if end > size or end - start > self._in_limit:
                break
            at = end
            self.onMessage(data[start:end], True)
            if self.state != _OPEN:
                break
        return at

    def abort(self) -> None:
        _log.warn("no heartbeat from the relay; reconnecting")
        self.dropConnection(abort=True)

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn's own tcpNoDelay is tried before the factory's options are copied, and
        # fails silently under TLS: keystrokes and exits must not wait for delayed ACKs.
        tcp: Any = getattr(self.transport, "transport", self.transport)
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        send_at_once(self.transport)

    def onOpen(self) -> None:
        self._choose_paths()
        # Unregistered by Autobahn as it drops the connection, and by the service
        # as it stops: a TLS transport with a producer waits for it to go to close.
        transport: Any = self.transport  # TLS, which passes pauses on from TCP
        transport.registerProducer(SendBuffer(self.factory.session, self), True)
        self.factory.session.attach(self)
        self.factory.connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.factory.session.receive(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_because = reason
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.relay_close_code = self.remoteCloseCode
        self.factory.session.detach(self)
        refused = _REFUSED.search(reason or "")
        if refused:
            self.factory.session.on_refused(refused.group(1))
        elif code in (closecodes.REVOKED, closecodes.EXPIRED):
            self.factory.session.on_refused(reason or "this bridge's token is no longer valid")
        self.factory.disconnected(self)


class BridgeClientFactory(WebSocketClientFactory):
    """Builds connections for the session, with the bridge's identity headers."""

    protocol = BridgeClientProtocol  # type: ignore[assignment]  # stubs want a TypeVar

    def __init__(
        self,
        url: str,
        session: BridgeSession,
        headers: dict[str, str],
        connected: Callable[[BridgeClientProtocol], None],
        disconnected: Callable[[BridgeClientProtocol], None],
    ) -> None:
        super().__init__(url, headers=headers)
        self.session = session
        self.connected = connected
        self.disconnected = disconnected
        self.setProtocolOptions(
            maxFramePayloadSize=1024 * 1024,
            maxMessagePayloadSize=1024 * 1024,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
        )
