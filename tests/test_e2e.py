"""
Tests for L{coder1_wire.e2e}: the handshake and sealed frames of docs/e2e.md.

The known-answer tests recompute every byte string from the document with the primitives
alone (hashlib, hmac, cryptography's ECDH/ECDSA/AES-GCM), so they pin the wire format the
JavaScript side must match, not merely this module's agreement with itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from coder1_wire import e2e
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
from coder1_wire.envelope import Envelope, Kind, decode

from .docblocks import check_block

PEER = 7
BROWSER = Identity.generate()
BRIDGE = Identity.generate()
#: A key that is neither of the paired ones: another browser, another bridge, or the relay.
STRANGER = Identity.generate()
FIELDS = ("channel", "eph", "nonce", "sig", "v")
SAS_FORMAT = re.compile(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}")
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def handshake(
    browser: Identity = BROWSER, bridge: Identity = BRIDGE, channel: int | None = None
) -> tuple[SecureChannel, SecureChannel]:
    """A complete handshake: the browser's channel and the bridge's."""
    initiator = Initiator(browser, bridge.public_raw, PEER, channel)
    answer, down = Responder.answer(bridge, browser.public_raw, PEER, initiator.offer())
    return initiator.accept(answer), down


def fixed_identity(scalar: int) -> Identity:
    return Identity(ec.derive_private_key(scalar, ec.SECP256R1()))


def raw(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def public(identity: Identity) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), identity.public_raw)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out, independent of cryptography's HKDF."""
    prk = hmac.new(salt, ikm, "sha256").digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), "sha256").digest()
        okm += block
        counter += 1
    return okm[:length]


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def p1363_verify(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    """Raise unless C{signature} (r || s) is valid; independent of L{verify_signature}."""
    der = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
    public.verify(der, data, ec.ECDSA(hashes.SHA256()))


def with_body(envelope: Envelope, change: Callable[[dict[str, Any]], None]) -> Envelope:
    """C{envelope} with its JSON payload changed in place by C{change}."""
    body = json.loads(envelope.payload)
    change(body)
    return attrs.evolve(envelope, payload=json.dumps(body).encode())


def setter(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[field] = value

    return change


def deleter(field: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        del body[field]

    return change


def off_curve() -> bytes:
    point = bytearray(STRANGER.public_raw)
    point[-1] ^= 1
    return bytes(point)


#: Body changes every handshake message must refuse, by what they break.
MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "v=2": setter("v", 2),
    "v=0": setter("v", 0),
    "v=true": setter("v", True),
    "v as text": setter("v", "1"),
    "v as float": setter("v", 1.0),
    "v missing": deleter("v"),
    "channel 0": setter("channel", 0),
    "channel 2**32": setter("channel", 2**32),
    "channel negative": setter("channel", -1),
    "channel as text": setter("channel", "5"),
    "channel true": setter("channel", True),
    "channel float": setter("channel", 5.0),
    "channel missing": deleter("channel"),
    "eph 64 bytes": setter("eph", b64u(STRANGER.public_raw[:64])),
    "eph 66 bytes": setter("eph", b64u(STRANGER.public_raw + b"\x00")),
    "eph compressed": setter(
        "eph",
        b64u(
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        ),
    ),
    "eph tagged 0x05": setter("eph", b64u(b"\x05" + STRANGER.public_raw[1:])),
    "eph off the curve": setter("eph", b64u(off_curve())),
    "eph coordinates >= p": setter("eph", b64u(b"\x04" + b"\xff" * 64)),
    "eph all zero": setter("eph", b64u(b"\x04" + b"\x00" * 64)),
    "eph padded": setter("eph", b64u(STRANGER.public_raw) + "="),
    "eph standard base64": setter(
        "eph", base64.standard_b64encode(STRANGER.public_raw).decode().rstrip("=")
    ),
    "eph as list": setter("eph", list(STRANGER.public_raw)),
    "nonce 15 bytes": setter("nonce", b64u(b"n" * 15)),
    "nonce 17 bytes": setter("nonce", b64u(b"n" * 17)),
    "nonce null": setter("nonce", None),
    "sig 63 bytes": setter("sig", b64u(b"s" * 63)),
    "sig 65 bytes": setter("sig", b64u(b"s" * 65)),
    "sig DER": setter("sig", b64u(b"\x30" + b"s" * 70)),
    "sig with whitespace": setter("sig", " " + b64u(b"s" * 64)),
    "extra field": setter("extra", 1),
}

#: Payloads that are not a JSON object at all.
NOT_AN_OBJECT = {
    "empty": b"",
    "not JSON": b"{v: 1}",
    "array": b"[1, 2]",
    "string": b'"offer"',
    "not UTF-8": b'{"v": "\xff"}',
    "UTF-16": '{"v": 1}'.encode("utf-16"),
    "NaN": b'{"v": NaN}',
    "deeply nested": b"[" * 100_000,
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
#: Field values near the valid ones: right types, plausible lengths, real points.
field_values = (
    json_values
    | st.binary(max_size=80).map(b64u)
    | st.integers(min_value=0, max_value=2**32)
    | st.sampled_from(
        [1, 2, b64u(STRANGER.public_raw), b64u(off_curve()), b64u(bytes(16)), b64u(bytes(64))]
    )
)
json_bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), field_values)


class HandshakeTests(SynchronousTestCase):
    """A handshake between paired identities gives both ends one working channel."""

    def test_frames_both_ways(self) -> None:
        """
        After a handshake each end opens, in order, every frame the other sealed, in both
        directions and interleaved, and the sealed payload is u32(C) || u64(n) || ct || tag.
        """
        up, down = handshake()
        self.assertEqual(up.channel, down.channel)
        for n in range(100):
            text = b"plaintext %03d" % n + b"x" * (n % 7)
            frame = Envelope(Kind.PTY_INPUT, stream=n % 3, seq=n, peer=PEER, payload=text)
            sealed = up.seal(frame)
            self.assertEqual(sealed.payload[:12], up.channel.to_bytes(4) + n.to_bytes(8))
            self.assertEqual(len(sealed.payload), 12 + len(text) + 16)
            self.assertNotIn(text, sealed.payload[12:])
            self.assertEqual(
                (sealed.kind, sealed.stream, sealed.seq, sealed.peer),
                (frame.kind, frame.stream, frame.seq, frame.peer),
            )
            self.assertEqual(down.open(sealed), frame)
            reply = Envelope(Kind.PTY_OUTPUT, stream=n % 3, seq=n, peer=PEER, payload=text * 2)
            self.assertEqual(up.open(down.seal(reply)), reply)

    def test_empty_payload(self) -> None:
        """An empty payload seals to the 28-byte minimum and opens to empty again."""
        up, down = handshake()
        sealed = up.seal(Envelope(Kind.PTY_CLOSE, stream=1, peer=PEER))
        self.assertEqual(len(sealed.payload), 28)
        self.assertEqual(down.open(sealed).payload, b"")

    def test_handshake_frames(self) -> None:
        """
        KEY_OFFER and KEY_ANSWER travel on stream 0, seq 0 with peer = the bridge, and carry
        exactly the documented JSON fields for the same channel.
        """
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        offer = initiator.offer()
        answer, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, offer)
        for envelope, kind in [(offer, Kind.KEY_OFFER), (answer, Kind.KEY_ANSWER)]:
            self.assertEqual(
                (envelope.kind, envelope.stream, envelope.seq, envelope.peer), (kind, 0, 0, PEER)
            )
            body = envelope.json()
            self.assertEqual(sorted(body), sorted(FIELDS))
            self.assertEqual(body["v"], 1)
            self.assertEqual(body["channel"], initiator.channel)
            self.assertEqual(len(b64decode(body["eph"])), 65)
            self.assertEqual(len(b64decode(body["nonce"])), 16)
            self.assertEqual(len(b64decode(body["sig"])), 64)

    def test_random_channels(self) -> None:
        """Without a given channel each initiator picks a random non-zero u32."""
        channels = {Initiator(BROWSER, BRIDGE.public_raw, PEER).channel for _ in range(20)}
        self.assertEqual(len(channels), 20)
        self.assertTrue(all(0 < c < 2**32 for c in channels))

    def test_matches_the_document(self) -> None:
        """
        With fixed ephemeral keys and nonces, the offer and answer signatures cover exactly the
        documented byte strings, and the keys, IVs and AAD are the documented ones: a frame
        sealed here opens with keys derived independently, and one sealed independently
        opens here.  The sealed bytes are pinned as a known answer for the JavaScript side.
        """
        eph_b = ec.derive_private_key(0x1111, ec.SECP256R1())
        eph_r = ec.derive_private_key(0x2222, ec.SECP256R1())
        ephemerals = iter([eph_b, eph_r])
        nonces = iter([b"\x01" * 16, b"\x02" * 16])
        self.patch(e2e, "_new_ephemeral", lambda: next(ephemerals))
        self.patch(e2e, "_random_bytes", lambda size: next(nonces))
        browser, bridge = fixed_identity(1), fixed_identity(2)
        channel = 0x01020304

        initiator = Initiator(browser, bridge.public_raw, PEER, channel)
        offer = initiator.offer()
        self.assertEqual(offer.encode()[:20].hex(), "0130000000000007" + "00" * 12)
        offer_bytes = (
            b"coder1-offer-v1\x00"
            + bytes.fromhex("01020304 00000007")
            + raw(eph_b)
            + b"\x01" * 16
            + bridge.public_raw
        )
        body = offer.json()
        self.assertEqual(body["eph"], base64.urlsafe_b64encode(raw(eph_b)).decode().rstrip("="))
        self.assertEqual(body["nonce"], "AQEBAQEBAQEBAQEBAQEBAQ")
        p1363_verify(public(browser), b64decode(body["sig"]), offer_bytes)

        answer, down = Responder.answer(bridge, browser.public_raw, PEER, offer)
        answer_bytes = b"coder1-answer-v1\x00" + sha256(offer_bytes) + raw(eph_r) + b"\x02" * 16
        p1363_verify(public(bridge), b64decode(answer.json()["sig"]), answer_bytes)
        up = initiator.accept(answer)

        shared = eph_b.exchange(ec.ECDH(), eph_r.public_key())
        okm = hkdf_sha256(shared, sha256(offer_bytes + answer_bytes), b"coder1-e2e-v1", 64)
        k_up, k_down = okm[:32], okm[32:]

        first_sealed = b""
        for n in range(2):
            frame = Envelope(Kind.PTY_INPUT, stream=5, seq=9 + n, peer=PEER, payload=b"ls\n")
            sealed = up.seal(frame)
            prefix = bytes.fromhex("01020304") + n.to_bytes(8)
            iv = bytes(4) + n.to_bytes(8)
            aad = frame.encode()[:20] + prefix
            self.assertEqual(sealed.payload[:12], prefix)
            self.assertEqual(AESGCM(k_up).decrypt(iv, sealed.payload[12:], aad), b"ls\n")
            self.assertEqual(down.open(sealed), frame)
            if n == 0:
                first_sealed = sealed.payload

            reply = Envelope(Kind.PTY_OUTPUT, stream=5, seq=n, peer=PEER, payload=b"out")
            iv = bytes.fromhex("00000001") + n.to_bytes(8)
            aad = reply.encode()[:20] + prefix
            by_hand = prefix + AESGCM(k_down).encrypt(iv, b"out", aad)
            self.assertEqual(down.seal(reply).payload, by_hand)
            self.assertEqual(up.open(attrs.evolve(reply, payload=by_hand)), reply)

        self.assertEqual(
            okm.hex(),
            "2133162ed808c58dab803f73b70d6a48d63d921a4a92f3ca9e83828259cb5134"
            "1a6cb2d9999db347866c9ee82ae73e234e22cc5f738f1c7491125373430bf069",
        )
        # PTY_INPUT, stream 5, seq 9, peer 7, "ls\n", the first frame up (n = 0):
        self.assertEqual(
            first_sealed.hex(), "010203040000000000000000acfae690629e54af73fe5b3406251f7edc32e9"
        )


