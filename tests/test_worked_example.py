"""
The worked example of docs/protocol.md (section 10), generated from a real run: a real
relay and bridge on loopback, an IDE client that does what the page does (RESUME and
PTY_LIST first on its channel), a one-shot command and a terminal.  The frames are
rendered in the document's format and must be the block there, so the example cannot
drift from the code again; C{CODER1_REGENERATE_DOCS=1} rewrites it.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_bridge.replay import SEQUENCED
from coder1_wire.e2e import Initiator
from coder1_wire.envelope import Envelope, Kind, control, is_end_to_end

from .docblocks import check_block
from .loopback import (
    Browser,
    IDEConnection,
    pair_bridge,
    settle,
    start_bridge,
    start_relay,
    stop_all,
)

CHANNEL = 0x5A17C3E9
COMMAND = 7
TERMINAL = 0x9C41E2A7
#: What varies from run to run, and what the document shows in its place.
PID = 48213
DURATION = 0.0099
SINCE = 1767225640.2
_KEY_FIELDS = re.compile(r'"(eph|nonce|sig|bridge_key)":"[A-Za-z0-9_-]+"')
_SHOWN = {"eph": "<65 bytes>", "nonce": "<16 bytes>", "sig": "<64 bytes>", "bridge_key": "<key>"}
_TEXT = frozenset({Kind.CMD_STDOUT, Kind.PTY_OUTPUT, Kind.PTY_INPUT})


@attrs.define
class _Recording(IDEConnection):
    """An IDE connection that records every frame both ways, with the counter `n` of each
    sealed one, in the order they went and came."""

    log: list[tuple[str, Envelope, int | None]] = attrs.field(factory=list)
    up: int = 0
    down: int = 0

    def received(self, envelope: Envelope) -> None:
        # Before anyone waiting for it acts on it (and sends the next frames).
        sealed = is_end_to_end(envelope.kind) and envelope.kind not in (
            Kind.KEY_ANSWER,
            Kind.KEY_ERROR,
        )
        self.log.append(("down", envelope, self.down if sealed else None))
        self.down += sealed
        super().received(envelope)

    def send(self, envelope: Envelope) -> None:
        sealed = envelope.peer in self.channels and is_end_to_end(envelope.kind)
        self.log.append(("up", envelope, self.up if sealed else None))
        self.up += sealed
        super().send(envelope)


def _shown(envelope: Envelope) -> bytes:
    """The payload as the document shows it: run-specific values replaced."""
    payload = envelope.payload
    if envelope.kind == Kind.PTY_OPENED:
        payload = json.dumps({**json.loads(payload), "pid": PID}, separators=(",", ":")).encode()
    elif envelope.kind == Kind.CMD_EXIT:
        body = {**json.loads(payload), "duration": DURATION}
        payload = json.dumps(body, separators=(",", ":")).encode()
    elif envelope.kind == Kind.PRESENCE:
        body = json.loads(payload)
        for bridge in body["bridges"]:
            bridge["since"] = SINCE
        payload = json.dumps(body, separators=(",", ":")).encode()
    return payload


def render(log: list[tuple[str, Envelope, int | None]]) -> str:
    """
    The transcript in the document's format.  A sequenced frame's `seq` is its byte
    position: checked here against the real run, then recomputed for the payloads as
    shown (a pid of another length moves what follows it).
    """
    real: dict[tuple[int, int], int] = {}
    shown: dict[tuple[int, int], int] = {}
    lines = []
    for direction, envelope, n in log:
        payload = _shown(envelope)
        seq = envelope.seq
        if direction == "down" and envelope.kind in SEQUENCED:
            stream = (SEQUENCED[envelope.kind] == "pty", envelope.stream)
            assert envelope.seq == real.get(stream, 0), (envelope, real)
            real[stream] = real.get(stream, 0) + len(envelope.payload)
            seq = shown.get(stream, 0)
            shown[stream] = seq + len(payload)
        header = f"01 {envelope.kind:02x} 0000 {envelope.peer:08x} {envelope.stream:08x} {seq:016x}"
        if envelope.kind in _TEXT:
            text = json.dumps(payload.decode())
        else:
            text = _KEY_FIELDS.sub(lambda m: f'"{m[1]}":"{_SHOWN[m[1]]}"', payload.decode())
        counter = f"n={n} {direction}" if n is not None else direction
        lines.append(f"{Kind(envelope.kind).name:<12}{header}  {counter:<9} {text}".rstrip())
    return "\n".join(lines) + "\n"


class WorkedExampleTests(TestCase):
    timeout = 60

    async def test_worked_example(self) -> None:
        """
        docs/protocol.md section 10's transcript is what a real relay and bridge send and
        take: the channel's first sealed frames are RESUME then PTY_LIST (n = 0, 1), each
        sequenced frame's `seq` is its byte position (CMD_EXIT at 3 after `hi\\n`, the
        terminal's output after its PTY_OPENED's length), and every INPUT_ACK is where
        the bridge sends it.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()))
        browser = Browser(relay)
        await browser.open_page()
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO(), "laptop")
        bridge = await start_bridge(config, telemetry=False, label="laptop")
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge, relay)))
        ide: Any = await browser.connect_ide(
            handshake=False, connection=_Recording(browser.identity)
        )
        initiator = Initiator(browser.identity, ide.pins[1], 1, CHANNEL)
        ide.send(initiator.offer())
        ide.channels[1] = initiator.accept(await ide.wait_for(lambda e: e.kind == Kind.KEY_ANSWER))

        def sent(kind: Kind, stream: int = 0, seq: int = 0, payload: Any = b"") -> None:
            if isinstance(payload, dict):
                ide.send(control(kind, payload, stream=stream, seq=seq, peer=1))
            else:
                ide.send(Envelope(kind, stream, seq, 1, payload))

        def arrived(kind: Kind, stream: int = 0) -> Deferred[Envelope]:
            return ide.wait_for(lambda e: e.kind == kind and e.stream == stream)

        sent(Kind.RESUME, payload={"client": "worked-example", "streams": []})
        sent(Kind.PTY_LIST)
        await arrived(Kind.PTY_LISTING)
        sent(Kind.CMD_START, COMMAND, payload={"argv": ["echo", "hi"]})
        await arrived(Kind.CMD_EXIT, COMMAND)
        body = {"cols": 80, "rows": 24, "argv": ["sh"], "env": {"PS1": "$ "}}
        sent(Kind.PTY_OPEN, TERMINAL, payload=body)
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OUTPUT and e.payload == b"$ ")
        # The shell exits 0.2 s after the line: the bridge's INPUT_ACK (50 ms) comes first.
        sent(Kind.PTY_INPUT, TERMINAL, 1, b"sleep 0.2; exit\r")
        await arrived(Kind.PTY_EXIT, TERMINAL)
        await ide.wait_for(lambda e: e.kind == Kind.INPUT_ACK and e.json()["input"][0]["next"] == 2)
        rendered = render(ide.log)
        self.assertEqual(check_block("protocol.md", "worked-example", rendered), rendered)
        await ide.close()
