"""
End-to-end encryption through a real relay: the relay only ever handles
ciphertext, and a relay that tampers with frames is caught (docs/e2e.md).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig
from coder1_relay.routing import Endpoint, Hub
from coder1_relay.service import RelayService
from coder1_wire.e2e import E2EError, Identity
from coder1_wire.envelope import Envelope, Kind, control

from .loopback import Browser, reactor, start_bridge, stop_all
from .test_end_to_end import LoopbackTestCase


def record_frames(relay: RelayService) -> list[bytes]:
    """
    Every message the relay receives or sends from now on, on its open
    connections: what their endpoints hand the hub, and what it sends on them.
    """
    frames: list[bytes] = []
    for protocol in relay.context.connections.live:
        endpoint = protocol.endpoint  # type: ignore[attr-defined]
        if endpoint is not None:
            endpoint.hub = _RecordingHub(endpoint.hub, frames)
        send = protocol.send  # type: ignore[attr-defined]

        def sent(payload: bytes, send: Callable[[bytes], None] = send) -> None:
            frames.append(payload)
            send(payload)

        protocol.send = sent  # type: ignore[attr-defined]
    return frames


@attrs.frozen
class _RecordingHub:
    """A hub that notes each message an endpoint hands it (L{Hub.route}) first."""

    hub: Hub
    frames: list[bytes]

    def route(self, source: Endpoint, frame: bytes) -> None:
        self.frames.append(frame)
        self.hub.route(source, frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hub, name)


def encodings(canary: str) -> list[bytes]:
    """The canary as bytes in every encoding a careless implementation might use."""
    raw = canary.encode()
    return [
        raw,
        canary.encode("utf-16-le"),
        canary.encode("utf-16-be"),
        base64.b64encode(raw)[:-2],
        base64.urlsafe_b64encode(raw)[:-2],
        raw.hex().encode(),
        raw.hex().upper().encode(),
    ]


class CaptureTests(LoopbackTestCase):
    """The relay sees no command, output or keystroke."""

    async def test_no_canary_crosses_the_relay(self) -> None:
        """
        A command printing a canary and a canary typed into a terminal: the
        client sees both, and no frame through the relay holds either.
        """
        await self.start()
        frames = record_frames(self.relay)
        command_canary = "CANARY-CMD-" + secrets.token_hex(6)
        typed_canary = "CANARY-PTY-" + secrets.token_hex(6)
        result = await self.ide.run(1, {"shell": f"echo {command_canary}"})
        self.assertEqual(result.stdout, f"{command_canary}\n".encode())

        self.ide.send(
            control(Kind.PTY_OPEN, {"cols": 80, "rows": 24, "argv": ["sh"]}, stream=2, peer=1)
        )
        await self.ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.PTY_OPENED)
        for seq, key in enumerate(f"echo {typed_canary}\nexit\n", start=1):
            self.ide.send(Envelope(Kind.PTY_INPUT, stream=2, seq=seq, peer=1, payload=key.encode()))
        await self.ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.PTY_EXIT)
        output = b"".join(e.payload for e in self.ide.frames if e.kind == Kind.PTY_OUTPUT)
        self.assertIn(typed_canary.encode(), output)

        self.assertGreater(len(frames), 10)
        for canary in (command_canary, typed_canary, "echo"):
            for form in encodings(canary):
                for frame in frames:
                    self.assertNotIn(form, frame)


@attrs.define
class TamperingHub(Hub):
    """A relay that does something to the frames it forwards to one side."""

    tamper: Callable[[TamperingHub, Endpoint, bytes], list[bytes]] = lambda _h, _t, f: [f]
    towards_bridge: bool = True
    held: list[bytes] = attrs.field(factory=list)

    def _from_ide(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
        if not self.towards_bridge or envelope.kind == Kind.KEY_OFFER:
            return super()._from_ide(source, envelope, frame)
        for changed in self.tamper(self, source, frame):
            super()._from_ide(source, envelope, changed)

    def _from_bridge(self, source: Endpoint, envelope: Envelope, frame: bytes) -> None:
        if self.towards_bridge or envelope.kind == Kind.KEY_ANSWER:
            return super()._from_bridge(source, envelope, frame)
        for changed in self.tamper(self, source, frame):
            super()._from_bridge(source, envelope, changed)


def flip(hub: TamperingHub, source: Endpoint, frame: bytes) -> list[bytes]:
    return [frame[:-1] + bytes([frame[-1] ^ 0x01])]


def replay(hub: TamperingHub, source: Endpoint, frame: bytes) -> list[bytes]:
    hub.held.append(frame)
    return [frame, hub.held[0]] if len(hub.held) > 1 else [frame]


def drop_first(hub: TamperingHub, source: Endpoint, frame: bytes) -> list[bytes]:
    hub.held.append(frame)
    return [] if len(hub.held) == 1 else [frame]


def swap_first_two(hub: TamperingHub, source: Endpoint, frame: bytes) -> list[bytes]:
    hub.held.append(frame)
    if len(hub.held) == 1:
        return []
    return [frame, hub.held[0]] if len(hub.held) == 2 else [frame]


class TamperTests(LoopbackTestCase):
    """A relay that flips, replays, drops or reorders frames is caught; nothing runs."""

    async def start_tampering(self, tamper: Any, *, towards_bridge: bool = True) -> None:
        await self.start()
        hub = self.relay.context.hub
        tampering = TamperingHub(
            hub.store,
            hub.telemetry,
            hub.clock,
            hub.settings,
            tamper=tamper,
            towards_bridge=towards_bridge,
        )
        tampering._ides, tampering._bridges = hub._ides, hub._bridges
        for endpoint in tampering.endpoints():
            endpoint.hub = tampering
        self.relay.context.hub = tampering

    async def assert_nothing_runs(self, expected: str) -> None:
        markers = [FilePath(self.mktemp()) for _ in range(2)]
        for stream, marker in enumerate(markers, start=1):
            self.ide.send(
                control(Kind.CMD_START, {"argv": ["touch", marker.path]}, stream=stream, peer=1)
            )
        error = await self.ide.wait_for(lambda e: e.kind == Kind.KEY_ERROR)
        self.assertEqual(error.json()["error"], expected)
        await deferLater(reactor, 0.5)
        executed = [m.exists() for m in markers]
        # What the bridge refused never ran; with "replayed" the original did run, once.
        self.assertEqual(executed.count(True), 1 if expected == "replayed" else 0, executed)

    async def test_bit_flip(self) -> None:
        """A flipped bit is detected by the bridge as tampering; the command does not run."""
        await self.start_tampering(flip)
        await self.assert_nothing_runs("tampered")

    async def test_replay(self) -> None:
        """A replayed command is refused; only the original runs."""
        await self.start_tampering(replay)
        marker = FilePath(self.mktemp())
        self.ide.send(control(Kind.CMD_START, {"argv": ["touch", marker.path]}, stream=1, peer=1))
        await self.ide.wait_for(lambda e: e.kind == Kind.CMD_EXIT)
        marker.remove()
        self.ide.send(control(Kind.CMD_START, {"argv": ["true"]}, stream=2, peer=1))
        error = await self.ide.wait_for(lambda e: e.kind == Kind.KEY_ERROR)
        self.assertEqual(error.json()["error"], "replayed")
        await deferLater(reactor, 0.5)
        self.assertFalse(marker.exists(), "the replayed command ran again")

    async def test_drop(self) -> None:
        """A dropped frame makes the next one refused as a gap; neither command runs."""
        await self.start_tampering(drop_first)
        await self.assert_nothing_runs("dropped")

    async def test_reorder(self) -> None:
        """Two frames swapped: the first to arrive is refused; neither command runs."""
        await self.start_tampering(swap_first_two)
        await self.assert_nothing_runs("dropped")

    async def test_tampered_output(self) -> None:
        """Output changed on its way to the browser is refused there, never shown."""
        await self.start_tampering(flip, towards_bridge=False)
        self.ide.send(control(Kind.CMD_START, {"argv": ["echo", "secret"]}, stream=1, peer=1))
        await deferLater(reactor, 1.0)
        self.assertIn("tampered", self.ide.refused)
        self.assertEqual([e for e in self.ide.frames if e.kind == Kind.CMD_STDOUT], [])


class PinningTests(LoopbackTestCase):
    """Keys pinned at pairing: another bridge key, or another browser key, is refused."""

    async def test_other_bridge_key_refused(self) -> None:
        """A bridge presenting another identity (a stolen token) fails the browser's check."""
        await self.start()
        impostor = BridgeConfig(
            self.config.relay,
            self.config.token,
            self.config.peer,
            self.config.browser_key,
            Identity.generate(),
        )
        bridge = await start_bridge(impostor)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        error = await self.assertFailure(Deferred.fromCoroutine(self.ide.handshake(1)), E2EError)
        self.assertIn("another bridge", str(error))

    async def test_other_browser_key_refused(self) -> None:
        """A tab with the session cookie but another identity key is refused by the bridge."""
        await self.start()
        thief = Browser(self.relay, cookies=self.browser.cookies, identity=Identity.generate())
        ide = await thief.connect_ide(handshake=False)
        self.addCleanup(ide.close)
        ide.pins[1] = self.ide.pins[1]
        await self.assertFailure(Deferred.fromCoroutine(ide.handshake(1)), E2EError)
        refusal = next(e for e in ide.frames if e.kind == Kind.KEY_ERROR).json()
        self.assertEqual(refusal["error"], "bad-offer")
        self.assertTrue(refusal["message"])
