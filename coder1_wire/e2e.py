"""
End-to-end encryption between the browser and the bridge, as docs/e2e.md specifies it.

Sans-IO: this module turns envelopes into envelopes and raises; the caller sends, logs and
decides.  The browser's JavaScript implements the same text, so every byte string below is
built exactly as the document writes it (labels, order, lengths, big-endian integers).

Roles: the L{Initiator} is the browser (this Python version serves tests and tools), the
L{Responder} is the bridge.  Both end with a L{SecureChannel} that seals and opens frames.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import struct
from typing import Any, NoReturn

import attrs
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from coder1_wire.envelope import HEADER, WIRE_VERSION, Envelope, Kind, control

PROTOCOL_VERSION = 1
RAW_KEY_SIZE = 65
SIGNATURE_SIZE = 64
NONCE_SIZE = 16
MAX_U32 = 0xFFFF_FFFF

_OFFER_LABEL = b"coder1-offer-v1\x00"
_ANSWER_LABEL = b"coder1-answer-v1\x00"
_SAS_LABEL = b"coder1-sas-v1\x00"
_HKDF_INFO = b"coder1-e2e-v1"
_SAS_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: The first u32 of a sealed frame's IV: which way the frame travels.
_UP = 0  # browser -> bridge, sealed with k_up
_DOWN = 1  # bridge -> browser, sealed with k_down

_U32 = struct.Struct("!I")
_PREFIX = struct.Struct("!IQ")  # u32(C) || u64(n), in front of every sealed payload
_IV = struct.Struct("!IQ")  # u32(direction) || u64(n)
_TAG_SIZE = 16
#: The shortest sealed payload: the prefix and the tag of an empty plaintext.
SEALED_OVERHEAD = _PREFIX.size + _TAG_SIZE

_FIELDS = frozenset({"v", "channel", "eph", "nonce", "sig"})
_B64U = re.compile(r"[A-Za-z0-9_-]*")


class E2EError(Exception):
    """A handshake failed.  C{str()} is a short reason that can be shown to the user."""


class IntegrityError(E2EError):
    """
    A sealed frame was refused and must not be acted on.

    @ivar verdict: C{"tampered"}, C{"replayed"} or C{"dropped"} (docs/e2e.md's table).
    """

    def __init__(self, verdict: str, message: str) -> None:
        super().__init__(f"{verdict}: {message}")
        self.verdict = verdict


def b64u(data: bytes) -> str:
    """Base64url without padding, how JSON carries every binary value."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    """
    Decode what L{b64u} makes, and only that: no padding, no whitespace, no C{+/}, and no
    non-zero spare bits (so each value has one spelling, whichever side encoded it).
    """
    if not isinstance(text, str) or not _B64U.fullmatch(text) or len(text) % 4 == 1:
        raise E2EError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64u(data) != text:
        raise E2EError("not canonical base64url")
    return data


def _public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its 65-byte uncompressed point; E2EError for anything else."""
    # from_encoded_point would also take a compressed point: the wire format allows one form.
    if not isinstance(raw, bytes) or len(raw) != RAW_KEY_SIZE or raw[0] != 0x04:
        raise E2EError("not an uncompressed P-256 point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as e:  # not on the curve
        raise E2EError("not a point on P-256") from e


def check_public_key(raw: bytes) -> bytes:
    """C{raw} if it is a P-256 public key in the wire form; E2EError otherwise."""
    _public_key(raw)
    return raw


def _raw(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# Module-level so that tests can replace them with fixed values (known-answer tests).
def _new_ephemeral() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _random_bytes(size: int) -> bytes:
    return secrets.token_bytes(size)


def _random_channel() -> int:
    return secrets.randbelow(MAX_U32) + 1


class Identity:
    """A long-term ECDSA P-256 key pair: the bridge's (identity.pem), or a browser's in tests."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public_raw = _raw(key.public_key())

    @classmethod
    def generate(cls) -> Identity:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        """Load an unencrypted PEM private key; E2EError unless it is a P-256 key."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            # TypeError: the key is encrypted (we never write encrypted keys).
            raise E2EError("the identity file is not an unencrypted PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise E2EError("the identity file does not hold a P-256 key")
        return cls(key)

    def to_pem(self) -> bytes:
        """PKCS8 PEM, unencrypted: write it with L{coder1_wire.secretfile.write_secret}."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_raw(self) -> bytes:
        """The public key as a 65-byte uncompressed point, what the other side pins."""
        return self._public_raw

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 of C{data} as 64-byte P1363 C{r || s} (WebCrypto's format, not DER)."""
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify_signature(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    """Whether C{signature} (P1363) is C{public_raw}'s over C{data}.  Never raises."""
    try:
        key = _public_key(public_raw)
    except E2EError:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        return False
    # r and s out of [1, n-1] (zero, or >= the group order) are refused by the verification.
    der = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def sas(browser_raw: bytes, bridge_raw: bytes) -> str:
    """The short authentication string both ends show for a pairing: C{XXXX-XXXX-XXXX}."""
    # Both are checked points, so the concatenation below is unambiguous.
    _public_key(browser_raw)
    _public_key(bridge_raw)
    digest = _sha256(_SAS_LABEL + browser_raw + bridge_raw)
    bits = int.from_bytes(digest[:8], "big") >> 4  # the first 60 bits
    text = "".join(_SAS_ALPHABET[(bits >> shift) & 31] for shift in range(55, -1, -5))
    return f"{text[0:4]}-{text[4:8]}-{text[8:12]}"


def _offer_bytes(channel: int, peer: int, eph_raw: bytes, nonce: bytes, bridge_raw: bytes) -> bytes:
    return _OFFER_LABEL + _U32.pack(channel) + _U32.pack(peer) + eph_raw + nonce + bridge_raw


def _answer_bytes(offer: bytes, eph_raw: bytes, nonce: bytes) -> bytes:
    return _ANSWER_LABEL + _sha256(offer) + eph_raw + nonce


def _hello_body(channel: int, eph_raw: bytes, nonce: bytes, sig: bytes) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "channel": channel,
        "eph": b64u(eph_raw),
        "nonce": b64u(nonce),
        "sig": b64u(sig),
    }


@attrs.frozen
class _Hello:
    """A checked KEY_OFFER or KEY_ANSWER body; the signature is not verified yet."""

    channel: int
    eph: ec.EllipticCurvePublicKey
    eph_raw: bytes
    nonce: bytes
    sig: bytes


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key could be read differently by the browser's JSON.parse (last wins).
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _parse_hello(envelope: Envelope, kind: Kind, peer: int, what: str) -> _Hello:
    if envelope.kind != kind:
        raise E2EError(f"expected a {what}, got a frame of kind 0x{envelope.kind:02x}")
    if envelope.peer != peer:
        raise E2EError(f"the {what} names bridge {envelope.peer}, not {peer}")
    if envelope.stream != 0 or envelope.seq != 0:
        raise E2EError(f"the {what} is not on stream 0, seq 0")
    try:
        body = json.loads(
            envelope.payload.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise E2EError(f"the {what} is not JSON") from e
    if not isinstance(body, dict) or set(body) != _FIELDS:
        raise E2EError(f"the {what} must have exactly the fields {', '.join(sorted(_FIELDS))}")
    # type() rather than isinstance(): JSON true is a Python bool, which is an int.
    if type(body["v"]) is not int or body["v"] != PROTOCOL_VERSION:
        raise E2EError(f"the {what} is of an unsupported version")
    channel = body["channel"]
    if type(channel) is not int or not 0 < channel <= MAX_U32:
        raise E2EError(f"the {what}'s channel is not a non-zero u32")
    eph_raw = _binary(body, "eph", RAW_KEY_SIZE, what)
    try:
        eph = _public_key(eph_raw)
    except E2EError as e:
        raise E2EError(f"the {what}'s eph is {e}") from e
    nonce = _binary(body, "nonce", NONCE_SIZE, what)
    sig = _binary(body, "sig", SIGNATURE_SIZE, what)
    return _Hello(channel, eph, eph_raw, nonce, sig)


def _binary(body: dict[str, Any], field: str, size: int, what: str) -> bytes:
    try:
        value = unb64u(body[field])
    except E2EError as e:
        raise E2EError(f"the {what}'s {field} is {e}") from e
    if len(value) != size:
        raise E2EError(f"the {what}'s {field} is not {size} bytes")
    return value


def _refusal(key_error: Envelope, channel: int) -> str:
    # KEY_ERROR is plaintext the relay could have written: only a hint, shown as text.
    try:
        body = json.loads(key_error.payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return "the bridge refused a key offer"
    if body.get("channel") != channel:
        return "the bridge refused another channel's key offer"
    message = body.get("message")
    if isinstance(message, str) and message.isprintable():
        return f"the bridge refused the key offer: {message[:200]}"
    return "the bridge refused the key offer"


def _derive(
    mine: ec.EllipticCurvePrivateKey,
    theirs: ec.EllipticCurvePublicKey,
    offer: bytes,
    answer: bytes,
    channel: int,
    direction: int,
) -> SecureChannel:
    shared = mine.exchange(ec.ECDH(), theirs)  # the X coordinate, 32 bytes
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=_sha256(offer + answer), info=_HKDF_INFO
    ).derive(shared)
    k_up, k_down = okm[:32], okm[32:]
    if direction == _UP:
        return SecureChannel(channel, k_up, _UP, k_down, _DOWN)
    return SecureChannel(channel, k_down, _DOWN, k_up, _UP)


class Initiator:
    """
    The browser's side of one handshake: a fresh ephemeral key, one offer, one answer.

    @ivar channel: C{C}, this channel's number (random unless given).
    """

    def __init__(
        self, identity: Identity, bridge_raw: bytes, peer: int, channel: int | None = None
    ) -> None:
        self._bridge_raw = bridge_raw
        _public_key(bridge_raw)  # a bad pin is a bug to report now, not a bad answer later
        if channel is None:
            channel = _random_channel()
        if not 0 < channel <= MAX_U32 or not 0 <= peer <= MAX_U32:
            raise E2EError("the channel must be a non-zero u32 and the peer a u32")
        self.channel = channel
        self._peer = peer
        self._ephemeral = _new_ephemeral()
        eph_raw = _raw(self._ephemeral.public_key())
        nonce = _random_bytes(NONCE_SIZE)
        self._offer = _offer_bytes(channel, peer, eph_raw, nonce, bridge_raw)
        self._body = _hello_body(channel, eph_raw, nonce, identity.sign(self._offer))
        self._answered = False

    def offer(self) -> Envelope:
        """The KEY_OFFER frame (stream 0, seq 0, addressed to the bridge)."""
        return control(Kind.KEY_OFFER, self._body, peer=self._peer)

    def accept(self, answer: Envelope) -> SecureChannel:
        """
        Check the bridge's KEY_ANSWER and derive the channel's keys.

        A failed answer leaves this initiator usable (it may have been another tab's, or
        forged by the relay); a successful one ends it, so the keys are derived only once.
        """
        if self._answered:
            raise E2EError("this key offer was already answered")
        if answer.kind == Kind.KEY_ERROR:
            raise E2EError(_refusal(answer, self.channel))
        hello = _parse_hello(answer, Kind.KEY_ANSWER, self._peer, "key answer")
        if hello.channel != self.channel:
            raise E2EError("the key answer is for another channel")
        answer_bytes = _answer_bytes(self._offer, hello.eph_raw, hello.nonce)
        if not verify_signature(self._bridge_raw, hello.sig, answer_bytes):
            raise E2EError("the bridge's signature does not verify with its paired key")
        self._answered = True
        return _derive(self._ephemeral, hello.eph, self._offer, answer_bytes, self.channel, _UP)


class Responder:
    """The bridge's side of a handshake: stateless, one call per KEY_OFFER."""

    @staticmethod
    def answer(
        identity: Identity, browser_raw: bytes, peer: int, offer: Envelope
    ) -> tuple[Envelope, SecureChannel]:
        """
        Check a KEY_OFFER against the pinned browser key and answer it.

        @param identity: this bridge's identity.
        @param browser_raw: the browser key pinned at pairing.
        @param peer: this bridge's number; the offer must name it.
        @return: the KEY_ANSWER to send and the new channel.
        @raise E2EError: the offer is malformed, or not signed by the pinned browser for
            this bridge's identity and number (its signature covers both).
        """
        try:
            _public_key(browser_raw)
        except E2EError as e:
            raise E2EError("the pinned browser key is not a P-256 public key") from e
        hello = _parse_hello(offer, Kind.KEY_OFFER, peer, "key offer")
        # Rebuilt from what this bridge knows itself to be: an offer the browser made for
        # another bridge identity (a relay substituting keys) cannot verify here.
        offer_bytes = _offer_bytes(
            hello.channel, peer, hello.eph_raw, hello.nonce, identity.public_raw
        )
        if not verify_signature(browser_raw, hello.sig, offer_bytes):
            raise E2EError(
                "the key offer's signature does not verify: another browser, "
                "or one that pinned another bridge key"
            )
        ephemeral = _new_ephemeral()
        eph_raw = _raw(ephemeral.public_key())
        nonce = _random_bytes(NONCE_SIZE)
        answer_bytes = _answer_bytes(offer_bytes, eph_raw, nonce)
        body = _hello_body(hello.channel, eph_raw, nonce, identity.sign(answer_bytes))
        channel = _derive(ephemeral, hello.eph, offer_bytes, answer_bytes, hello.channel, _DOWN)
        return control(Kind.KEY_ANSWER, body, peer=peer), channel


def _header(envelope: Envelope) -> bytes:
    # Exactly the 20 bytes Envelope.encode() puts in front of the payload (flags are 0).
    return HEADER.pack(WIRE_VERSION, envelope.kind, 0, envelope.peer, envelope.stream, envelope.seq)


class SecureChannel:
    """
    One channel's keys and its two frame counters.

    @ivar channel: C{C}, the number every sealed payload starts with.
    """

    def __init__(
        self,
        channel: int,
        send_key: bytes,
        send_direction: int,
        receive_key: bytes,
        receive_direction: int,
    ) -> None:
        self.channel = channel
        self._send = AESGCM(send_key)
        self._send_direction = send_direction
        self._receive = AESGCM(receive_key)
        self._receive_direction = receive_direction
        self._sent = 0  # n of the next frame sealed
        self._expected = 0  # n of the next frame accepted

    def seal(self, envelope: Envelope) -> Envelope:
        """The same frame with its payload sealed: u32(C) || u64(n) || ciphertext and tag."""
        header = _header(envelope)
        payload = self._seal(header, envelope.payload)
        return Envelope(envelope.kind, envelope.stream, envelope.seq, envelope.peer, payload)

    def seal_frame(self, envelope: Envelope) -> bytes:
        """C{seal(envelope).encode()}, with the header packed once."""
        header = _header(envelope)
        return header + self._seal(header, envelope.payload)

    def _seal(self, header: bytes, payload: bytes) -> bytes:
        n = self._sent
        prefix = _PREFIX.pack(self.channel, n)  # struct refuses n >= 2**64: no IV is reused
        sealed = self._send.encrypt(_IV.pack(self._send_direction, n), payload, header + prefix)
        self._sent = n + 1
        return prefix + sealed

    def open(self, envelope: Envelope) -> Envelope:
        """
        The same frame with its payload opened, if it is the next one of this channel.

        @raise IntegrityError: the frame must be ignored; the counter did not move.
        """
        payload = envelope.payload
        if len(payload) < SEALED_OVERHEAD:
            raise IntegrityError("tampered", "the frame is too short to be sealed")
        channel, n = _PREFIX.unpack_from(payload)
        if channel != self.channel:
            raise IntegrityError("tampered", "the frame belongs to another channel")
        # The tag is checked before n is judged, so "replayed" and "dropped" are verdicts
        # about genuine frames, and a changed n reads as what it is: tampering.
        try:
            plaintext = self._receive.decrypt(
                _IV.pack(self._receive_direction, n),
                payload[_PREFIX.size :],
                _header(envelope) + payload[: _PREFIX.size],
            )
        except InvalidTag:
            raise IntegrityError("tampered", "the frame does not verify") from None
        if n < self._expected:
            raise IntegrityError("replayed", f"frame {n} again (expected {self._expected})")
        if n > self._expected:
            missing = n - self._expected
            raise IntegrityError(
                "dropped", f"{missing} frame{'s' if missing > 1 else ''} missing or reordered"
            )
        self._expected = n + 1
        return Envelope(envelope.kind, envelope.stream, envelope.seq, envelope.peer, plaintext)


def channel_of(envelope: Envelope) -> int | None:
    """
    The channel a sealed frame claims to belong to (to pick the L{SecureChannel} that opens
    it), or None if the payload is too short to be a sealed frame at all.
    """
    if len(envelope.payload) < SEALED_OVERHEAD:
        return None
    channel: int = _U32.unpack_from(envelope.payload)[0]
    return channel