class ShortAuthenticationStringTests(SynchronousTestCase):
    """The SAS both ends show for a pairing."""

    def test_same_on_both_sides(self) -> None:
        """Each end computes it from the same two pinned keys, and it has the documented shape."""
        browser_side = sas(BROWSER.public_raw, BRIDGE.public_raw)
        bridge_side = sas(BROWSER.public_raw, BRIDGE.public_raw)
        self.assertEqual(browser_side, bridge_side)
        self.assertRegex(browser_side, SAS_FORMAT)

    def test_formula(self) -> None:
        """
        The SAS is the first 60 bits of SHA-256("coder1-sas-v1" 0x00 browser bridge), taken
        five bits at a time as a string of binary digits, in Crockford base32.
        """
        alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        for browser, bridge in [(BROWSER, BRIDGE), (BRIDGE, BROWSER), (STRANGER, BRIDGE)]:
            digest = sha256(b"coder1-sas-v1\x00" + browser.public_raw + bridge.public_raw)
            bits = "".join(f"{byte:08b}" for byte in digest)[:60]
            chars = "".join(alphabet[int(bits[i : i + 5], 2)] for i in range(0, 60, 5))
            expected = f"{chars[:4]}-{chars[4:8]}-{chars[8:]}"
            self.assertEqual(sas(browser.public_raw, bridge.public_raw), expected)

    def test_known_answer(self) -> None:
        """For the identities with private keys 1 and 2 (the points G and 2G), the SAS is fixed."""
        self.assertEqual(
            sas(fixed_identity(1).public_raw, fixed_identity(2).public_raw), "MMWP-DCKC-KAMS"
        )

    def test_order_and_substitution(self) -> None:
        """Swapping the roles or substituting either key changes the SAS."""
        genuine = sas(BROWSER.public_raw, BRIDGE.public_raw)
        self.assertNotEqual(sas(BRIDGE.public_raw, BROWSER.public_raw), genuine)
        self.assertNotEqual(sas(STRANGER.public_raw, BRIDGE.public_raw), genuine)
        self.assertNotEqual(sas(BROWSER.public_raw, STRANGER.public_raw), genuine)

    def test_refuses_non_keys(self) -> None:
        """Only two uncompressed P-256 points have a SAS."""
        self.assertRaises(E2EError, sas, BROWSER.public_raw[:64], BRIDGE.public_raw)
        self.assertRaises(E2EError, sas, BROWSER.public_raw, off_curve())


