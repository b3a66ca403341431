"""
The page's end-to-end code (C{coder1_relay/static/e2e.js}, run by Node) against the
bridge's (L{coder1_wire.e2e}): identities, the short authentication string, the
handshake, sealed frames both ways, and the verdicts on tampered, replayed and dropped
frames.  C{tests/js/e2e_interop.mjs} answers one JSON line per request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
from collections import deque
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from coder1_wire.e2e import (
    E2EError,
    Identity,
    Initiator,
    IntegrityError,
    Responder,
    SecureChannel,
    b64u,
    channel_of,
    sas,
    unb64u,
    verify_signature,
)
from coder1_wire.envelope import HEADER_SIZE, Envelope, Kind, control, decode

from .loopback import reactor

NODE = shutil.which("node")
SCRIPT = FilePath(__file__).sibling("js").child("e2e_interop.mjs")
PEER = 3

#: (kind, peer, stream, seq, plaintext): frames the page sends, then frames it receives.
UP_FRAMES = [
    (Kind.PTY_LIST, PEER, 0, 0, b""),
    (Kind.PTY_OPEN, PEER, 7, 0, b'{"cols":80,"rows":24}'),
    (Kind.PTY_INPUT, PEER, 7, 1, b"echo hi\r"),
    (Kind.PTY_INPUT, PEER, 7, 2, bytes(range(256))),
    (Kind.CMD_START, PEER, 0xFFFF_FFFF, 0, b'{"argv":["true"]}'),
    (Kind.CMD_STDIN, PEER, 0xFFFF_FFFF, 2**64 - 1, os.urandom(65536)),
    (Kind.PTY_CLOSE, PEER, 7, 3, b""),
]
DOWN_FRAMES = [
    (Kind.PTY_LISTING, PEER, 0, 0, b'{"terminals":[]}'),
    (Kind.PTY_OUTPUT, PEER, 7, 0, b"\x1b[1mhi\x1b[0m\r\n"),
    (Kind.PTY_OUTPUT, PEER, 7, 1, b""),
    (Kind.CMD_STDOUT, PEER, 1, 2**63, os.urandom(65536)),
    (Kind.CMD_EXIT, PEER, 1, 5, b'{"exit_code":0}'),
    (Kind.UNSUPPORTED, PEER, 9, 0, b"\x00" * 17),
]


class NodeFailed(Exception):
    """The Node side answered a request with an error."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(answer.get("error"))
        self.answer = answer