class TamperTests(SynchronousTestCase):
    """A sealed frame opens only unchanged, once, in order, on its channel and direction."""

    def assertVerdict(
        self, verdict: str, channel: SecureChannel, envelope: Envelope
    ) -> IntegrityError:
        with self.assertRaises(IntegrityError) as caught:
            channel.open(envelope)
        self.assertEqual(caught.exception.verdict, verdict)
        self.assertIsInstance(caught.exception, E2EError)
        return caught.exception

    def test_every_bit_of_the_payload(self) -> None:
        """
        Flipping any one bit of a sealed payload (channel, counter, ciphertext or tag) is
        "tampered", and the refusals leave the counter where it was.
        """
        up, down = handshake()
        sealed = up.seal(Envelope(Kind.PTY_INPUT, stream=1, peer=PEER, payload=b"hi"))
        for bit in range(len(sealed.payload) * 8):
            payload = bytearray(sealed.payload)
            payload[bit // 8] ^= 0x80 >> (bit % 8)
            self.assertVerdict("tampered", down, attrs.evolve(sealed, payload=bytes(payload)))
        self.assertEqual(down.open(sealed).payload, b"hi")

    def test_every_header_field(self) -> None:
        """Changing the kind, stream, seq or peer of a sealed frame is "tampered"."""
        up, down = handshake()
        sealed = up.seal(Envelope(Kind.PTY_INPUT, stream=1, seq=2, peer=PEER, payload=b"ls"))
        changes: list[dict[str, Any]] = [
            {"kind": Kind.CMD_STDIN},
            {"stream": 3},
            {"seq": 3},
            {"seq": 2 + 2**32},
            {"peer": PEER + 1},
        ]
        for change in changes:
            self.assertVerdict("tampered", down, attrs.evolve(sealed, **change))
        self.assertEqual(down.open(sealed).payload, b"ls")

    def test_truncated(self) -> None:
        """Any prefix of a sealed payload is "tampered"; a too-short one has no channel."""
        up, down = handshake()
        sealed = up.seal(Envelope(Kind.PTY_INPUT, peer=PEER, payload=b"data"))
        for length in range(len(sealed.payload)):
            cut = attrs.evolve(sealed, payload=sealed.payload[:length])
            self.assertVerdict("tampered", down, cut)
            self.assertEqual(channel_of(cut), None if length < 28 else up.channel)
        self.assertEqual(channel_of(sealed), up.channel)
        self.assertEqual(down.open(sealed).payload, b"data")

    def test_replayed(self) -> None:
        """An earlier frame sent again is "replayed"; the next genuine frame still opens."""
        up, down = handshake()
        frames = [
            up.seal(Envelope(Kind.PTY_INPUT, seq=n, peer=PEER, payload=b"%d" % n)) for n in range(4)
        ]
        for frame in frames[:3]:
            down.open(frame)
        self.assertVerdict("replayed", down, frames[1])
        self.assertVerdict("replayed", down, frames[2])
        self.assertEqual(down.open(frames[3]).payload, b"3")

    def test_dropped(self) -> None:
        """A frame after a missing one is "dropped", and says how many are missing."""
        up, down = handshake()
        frames = [up.seal(Envelope(Kind.PTY_INPUT, seq=n, peer=PEER)) for n in range(4)]
        down.open(frames[0])
        with self.assertRaises(IntegrityError) as caught:
            down.open(frames[3])
        self.assertEqual(caught.exception.verdict, "dropped")
        self.assertIn("2 frames missing", str(caught.exception))

    def test_swapped(self) -> None:
        """
        Two frames delivered in the wrong order: the later one is "dropped" and the counter has
        not moved, so the earlier one and then the later one still open.
        """
        up, down = handshake()
        first, second = (up.seal(Envelope(Kind.PTY_INPUT, seq=n, peer=PEER)) for n in range(2))
        self.assertVerdict("dropped", down, second)
        self.assertEqual(down.open(first).seq, 0)
        self.assertEqual(down.open(second).seq, 1)

    def test_reflected(self) -> None:
        """A frame sent back to the end that sealed it does not open there (keys differ)."""
        up, down = handshake()
        to_bridge = up.seal(Envelope(Kind.PTY_INPUT, peer=PEER, payload=b"a"))
        to_browser = down.seal(Envelope(Kind.PTY_OUTPUT, peer=PEER, payload=b"b"))
        self.assertVerdict("tampered", up, to_bridge)
        self.assertVerdict("tampered", down, to_browser)
        self.assertEqual(down.open(to_bridge).payload, b"a")
        self.assertEqual(up.open(to_browser).payload, b"b")

    def test_other_channel(self) -> None:
        """Frames of one channel do not open on another, whichever number it has."""
        up_a, down_a = handshake(channel=1)
        up_b, down_b = handshake(channel=2)
        _, down_c = handshake(channel=1)
        for up, down in [(up_a, down_b), (up_a, down_c), (up_b, down_a)]:
            sealed = up.seal(Envelope(Kind.PTY_INPUT, peer=PEER))
            refused = self.assertVerdict("tampered", down, sealed)
            if up.channel != down.channel:
                self.assertIn("another channel", str(refused))
            sealed = down.seal(Envelope(Kind.PTY_OUTPUT, peer=PEER))
            self.assertVerdict("tampered", up, sealed)

    def test_not_sealed(self) -> None:
        """A plaintext payload is refused as "tampered"."""
        _, down = handshake()
        self.assertVerdict(
            "tampered", down, Envelope(Kind.PTY_INPUT, peer=PEER, payload=b"rm -rf / " * 10)
        )


class ForwardSecrecyTests(SynchronousTestCase):
    """Every handshake has fresh keys, even between the same identities on the same channel."""

    def test_fresh_keys(self) -> None:
        """
        Two handshakes between the same identities, with the same channel number: a frame
        sealed on one does not open on the other, and the same plaintext seals differently.
        """
        first_up, first_down = handshake(channel=42)
        second_up, second_down = handshake(channel=42)
        frame = Envelope(Kind.PTY_INPUT, peer=PEER, payload=b"same")
        one, two = first_up.seal(frame), second_up.seal(frame)
        self.assertNotEqual(one.payload, two.payload)
        self.assertRaises(IntegrityError, second_down.open, one)
        self.assertRaises(IntegrityError, first_down.open, two)
        self.assertEqual(first_down.open(one), frame)
        self.assertEqual(second_down.open(two), frame)


class HandshakeRefusalTests(SynchronousTestCase):
    """Each end refuses a handshake that is not between the pinned keys, or malformed."""

    def test_offer_from_another_browser(self) -> None:
        """An offer signed by a browser key other than the pinned one is refused."""
        offer = Initiator(STRANGER, BRIDGE.public_raw, PEER).offer()
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, offer)

    def test_offer_for_another_bridge_identity(self) -> None:
        """An offer made for another bridge key (the page pinned a substitute) is refused."""
        offer = Initiator(BROWSER, STRANGER.public_raw, PEER).offer()
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, offer)
        # That substitute, with the browser's genuine offer, is refused as well.
        genuine = Initiator(BROWSER, BRIDGE.public_raw, PEER).offer()
        self.assertRaises(E2EError, Responder.answer, STRANGER, BROWSER.public_raw, PEER, genuine)

    def test_offer_for_another_peer(self) -> None:
        """
        An offer for another bridge number is refused, both as it is and with its header
        rewritten to this bridge's number (the signature covers the number).
        """
        offer = Initiator(BROWSER, BRIDGE.public_raw, PEER + 1).offer()
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, offer)
        rewritten = attrs.evolve(offer, peer=PEER)
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, rewritten)

    def test_offer_header(self) -> None:
        """An offer of another kind, or not on stream 0 seq 0, is refused."""
        offer = Initiator(BROWSER, BRIDGE.public_raw, PEER).offer()
        changes: list[dict[str, Any]] = [{"kind": Kind.KEY_ANSWER}, {"stream": 1}, {"seq": 1}]
        for change in changes:
            self.assertRaises(
                E2EError,
                Responder.answer,
                BRIDGE,
                BROWSER.public_raw,
                PEER,
                attrs.evolve(offer, **change),
            )

    def test_bad_pin(self) -> None:
        """A pinned key that is not a P-256 point is an error at once, on either side."""
        offer = Initiator(BROWSER, BRIDGE.public_raw, PEER).offer()
        self.assertRaises(E2EError, Responder.answer, BRIDGE, b"\x04" * 65, PEER, offer)
        self.assertRaises(E2EError, Initiator, BROWSER, off_curve(), PEER)
        self.assertRaises(E2EError, Initiator, BROWSER, BRIDGE.public_raw, PEER, channel=0)
        self.assertRaises(E2EError, Initiator, BROWSER, BRIDGE.public_raw, PEER, channel=2**32)

    def test_answer_from_another_bridge(self) -> None:
        """
        An answer signed by a key other than the pinned bridge's is refused, even when it is
        well formed over the right bytes (a relay answering in the bridge's place).
        """
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        offer = initiator.offer()
        body = offer.json()
        offer_bytes = (
            b"coder1-offer-v1\x00"
            + initiator.channel.to_bytes(4)
            + PEER.to_bytes(4)
            + b64decode(body["eph"])
            + b64decode(body["nonce"])
            + BRIDGE.public_raw
        )
        eph = ec.generate_private_key(ec.SECP256R1())
        answer_bytes = b"coder1-answer-v1\x00" + sha256(offer_bytes) + raw(eph) + b"\x03" * 16
        forged = {
            "v": 1,
            "channel": initiator.channel,
            "eph": b64u(raw(eph)),
            "nonce": b64u(b"\x03" * 16),
            "sig": b64u(STRANGER.sign(answer_bytes)),
        }
        answer = Envelope(Kind.KEY_ANSWER, peer=PEER, payload=json.dumps(forged).encode())
        self.assertRaises(E2EError, initiator.accept, answer)
        # The same bytes signed by the pinned bridge are accepted: only the key was wrong.
        forged["sig"] = b64u(BRIDGE.sign(answer_bytes))
        initiator.accept(attrs.evolve(answer, payload=json.dumps(forged).encode()))

    def test_answer_to_another_offer(self) -> None:
        """
        An answer to another tab's offer is refused, and the initiator still accepts its own
        answer afterwards; once accepted, no further answer is.
        """
        mine = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        other = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        other_answer, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, other.offer())
        self.assertRaises(E2EError, mine.accept, other_answer)
        same_channel = Initiator(BROWSER, BRIDGE.public_raw, PEER, channel=mine.channel)
        replayed, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, same_channel.offer())
        self.assertRaises(E2EError, mine.accept, replayed)
        answer, down = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, mine.offer())
        up = mine.accept(answer)
        self.assertEqual(down.open(up.seal(Envelope(Kind.PTY_LIST, peer=PEER))).payload, b"")
        self.assertRaises(E2EError, mine.accept, answer)

    def test_answer_header(self) -> None:
        """An answer of another kind, from another peer, or not on stream 0 seq 0 is refused."""
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        answer, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, initiator.offer())
        changes: list[dict[str, Any]] = [
            {"kind": Kind.KEY_OFFER},
            {"peer": PEER + 1},
            {"stream": 1},
            {"seq": 1},
        ]
        for change in changes:
            self.assertRaises(E2EError, initiator.accept, attrs.evolve(answer, **change))
        initiator.accept(answer)

    def test_key_error(self) -> None:
        """
        A KEY_ERROR is a refusal whose message is shown as a hint (printable text only);
        one for another channel does not speak for this one.
        """
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)

        def refusal(body: Any) -> str:
            error = Envelope(Kind.KEY_ERROR, peer=PEER, payload=json.dumps(body).encode())
            with self.assertRaises(E2EError) as caught:
                initiator.accept(error)
            return str(caught.exception)

        mine = {"channel": initiator.channel, "error": "unknown-key", "message": "pair again"}
        self.assertEqual(refusal(mine), "the bridge refused the key offer: pair again")
        self.assertNotIn("pair again", refusal({**mine, "channel": initiator.channel + 1}))
        self.assertNotIn("\x1b", refusal({**mine, "message": "\x1b[2Jhi"}))
        self.assertIn("refused", refusal([1]))

    def test_malformed(self) -> None:
        """
        Every malformed field (wrong version, type, length, encoding, a point off the curve,
        a missing or extra field) and every payload that is not a JSON object is refused with
        E2EError, in an offer and in an answer alike.
        """
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        offer = initiator.offer()
        answer, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, offer)
        cases: list[tuple[str, Envelope, Envelope | None]] = [
            (name, with_body(offer, c), with_body(answer, c)) for name, c in MALFORMED.items()
        ]
        cases += [
            (name, attrs.evolve(offer, payload=p), attrs.evolve(answer, payload=p))
            for name, p in NOT_AN_OBJECT.items()
        ]
        duplicate = b'{"v":1,"v":1,' + offer.payload[1:]
        cases.append(("duplicate key", attrs.evolve(offer, payload=duplicate), None))
        for name, bad_offer, bad_answer in cases:
            with self.assertRaises(E2EError, msg=name):
                Responder.answer(BRIDGE, BROWSER.public_raw, PEER, bad_offer)
            if bad_answer is not None:
                with self.assertRaises(E2EError, msg=name):
                    initiator.accept(bad_answer)
        initiator.accept(answer)

    @settings(max_examples=300, deadline=None)
    @given(json_bodies)
    def test_arbitrary_bodies(self, body: dict[str, Any]) -> None:
        """Any JSON object as an offer or an answer raises E2EError and nothing else."""
        payload = json.dumps(body).encode()
        offer = Envelope(Kind.KEY_OFFER, peer=PEER, payload=payload)
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, offer)
        answer = Envelope(Kind.KEY_ANSWER, peer=PEER, payload=payload)
        self.assertRaises(E2EError, _ARBITRARY_INITIATOR.accept, answer)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_payloads(self, payload: bytes) -> None:
        """Any bytes as an offer or an answer raise E2EError and nothing else."""
        offer = Envelope(Kind.KEY_OFFER, peer=PEER, payload=payload)
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, offer)
        answer = Envelope(Kind.KEY_ANSWER, peer=PEER, payload=payload)
        self.assertRaises(E2EError, _ARBITRARY_INITIATOR.accept, answer)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(FIELDS), field_values)
    def test_one_field_changed(self, field: str, value: Any) -> None:
        """A genuine offer or answer with any one field changed raises E2EError and nothing else."""
        initiator = Initiator(BROWSER, BRIDGE.public_raw, PEER)
        offer = initiator.offer()
        answer, _ = Responder.answer(BRIDGE, BROWSER.public_raw, PEER, offer)
        for envelope in (offer, answer):
            original = envelope.json()[field]
            assume(type(value) is not type(original) or value != original)
        bad_offer = with_body(offer, setter(field, value))
        self.assertRaises(E2EError, Responder.answer, BRIDGE, BROWSER.public_raw, PEER, bad_offer)
        self.assertRaises(E2EError, initiator.accept, with_body(answer, setter(field, value)))