@attrs.define(eq=False)
class NodePage(protocol.ProcessProtocol):
    """The Node process: one request line out, one answer line back, in order."""

    waiting: deque[Deferred[dict[str, Any]]] = attrs.field(factory=deque)
    buffer: bytes = b""
    stderr: bytes = b""
    ended: Deferred[None] = attrs.field(factory=Deferred)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.waiting.popleft().callback(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        while self.waiting:
            self.waiting.popleft().errback(
                AssertionError(f"node exited: {self.stderr.decode(errors='replace')}")
            )
        self.ended.callback(None)

    async def ask(self, op: str, **arguments: Any) -> dict[str, Any]:
        """Send one request; its answer, or L{NodeFailed}."""
        assert self.transport is not None
        answered: Deferred[dict[str, Any]] = Deferred()
        self.waiting.append(answered)
        self.transport.write(json.dumps({"op": op, **arguments}).encode() + b"\n")
        answer = await answered
        if not answer.pop("ok"):
            raise NodeFailed(answer)
        return answer

    async def offer(self, name: str, bridge: Identity, peer: int = PEER) -> Envelope:
        answer = await self.ask("offer", name=name, bridge=b64u(bridge.public_raw), peer=peer)
        return decode(unb64u(answer["frame"]))

    async def accept(self, name: str, answer: Envelope) -> int:
        channel: int = (await self.ask("accept", name=name, frame=b64u(answer.encode())))["channel"]
        return channel

    async def seal(self, name: str, envelope: Envelope) -> Envelope:
        answer = await self.ask(
            "seal",
            name=name,
            kind=envelope.kind,
            peer=envelope.peer,
            stream=envelope.stream,
            seq=str(envelope.seq),
            data=b64u(envelope.payload),
        )
        return decode(unb64u(answer["frame"]))

    async def open(self, name: str, frame: bytes) -> Envelope:
        answer = await self.ask("open", name=name, frame=b64u(frame))
        return Envelope(
            kind=answer["kind"],
            peer=answer["peer"],
            stream=answer["stream"],
            seq=int(answer["seq"]),
            payload=unb64u(answer["data"]),
        )

    async def refuses(self, name: str, frame: bytes) -> dict[str, Any]:
        """Open a frame that must be refused; the error the page would show."""
        try:
            opened = await self.open(name, frame)
        except NodeFailed as e:
            return e.answer
        raise AssertionError(f"the page opened a frame it must refuse: {opened}")


def forged_answer(offer: Envelope, bridge_raw: bytes, signer: Identity) -> Envelope:
    """
    A well-formed KEY_ANSWER to C{offer}, made by hand from docs/e2e.md and signed by
    C{signer}: what a relay holding its own key could send in the bridge's place.
    """
    body = json.loads(offer.payload)
    offered = (
        b"coder1-offer-v1\x00"
        + struct.pack("!II", body["channel"], offer.peer)
        + unb64u(body["eph"])
        + unb64u(body["nonce"])
        + bridge_raw
    )
    eph = Identity.generate().public_raw
    nonce = os.urandom(16)
    answer = b"coder1-answer-v1\x00" + hashlib.sha256(offered).digest() + eph + nonce
    reply = {
        "v": 1,
        "channel": body["channel"],
        "eph": b64u(eph),
        "nonce": b64u(nonce),
        "sig": b64u(signer.sign(answer)),
    }
    return Envelope(Kind.KEY_ANSWER, peer=offer.peer, payload=json.dumps(reply).encode())


def flip(frame: bytes, index: int, bit: int = 0) -> bytes:
    """The frame with one bit changed."""
    changed = bytearray(frame)
    changed[index] ^= 1 << bit
    return bytes(changed)


class NodeTestCase(TestCase):
    """Each test talks to a fresh Node process running tests/js/e2e_interop.mjs."""

    timeout = 60

    def setUp(self) -> None:
        if NODE is None:
            if os.environ.get("CI"):
                self.fail("the interop test must run in CI: node is not installed")
            raise SkipTest("needs Node.js (node) to run the page's e2e.js")
        self.page = NodePage()
        reactor.spawnProcess(
            self.page, NODE, [NODE, SCRIPT.path], env=dict(os.environ), path=SCRIPT.dirname()
        )
        self.addCleanup(self.stop)

    def stop(self) -> Deferred[None]:
        transport = self.page.transport
        assert transport is not None
        transport.closeStdin()
        return self.page.ended


class InteropTests(NodeTestCase):
    """The browser's JavaScript and the bridge's Python agree on every byte of docs/e2e.md."""

    async def handshake(self, name: str = "tab") -> tuple[SecureChannel, int]:
        """
        A JS browser identity, a Python bridge identity, and a channel between them: the
        bridge's end of it, and its number C{C}.
        """
        browser_raw = unb64u((await self.page.ask("identity"))["public"])
        bridge = Identity.generate()
        offer = await self.page.offer(name, bridge)
        answer, channel = Responder.answer(bridge, browser_raw, PEER, offer)
        self.assertEqual(await self.page.accept(name, answer), channel.channel)
        return channel, channel.channel

    async def test_identity_and_signatures(self) -> None:
        """
        The page's identity is a 65-byte P-256 point with a non-extractable private key, and
        each side verifies the other's P1363 signatures (and refuses altered ones).
        """
        made = await self.page.ask("identity")
        self.assertFalse(made["extractable"])
        browser_raw = unb64u(made["public"])
        self.assertEqual((len(browser_raw), browser_raw[0]), (65, 4))

        data = os.urandom(100)
        sig = unb64u((await self.page.ask("sign", data=b64u(data)))["sig"])
        self.assertEqual(len(sig), 64)
        self.assertTrue(verify_signature(browser_raw, sig, data))
        self.assertFalse(verify_signature(browser_raw, sig, data + b"x"))

        bridge = Identity.generate()
        theirs = bridge.sign(data)
        for signed, valid in ((data, True), (data[1:], False)):
            answer = await self.page.ask(
                "verify", public=b64u(bridge.public_raw), sig=b64u(theirs), data=b64u(signed)
            )
            self.assertIs(answer["valid"], valid)

    async def test_sas(self) -> None:
        """
        Both sides compute the same short authentication string, XXXX-XXXX-XXXX in Crockford
        base32, and it changes when either key or their order changes.
        """
        browser_raw = unb64u((await self.page.ask("identity"))["public"])
        seen = set()
        for _ in range(5):
            bridge_raw = Identity.generate().public_raw
            expected = sas(browser_raw, bridge_raw)
            self.assertRegex(expected, r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){2}$")
            answer = await self.page.ask("sas", browser=b64u(browser_raw), bridge=b64u(bridge_raw))
            self.assertEqual(answer["sas"], expected)
            swapped = await self.page.ask("sas", browser=b64u(bridge_raw), bridge=b64u(browser_raw))
            self.assertEqual(swapped["sas"], sas(bridge_raw, browser_raw))
            self.assertNotEqual(swapped["sas"], expected)
            seen.add(expected)
        self.assertEqual(len(seen), 5)

    async def test_handshake_and_frames_both_ways(self) -> None:
        """
        A JS offer answered by Python's Responder gives both the same keys: every frame the
        page seals opens in Python, header and payload intact (empty and 64 KiB included), and
        every frame Python seals opens in the page, interleaved.
        """
        bridge_channel, channel = await self.handshake()
        for up, down in itertools.zip_longest(UP_FRAMES, DOWN_FRAMES):
            if up is not None:
                await self.up(bridge_channel, channel, up)
            if down is not None:
                await self.down(bridge_channel, channel, down)

    async def up(self, bridge_channel: SecureChannel, channel: int, frame: tuple[Any, ...]) -> None:
        kind, peer, stream, seq, plaintext = frame
        sent = Envelope(kind=kind, peer=peer, stream=stream, seq=seq, payload=plaintext)
        sealed = await self.page.seal("tab", sent)
        self.assertEqual(
            (sealed.kind, sealed.peer, sealed.stream, sealed.seq), (kind, peer, stream, seq)
        )
        self.assertEqual(len(sealed.payload), 12 + len(plaintext) + 16)
        self.assertEqual(channel_of(sealed), channel)
        if len(plaintext) >= 8:
            self.assertNotIn(plaintext[:8], sealed.payload)
        self.assertEqual(bridge_channel.open(sealed), sent)

    async def down(
        self, bridge_channel: SecureChannel, channel: int, frame: tuple[Any, ...]
    ) -> None:
        kind, peer, stream, seq, plaintext = frame
        sent = Envelope(kind=kind, peer=peer, stream=stream, seq=seq, payload=plaintext)
        sealed = bridge_channel.seal(sent)
        answer = await self.page.ask("channel_of", frame=b64u(sealed.encode()))
        self.assertEqual(answer["channel"], channel)
        self.assertEqual(await self.page.open("tab", sealed.encode()), sent)

    async def test_tampered(self) -> None:
        """
        A bit flipped anywhere in a frame Python sealed (header, channel, counter,
        ciphertext, tag) or a truncated frame is refused by the page as "tampered"; the
        genuine frame still opens afterwards.
        """
        bridge_channel, _ = await self.handshake()
        genuine = bridge_channel.seal(
            Envelope(Kind.PTY_OUTPUT, peer=PEER, stream=7, seq=4, payload=b"secret output")
        ).encode()
        places = {
            "kind": 1,
            "peer": 7,
            "stream": 11,
            "seq": 19,
            "channel": HEADER_SIZE + 3,
            "counter": HEADER_SIZE + 11,
            "ciphertext": HEADER_SIZE + 12,
            "tag": len(genuine) - 1,
        }
        for what, index in places.items():
            refused = await self.page.refuses("tab", flip(genuine, index))
            self.assertEqual(refused.get("verdict"), "tampered", (what, refused))
        for cut in (len(genuine) - 1, HEADER_SIZE + 27):
            refused = await self.page.refuses("tab", genuine[:cut])
            self.assertEqual(refused.get("verdict"), "tampered", refused)
        opened = await self.page.open("tab", genuine)
        self.assertEqual(opened.payload, b"secret output")

    async def test_replayed(self) -> None:
        """A frame the page already opened is refused as "replayed" when it comes again."""
        bridge_channel, _ = await self.handshake()
        frames = [
            bridge_channel.seal(
                Envelope(Kind.PTY_OUTPUT, peer=PEER, stream=7, seq=i, payload=p)
            ).encode()
            for i, p in enumerate([b"one", b"two"])
        ]
        for frame in frames:
            await self.page.open("tab", frame)
        for frame in frames:
            refused = await self.page.refuses("tab", frame)
            self.assertEqual(refused.get("verdict"), "replayed", refused)

    async def test_dropped(self) -> None:
        """
        A frame whose predecessors never arrived is refused as "dropped"; the counter does
        not move, so the missing frames, once they come, open in order.
        """
        bridge_channel, _ = await self.handshake()
        frames = [
            bridge_channel.seal(
                Envelope(Kind.PTY_OUTPUT, peer=PEER, stream=7, seq=i, payload=b"%d" % i)
            ).encode()
            for i in range(4)
        ]
        refused = await self.page.refuses("tab", frames[3])
        self.assertEqual(refused.get("verdict"), "dropped", refused)
        self.assertIn("3 frame", refused["error"])
        for i, frame in enumerate(frames):
            self.assertEqual((await self.page.open("tab", frame)).payload, b"%d" % i)

    async def test_python_refuses_what_the_page_did_not_send(self) -> None:
        """
        The bridge gives the same verdicts on frames the page sealed: tampered, replayed and
        dropped.
        """
        bridge_channel, _ = await self.handshake()
        frames = [
            await self.page.seal(
                "tab", Envelope(Kind.PTY_INPUT, peer=PEER, stream=7, seq=i, payload=b"ls\r")
            )
            for i in range(3)
        ]
        tampered = decode(flip(frames[0].encode(), HEADER_SIZE + 12))
        dropped = frames[1]
        for frame, verdict in ((tampered, "tampered"), (dropped, "dropped")):
            error = self.assertRaises(IntegrityError, bridge_channel.open, frame)
            self.assertEqual(error.verdict, verdict)
        bridge_channel.open(frames[0])
        error = self.assertRaises(IntegrityError, bridge_channel.open, frames[0])
        self.assertEqual(error.verdict, "replayed")

    async def test_answer_from_another_bridge(self) -> None:
        """
        The page refuses a KEY_ANSWER signed by a key other than the one it pinned (a relay
        answering in the bridge's place), and the bridge refuses an offer the page made for
        another bridge key or signed with another browser key.
        """
        browser_raw = unb64u((await self.page.ask("identity"))["public"])
        bridge = Identity.generate()
        impostor = Identity.generate()

        offer = await self.page.offer("tab", bridge)
        self.assertRaises(E2EError, Responder.answer, impostor, browser_raw, PEER, offer)
        try:
            await self.page.accept("tab", forged_answer(offer, bridge.public_raw, impostor))
        except NodeFailed as e:
            self.assertEqual(e.answer.get("reason"), "bad-signature", e.answer)
        else:
            self.fail("the page accepted an answer signed by another key")
        # The same hand-made answer signed by the pinned key is accepted: the refusal above
        # was for the key, not for the way the answer was made.
        second = await self.page.offer("tab2", bridge)
        await self.page.accept("tab2", forged_answer(second, bridge.public_raw, bridge))

        self.assertRaises(E2EError, Responder.answer, bridge, impostor.public_raw, PEER, offer)
        self.assertRaises(E2EError, Responder.answer, bridge, browser_raw, PEER + 1, offer)
        # The genuine answer is still accepted after the forged one was refused.
        answer, bridge_channel = Responder.answer(bridge, browser_raw, PEER, offer)
        self.assertEqual(await self.page.accept("tab", answer), bridge_channel.channel)


class LinkTests(NodeTestCase):
    """
    The page's channel to one bridge (C{coder1_relay/static/link.js}) against the bridge's
    Python: it sends only KEY_OFFER in plaintext, acts only on frames of its own channel, keeps
    the channel after a tampered or replayed frame (as the bridge does), and starts over (with
    a new channel) after a gap, a KEY_ERROR that says the bridge has no channel, or a silent
    bridge.
    """

    async def start(self, timeout: float = 10.0) -> Envelope:
        """A page identity, a bridge identity, and the link's first KEY_OFFER."""
        self.browser_raw = unb64u((await self.page.ask("identity"))["public"])
        self.bridge = Identity.generate()
        await self.page.ask(
            "link_start", name="l", bridge=b64u(self.bridge.public_raw), peer=PEER, timeout=timeout
        )
        return await self.next_offer()

    async def events(self, until: str | None = None, wait: float = 5.0) -> list[dict[str, Any]]:
        """What the link did since the last call (after waiting for an event of C{until})."""
        answer = await self.page.ask("link_events", name="l", until=until, wait=wait)
        if until is not None:
            self.assertIn(until, [e["type"] for e in answer["events"]], answer)
        events: list[dict[str, Any]] = answer["events"]
        return events

    async def next_offer(self, wait: float = 5.0) -> Envelope:
        events = await self.events("sent", wait)
        sent = [decode(unb64u(e["frame"])) for e in events if e["type"] == "sent"]
        self.assertEqual([e.kind for e in sent], [Kind.KEY_OFFER])
        offer = sent[0]
        self.assertEqual((offer.peer, offer.stream, offer.seq), (PEER, 0, 0))
        return offer

    async def receive(self, frame: Envelope) -> None:
        await self.page.ask("link_receive", name="l", frame=b64u(frame.encode()))

    async def secure(self, offer: Envelope) -> SecureChannel:
        """Answer the offer as the bridge does; the link is then secure on that channel."""
        answer, channel = Responder.answer(self.bridge, self.browser_raw, PEER, offer)
        await self.receive(answer)
        events = await self.events("secure")
        self.assertIn({"type": "secure", "channel": channel.channel}, events)
        self.assertNotIn("problem", [e["type"] for e in events])
        return channel

    def output(self, channel: SecureChannel, data: bytes, seq: int = 0) -> Envelope:
        return channel.seal(Envelope(Kind.PTY_OUTPUT, peer=PEER, stream=7, seq=seq, payload=data))

    async def test_handshake_and_traffic(self) -> None:
        """
        After the handshake the link seals what the page sends and opens what the bridge
        sends; another tab's answers and frames (sealed for its own channel) are ignored.
        """
        offer = await self.start()
        other_browser = Identity.generate()
        other_offer = Initiator(other_browser, self.bridge.public_raw, PEER).offer()
        other_answer, other = Responder.answer(
            self.bridge, other_browser.public_raw, PEER, other_offer
        )
        await self.receive(other_answer)
        self.assertEqual(await self.events(), [])

        channel = await self.secure(offer)
        sealed = await self.page.ask(
            "link_send", name="l", kind=Kind.PTY_INPUT, stream=7, seq=3, data=b64u(b"ls\r")
        )
        self.assertTrue(sealed["sealed"])
        [sent] = [e for e in await self.events("sent") if e["type"] == "sent"]
        self.assertEqual(
            channel.open(decode(unb64u(sent["frame"]))),
            Envelope(Kind.PTY_INPUT, peer=PEER, stream=7, seq=3, payload=b"ls\r"),
        )

        await self.receive(other.seal(Envelope(Kind.PTY_OUTPUT, peer=PEER, stream=7, payload=b"x")))
        await self.receive(self.output(channel, b"mine"))
        [opened] = [e for e in await self.events("frame") if e["type"] == "frame"]
        self.assertEqual(
            (opened["kind"], opened["stream"], unb64u(opened["data"])),
            (Kind.PTY_OUTPUT, 7, b"mine"),
        )

    async def send(self, channel: SecureChannel, data: bytes, seq: int = 0) -> Envelope:
        """The link seals C{data} as PTY_INPUT; the bridge's end opens it."""
        sealed = await self.page.ask(
            "link_send", name="l", kind=Kind.PTY_INPUT, stream=7, seq=seq, data=b64u(data)
        )
        self.assertTrue(sealed["sealed"])
        [sent] = [e for e in await self.events("sent") if e["type"] == "sent"]
        return channel.open(decode(unb64u(sent["frame"])))

    async def test_tampered_and_replayed_frames_keep_the_channel(self) -> None:
        """
        A tampered or replayed frame is reported with its verdict and never delivered, but the
        channel goes on (the counter did not move): the genuine next frame opens, nothing is
        offered again, and the page still seals on it. Junk cannot end a channel.
        """
        offer = await self.start()
        channel = await self.secure(offer)
        frames = [self.output(channel, b"%d" % i, i) for i in range(3)]
        tampered = decode(flip(frames[0].encode(), len(frames[0].encode()) - 1))
        for bad, then, verdict in (
            (tampered, 0, "tampered"),
            (frames[0], 1, "replayed"),
            (decode(flip(frames[2].encode(), HEADER_SIZE + 11)), 2, "tampered"),
        ):
            await self.receive(bad)
            events = await self.events("problem")
            self.assertEqual(
                [(e.get("verdict"), e.get("kept")) for e in events if e["type"] == "problem"],
                [(verdict, True)],
                events,
            )
            self.assertEqual([e["type"] for e in events], ["problem"], "nothing else happened")
            await self.receive(frames[then])
            [opened] = [e for e in await self.events("frame") if e["type"] == "frame"]
            self.assertEqual(unb64u(opened["data"]), b"%d" % then)
        answer = await self.page.ask("link_events", name="l")
        self.assertEqual((answer["events"], answer["state"]), ([], "secure"))
        opened_up = await self.send(channel, b"still here\r")
        self.assertEqual(opened_up.payload, b"still here\r")

    async def test_a_gap_starts_a_new_channel(self) -> None:
        """
        A frame whose predecessor never arrived ("dropped") ends the channel: reported, not
        delivered, later frames of that channel ignored, and a new offer (a new channel number)
        that the bridge can answer. After a tampered frame, the gap it leaves is reported as
        caused by it.
        """
        offer = await self.start()
        seen = set()
        for before in (None, "tampered"):
            channel = await self.secure(offer)
            seen.add(channel.channel)
            first, second = self.output(channel, b"one"), self.output(channel, b"two", 1)
            if before == "tampered":
                await self.receive(decode(flip(first.encode(), HEADER_SIZE + 20)))
                await self.events("problem")
            await self.receive(second)
            events = await self.events("problem")
            problems = [e for e in events if e["type"] == "problem"]
            self.assertEqual(
                [(p.get("verdict"), p.get("kept"), p.get("after")) for p in problems],
                [("dropped", False, before)],
                events,
            )
            self.assertNotIn("frame", [e["type"] for e in events])
            self.assertIn({"type": "state", "state": "retrying"}, events)
            await self.receive(first)  # genuine, but of the channel that ended
            offer = await self.next_offer()
            self.assertNotIn(json.loads(offer.payload)["channel"], seen)
        await self.secure(offer)

    async def test_forged_answer(self) -> None:
        """
        An answer not signed by the pinned bridge key is reported and ignored; the genuine
        answer that follows still completes the handshake.
        """
        offer = await self.start()
        await self.receive(forged_answer(offer, self.bridge.public_raw, Identity.generate()))
        events = await self.events("problem")
        self.assertEqual(
            [e.get("reason") for e in events if e["type"] == "problem"], ["bad-signature"]
        )
        await self.secure(offer)

    async def test_key_error_and_silence(self) -> None:
        """
        KEY_ERROR for another channel is ignored; for this link's channel it is reported and
        the link offers again. An offer left unanswered is made again after the timeout.
        """
        offer = await self.start(timeout=0.3)
        channel = json.loads(offer.payload)["channel"]
        refusal = {"channel": channel + 1, "error": "bad-offer", "message": "not yours"}
        await self.receive(control(Kind.KEY_ERROR, refusal, peer=PEER))
        self.assertEqual(await self.events(), [])
        refusal["channel"] = channel
        await self.receive(control(Kind.KEY_ERROR, refusal, peer=PEER))
        events = await self.events("problem")
        self.assertIn(
            {"type": "problem", "reason": "bad-offer", "message": "not yours", "kept": False},
            events,
        )
        silent = await self.next_offer()  # after the backoff
        self.assertNotEqual(json.loads(silent.payload)["channel"], channel)
        again = await self.next_offer(wait=8.0)  # nobody answered: timeout, backoff, offer
        await self.secure(again)

    async def test_key_error_verdicts(self) -> None:
        """
        The bridge's KEY_ERROR "tampered" or "replayed" (it refused a frame of this channel and
        kept the channel) is reported and the channel goes on; "dropped" and "no-channel" (it
        has no channel with this tab any more) make the link start a new one.
        """
        offer = await self.start()
        channel = await self.secure(offer)
        seen = {channel.channel}
        for error in ("tampered", "replayed"):
            refusal = {"channel": channel.channel, "error": error, "message": "refused"}
            await self.receive(control(Kind.KEY_ERROR, refusal, peer=PEER))
            events = await self.events("problem")
            self.assertEqual(
                events,
                [{"type": "problem", "reason": error, "message": "refused", "kept": True}],
            )
        opened = await self.send(channel, b"on the same channel\r")
        self.assertEqual(opened.payload, b"on the same channel\r")
        for error in ("dropped", "no-channel"):
            refusal = {"channel": channel.channel, "error": error, "message": "gone"}
            await self.receive(control(Kind.KEY_ERROR, refusal, peer=PEER))
            events = await self.events("problem")
            self.assertIn(
                {"type": "problem", "reason": error, "message": "gone", "kept": False}, events
            )
            self.assertIn({"type": "state", "state": "retrying"}, events)
            unsent = await self.page.ask(
                "link_send", name="l", kind=Kind.PTY_INPUT, stream=7, seq=0, data=b64u(b"x")
            )
            self.assertFalse(unsent["sealed"], "nothing is sealed on a channel the bridge forgot")
            offer = await self.next_offer()
            self.assertNotIn(json.loads(offer.payload)["channel"], seen)
            channel = await self.secure(offer)
            seen.add(channel.channel)

    async def test_bridge_too_old(self) -> None:
        """A bridge that answers KEY_OFFER as an unknown kind leaves the link "unsupported"."""
        await self.start()
        old = {"kind": Kind.KEY_OFFER, "error": "unsupported", "message": "this bridge is too old"}
        await self.receive(control(Kind.UNSUPPORTED, old, peer=PEER))
        events = await self.events("state")
        self.assertIn({"type": "state", "state": "unsupported"}, events)
        answer = await self.page.ask("link_events", name="l", until="sent", wait=1.5)
        self.assertEqual((answer["events"], answer["state"]), ([], "unsupported"))


class BacklogTests(NodeTestCase):
    """
    What a terminal keeps while its bridge has no secure channel (C{Backlog} in link.js):
    input in order, at most 64 KiB, whole frames (one that does not fit is dropped, and
    counted, so the terminal can say so), and only the latest size.
    """

    async def test_in_order_and_bounded(self) -> None:
        made = await self.page.ask("backlog_new", name="b")
        self.assertEqual(made["limit"], 64 * 1024)
        self.assertEqual(made["default"], 64 * 1024)
        kept = [b"ls\r", os.urandom(40000), b"\x1b[A", os.urandom(25529)]
        for data in kept:
            self.assertTrue(
                (await self.page.ask("backlog_input", name="b", data=b64u(data)))["kept"]
            )
        self.assertEqual(sum(map(len, kept)), 64 * 1024 - 1)
        too_much = await self.page.ask("backlog_input", name="b", data=b64u(b"ab"))
        self.assertEqual((too_much["kept"], too_much["lost"]), (False, 2))
        self.assertTrue((await self.page.ask("backlog_input", name="b", data=b64u(b"c")))["kept"])
        lost = await self.page.ask("backlog_input", name="b", data=b64u(b"d" * 300))
        self.assertEqual((lost["kept"], lost["lost"]), (False, 302))
        for cols, rows in ((80, 24), (120, 40)):
            await self.page.ask("backlog_resize", name="b", cols=cols, rows=rows)
        taken = await self.page.ask("backlog_take", name="b")
        self.assertEqual([unb64u(d) for d in taken["inputs"]], [*kept, b"c"])
        self.assertEqual(taken["size"], {"cols": 120, "rows": 40})
        self.assertEqual((taken["lost"], taken["empty"]), (302, True))
        # Emptied: the next outage starts from nothing, with its own count.
        again = await self.page.ask("backlog_input", name="b", data=b64u(b"x" * 1000))
        self.assertEqual((again["kept"], again["lost"]), (True, 0))

    async def test_a_frame_larger_than_the_limit(self) -> None:
        """A paste larger than the limit is dropped whole, never cut, even into an empty backlog."""
        await self.page.ask("backlog_new", name="b", limit=10)
        big = await self.page.ask("backlog_input", name="b", data=b64u(b"0123456789a"))
        self.assertEqual((big["kept"], big["lost"], big["empty"]), (False, 11, True))
        resized = await self.page.ask("backlog_resize", name="b", cols=1, rows=1)
        self.assertFalse(resized["empty"])
        taken = await self.page.ask("backlog_take", name="b")
        self.assertEqual((taken["inputs"], taken["lost"]), ([], 11))