_ARBITRARY_INITIATOR = Initiator(BROWSER, BRIDGE.public_raw, PEER)


class IdentityTests(SynchronousTestCase):
    """Long-term keys: PEM storage, P1363 signatures, strict verification."""

    def test_pem_round_trip(self) -> None:
        """An identity saved as unencrypted PKCS8 PEM loads back as the same key pair."""
        pem = BRIDGE.to_pem()
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        loaded = Identity.from_pem(pem)
        self.assertEqual(loaded.public_raw, BRIDGE.public_raw)
        self.assertTrue(verify_signature(BRIDGE.public_raw, loaded.sign(b"m"), b"m"))
        self.assertEqual(loaded.to_pem(), pem)

    def test_pem_refused(self) -> None:
        """Garbage, other key types and curves, and encrypted keys are refused with E2EError."""
        p384 = ec.generate_private_key(ec.SECP384R1())
        ed = ed25519.Ed25519PrivateKey.generate()
        encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        for pem in [
            b"",
            b"not a key",
            BRIDGE.to_pem()[:100],
            p384.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ed.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            encrypted,
        ]:
            self.assertRaises(E2EError, Identity.from_pem, pem)

    def test_raw_public_key(self) -> None:
        """The public key is the 65-byte uncompressed point of the private key."""
        self.assertEqual(len(BRIDGE.public_raw), 65)
        self.assertEqual(BRIDGE.public_raw[0], 0x04)
        self.assertEqual(fixed_identity(1).public_raw.hex()[2:66], ec_generator_x())

    def test_signature_format(self) -> None:
        """Signatures are 64-byte r || s that verify as ECDSA-SHA256 after conversion to DER."""
        for _ in range(20):  # short r or s values are padded to 32 bytes each
            signature = BROWSER.sign(b"message")
            self.assertEqual(len(signature), 64)
            p1363_verify(public(BROWSER), signature, b"message")
            self.assertTrue(verify_signature(BROWSER.public_raw, signature, b"message"))

    def test_verify_refuses(self) -> None:
        """verify_signature says False, without raising, to anything but a valid signature."""
        signature = BROWSER.sign(b"m")
        r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
        high_s = r.to_bytes(32) + (P256_ORDER - s).to_bytes(32)
        self.assertTrue(verify_signature(BROWSER.public_raw, high_s, b"m"))  # ECDSA allows it
        cases: list[tuple[Any, Any, Any]] = [
            (BROWSER.public_raw, signature, b"n"),
            (BRIDGE.public_raw, signature, b"m"),
            (BROWSER.public_raw, signature[:63], b"m"),
            (BROWSER.public_raw, signature + b"\x00", b"m"),
            (BROWSER.public_raw, bytes(64), b"m"),
            (BROWSER.public_raw, b"\xff" * 64, b"m"),
            (BROWSER.public_raw, bytes(32) + signature[32:], b"m"),
            (BROWSER.public_raw, signature[:32] + P256_ORDER.to_bytes(32), b"m"),
            (BROWSER.public_raw, P256_ORDER.to_bytes(32) + signature[32:], b"m"),
            (BROWSER.public_raw[:64], signature, b"m"),
            (b"\x02" + BROWSER.public_raw[1:33], signature, b"m"),
            (off_curve(), signature, b"m"),
            (BROWSER.public_raw, signature.hex(), b"m"),
            (None, signature, b"m"),
            (BROWSER.public_raw, None, b"m"),
            (BROWSER.public_raw, signature, None),
            (BROWSER.public_raw, signature, "m"),
        ]
        for public, sig, data in cases:
            self.assertFalse(verify_signature(public, sig, data))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=70), st.binary(max_size=70), st.binary(max_size=20))
    def test_verify_garbage(self, public: bytes, signature: bytes, data: bytes) -> None:
        """Random keys and signatures verify as False and never raise."""
        self.assertFalse(verify_signature(public, signature, data))
        self.assertFalse(verify_signature(BROWSER.public_raw, signature, data))


def ec_generator_x() -> str:
    """The X coordinate of P-256's generator (SEC 2), in hex."""
    return "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"


class Base64UrlTests(SynchronousTestCase):
    """Binary values in JSON: base64url without padding, one spelling per value."""

    @given(st.binary(max_size=100))
    def test_round_trip(self, data: bytes) -> None:
        """Encoding has no padding and only URL-safe characters, and decodes back."""
        text = b64u(data)
        self.assertRegex(text, r"\A[A-Za-z0-9_-]*\Z")
        self.assertEqual(unb64u(text), data)

    def test_refused(self) -> None:
        """Padding, whitespace, the standard alphabet, bad lengths and spare bits are refused."""
        for text in [
            "AA==",
            "AA=",
            "A",
            "AAAAA",
            " AA",
            "AA\n",
            "+w",
            "/w",
            "AB",
            "AAB",
            "é",
            "\uff21\uff21",
        ]:
            self.assertRaises(E2EError, unb64u, text)
        self.assertEqual(unb64u("_w"), b"\xff")
        self.assertEqual(unb64u(""), b"")

    def test_not_text(self) -> None:
        """Anything but a str (as JSON may give) is refused with E2EError."""
        for value in [None, 1, b"AA", ["AA"]]:
            self.assertRaises(E2EError, unb64u, value)


def _scalar(label: bytes) -> int:
    """A private scalar anyone can recompute: SHA-256 of C{label}, reduced mod the order."""
    return int.from_bytes(sha256(label)) % P256_ORDER


#: The known-answer vectors of docs/e2e.md: the scalars and nonces they are made from.
VECTOR_INPUTS = {
    "browser.d": _scalar(b"coder1 vector: browser identity"),
    "bridge.d": _scalar(b"coder1 vector: bridge identity"),
    "offer.eph.d": _scalar(b"coder1 vector: browser ephemeral"),
    "answer.eph.d": _scalar(b"coder1 vector: bridge ephemeral"),
}
VECTOR_PEER, VECTOR_CHANNEL, VECTOR_STREAM = 1, 0x5A17C3E9, 0x9C41E2A7
VECTOR_NONCES = (sha256(b"coder1 vector: offer nonce")[:16], sha256(b"coder1 vector: answer")[:16])


def render_vectors(testcase: SynchronousTestCase) -> tuple[str, SecureChannel, SecureChannel]:
    """
    The vectors block of docs/e2e.md, computed with L{e2e} from L{VECTOR_INPUTS} (its
    ephemeral keys and nonces patched in), and the two ends' channels.
    """
    d = VECTOR_INPUTS
    browser, bridge = fixed_identity(d["browser.d"]), fixed_identity(d["bridge.d"])
    eph_b = ec.derive_private_key(d["offer.eph.d"], ec.SECP256R1())
    eph_r = ec.derive_private_key(d["answer.eph.d"], ec.SECP256R1())
    ephemerals, nonces = iter([eph_b, eph_r]), iter(VECTOR_NONCES)
    testcase.patch(e2e, "_new_ephemeral", lambda: next(ephemerals))
    testcase.patch(e2e, "_random_bytes", lambda size: next(nonces))
    initiator = Initiator(browser, bridge.public_raw, VECTOR_PEER, VECTOR_CHANNEL)
    offer = initiator.offer()
    answer, down = Responder.answer(bridge, browser.public_raw, VECTOR_PEER, offer)
    up = initiator.accept(answer)
    offer_body, answer_body = offer.json(), answer.json()
    offer_bytes = (
        b"coder1-offer-v1\x00"
        + VECTOR_CHANNEL.to_bytes(4)
        + VECTOR_PEER.to_bytes(4)
        + raw(eph_b)
        + VECTOR_NONCES[0]
        + bridge.public_raw
    )
    answer_bytes = b"coder1-answer-v1\x00" + sha256(offer_bytes) + raw(eph_r) + VECTOR_NONCES[1]
    shared = eph_b.exchange(ec.ECDH(), eph_r.public_key())
    salt = sha256(offer_bytes + answer_bytes)
    okm = hkdf_sha256(shared, salt, b"coder1-e2e-v1", 64)
    frame_up = Envelope(Kind.PTY_INPUT, VECTOR_STREAM, 1, VECTOR_PEER, b"exit\r")
    frame_down = Envelope(Kind.PTY_OUTPUT, VECTOR_STREAM, 33, VECTOR_PEER, b"$ ")
    sealed_up, sealed_down = up.seal(frame_up), down.seal(frame_down)
    lines = [
        ("browser.d", f"{d['browser.d']:064x}"),
        ("browser.raw", browser.public_raw.hex()),
        ("bridge.d", f"{d['bridge.d']:064x}"),
        ("bridge.raw", bridge.public_raw.hex()),
        ("sas", sas(browser.public_raw, bridge.public_raw)),
        ("peer", str(VECTOR_PEER)),
        ("channel", f"{VECTOR_CHANNEL:08x}"),
        ("offer.eph.d", f"{d['offer.eph.d']:064x}"),
        ("offer.eph.raw", raw(eph_b).hex()),
        ("offer.nonce", VECTOR_NONCES[0].hex()),
        ("offer.bytes", offer_bytes.hex()),
        ("offer.sig", unb64u(offer_body["sig"]).hex()),
        ("answer.eph.d", f"{d['answer.eph.d']:064x}"),
        ("answer.eph.raw", raw(eph_r).hex()),
        ("answer.nonce", VECTOR_NONCES[1].hex()),
        ("answer.bytes", answer_bytes.hex()),
        ("answer.sig", unb64u(answer_body["sig"]).hex()),
        ("ecdh.shared", shared.hex()),
        ("hkdf.salt", salt.hex()),
        ("hkdf.info", b"coder1-e2e-v1".hex()),
        ("hkdf.okm", okm.hex()),
        ("k_up", okm[:32].hex()),
        ("k_down", okm[32:].hex()),
        ("up.header", frame_up.encode()[:20].hex()),
        ("up.plaintext", frame_up.payload.hex()),
        ("up.payload", sealed_up.payload.hex()),
        ("down.header", frame_down.encode()[:20].hex()),
        ("down.plaintext", frame_down.payload.hex()),
        ("down.payload", sealed_down.payload.hex()),
    ]
    return "".join(f"{name:<15} {value}\n" for name, value in lines), up, down


class DocumentVectorsTests(SynchronousTestCase):
    """The known-answer vectors in docs/e2e.md are what the code computes."""

    def test_vectors(self) -> None:
        """
        Every value of the vectors block is recomputed from the scalars and nonces the
        block gives, with this module, and matches: identities, SAS, offer and answer
        byte strings, ECDH, HKDF (salt, info, okm, both keys), and one sealed frame each
        way (which also opens).  ECDSA signatures are randomised, so the two in the
        block are checked by verifying them.  CODER1_REGENERATE_DOCS=1 rewrites the block.
        """
        rendered, up, down = render_vectors(self)
        documented = dict(
            line.split(maxsplit=1)
            for line in check_block("e2e.md", "vectors", rendered).splitlines()
        )
        expected = dict(line.split(maxsplit=1) for line in rendered.splitlines())
        self.assertEqual(set(documented), set(expected))
        for name in ("browser.d", "bridge.d", "offer.eph.d", "answer.eph.d"):
            self.assertEqual(int(documented[name], 16), VECTOR_INPUTS[name], name)
        for name, value in expected.items():
            if not name.endswith(".sig"):
                self.assertEqual(documented[name], value, name)
        for side, key in (("offer", "browser.raw"), ("answer", "bridge.raw")):
            signed = bytes.fromhex(documented[f"{side}.bytes"])
            signature = bytes.fromhex(documented[f"{side}.sig"])
            self.assertTrue(verify_signature(bytes.fromhex(documented[key]), signature, signed))
        for sender, receiver in (("up", down), ("down", up)):
            frame = decode(
                bytes.fromhex(documented[f"{sender}.header"] + documented[f"{sender}.payload"])
            )
            self.assertEqual(receiver.open(frame).payload.hex(), documented[f"{sender}.plaintext"])
