"""Tests for L{coder1_relay.tokens}: every way a bad token is refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay import tokens
from coder1_relay.tokens import TokenAuthority, TokenError, issuer_for


def _authority(clock: Clock, key: Ed25519PrivateKey | None = None) -> TokenAuthority:
    return TokenAuthority(key or Ed25519PrivateKey.generate(), "coder1-relay:test", clock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class BridgeTokenTests(SynchronousTestCase):
    """Bridge tokens verify only when signed here, for a bridge, unexpired."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.authority = _authority(self.clock)

    def test_round_trip(self) -> None:
        """A fresh token verifies to the session and peer it was issued for."""
        token, issued = self.authority.issue_bridge_token("session-a", 3)
        claims = self.authority.verify_bridge_token(token)
        self.assertEqual((claims.session, claims.peer, claims.jti), ("session-a", 3, issued.jti))

    def test_claims_present(self) -> None:
        """A token carries iss, aud, sub, jti, iat and exp, and unique jtis."""
        token, _ = self.authority.issue_bridge_token("s", 1)
        other, _ = self.authority.issue_bridge_token("s", 1)
        body = jwt.decode(token, options={"verify_signature": False})
        self.assertLessEqual({"iss", "aud", "sub", "jti", "iat", "exp"}, set(body))
        self.assertNotEqual(
            body["jti"], jwt.decode(other, options={"verify_signature": False})["jti"]
        )

    def test_expired(self) -> None:
        """A token is refused from its exp on, by the injected clock."""
        token, claims = self.authority.issue_bridge_token("s", 1)
        self.clock.advance(claims.expires_at - self.clock.seconds() - 1)
        self.authority.verify_bridge_token(token)
        self.clock.advance(1)
        self.assertRaisesRegex(TokenError, "expired", self.authority.verify_bridge_token, token)

    def test_tampered(self) -> None:
        """Changing a claim (the session) breaks the signature."""
        token, _ = self.authority.issue_bridge_token("victim", 1)
        header, body, sig = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["sub"] = "attacker"
        forged = ".".join([header, _b64(json.dumps(claims).encode()), sig])
        self.assertRaisesRegex(TokenError, "signature", self.authority.verify_bridge_token, forged)

    def test_alg_none(self) -> None:
        """An unsigned C{alg: none} token is refused."""
        _, claims = self.authority.issue_bridge_token("s", 1)
        body = {
            "iss": "coder1-relay:test",
            "aud": "coder1-bridge",
            "sub": "s",
            "jti": "x",
            "iat": int(self.clock.seconds()),
            "exp": int(claims.expires_at),
            "peer": 1,
        }
        unsigned = jwt.encode(body, "", algorithm="none")
        self.assertRaises(TokenError, self.authority.verify_bridge_token, unsigned)

    def test_hmac_with_public_key(self) -> None:
        """An HS256 token keyed with the relay's public key (algorithm confusion) is refused."""
        public = self.authority.signing_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        now = int(self.clock.seconds())
        body = _b64(
            json.dumps(
                {
                    "iss": "coder1-relay:test",
                    "aud": "coder1-bridge",
                    "sub": "s",
                    "jti": "x",
                    "iat": now,
                    "exp": now + 100,
                    "peer": 1,
                }
            ).encode()
        )
        import hashlib
        import hmac

        sig = _b64(hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest())
        self.assertRaisesRegex(
            TokenError, "algorithm", self.authority.verify_bridge_token, f"{header}.{body}.{sig}"
        )

    def test_other_key(self) -> None:
        """A token signed by another relay's key is refused."""
        other = _authority(self.clock)
        token, _ = other.issue_bridge_token("s", 1)
        self.assertRaisesRegex(TokenError, "signature", self.authority.verify_bridge_token, token)

    def test_wrong_audience(self) -> None:
        """A browser session cookie cannot be used as a bridge token."""
        _, cookie = self.authority.issue_browser_session()
        self.assertRaisesRegex(TokenError, "audience", self.authority.verify_bridge_token, cookie)

    def test_wrong_issuer(self) -> None:
        """Same key, other issuer name: refused."""
        other = TokenAuthority(self.authority.signing_key, "coder1-relay:other", self.clock)
        token, _ = other.issue_bridge_token("s", 1)
        self.assertRaisesRegex(
            TokenError, "another relay", self.authority.verify_bridge_token, token
        )

    def test_missing_claim(self) -> None:
        """A correctly signed token without a jti is refused."""
        now = int(self.clock.seconds())
        token = jwt.encode(
            {
                "iss": "coder1-relay:test",
                "aud": "coder1-bridge",
                "sub": "s",
                "iat": now,
                "exp": now + 10,
                "peer": 1,
            },
            self.authority.signing_key,
            algorithm="EdDSA",
        )
        self.assertRaisesRegex(TokenError, "jti", self.authority.verify_bridge_token, token)

    def test_garbage(self) -> None:
        """Garbage is refused as malformed, not with a crash."""
        for junk in ["", "a.b.c", "\x00\xff", "e30.e30.", "x" * 5000]:
            self.assertRaises(TokenError, self.authority.verify_bridge_token, junk)

    def test_issued_in_future(self) -> None:
        """A token whose iat is well ahead of the relay's clock is refused."""
        token, _ = self.authority.issue_bridge_token("s", 1)
        self.clock.advance(-3600)
        self.assertRaisesRegex(TokenError, "future", self.authority.verify_bridge_token, token)


class BrowserSessionTests(SynchronousTestCase):
    """Session cookies are signed, so a relay with the same key keeps them valid."""

    def test_survives_restart(self) -> None:
        """A new authority with the same key (a restarted relay) accepts an old cookie."""
        clock = Clock()
        clock.advance(1_800_000_000)
        key = Ed25519PrivateKey.generate()
        session, cookie = _authority(clock, key).issue_browser_session()
        self.assertEqual(_authority(clock, key).verify_browser_session(cookie), session)

    def test_bridge_token_is_not_a_cookie(self) -> None:
        """A bridge token does not open a browser session."""
        clock = Clock()
        clock.advance(1_800_000_000)
        authority = _authority(clock)
        token, _ = authority.issue_bridge_token("s", 1)
        self.assertRaises(TokenError, authority.verify_browser_session, token)


class KeyRingTests(SynchronousTestCase):
    """After a key rotation, tokens signed with a key in the ring still verify; others do not."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.old_key = Ed25519PrivateKey.generate()
        self.old = TokenAuthority(self.old_key, issuer_for(self.old_key.public_key()), self.clock)
        self.new_key = Ed25519PrivateKey.generate()

    def rotated(self, *accepted: Ed25519PrivateKey) -> TokenAuthority:
        return TokenAuthority(
            self.new_key,
            issuer_for(self.new_key.public_key()),
            self.clock,
            accepted={issuer_for(k.public_key()): k.public_key() for k in accepted},
        )

    def test_old_tokens_accepted_while_in_ring(self) -> None:
        """A bridge token and a browser cookie of the old key verify with it in the ring."""
        token, issued = self.old.issue_bridge_token("s", 2)
        _, cookie = self.old.issue_browser_session()
        ring = self.rotated(self.old_key)
        self.assertEqual(ring.verify_bridge_token(token).jti, issued.jti)
        ring.verify_browser_session(cookie)
        fresh, _ = ring.issue_bridge_token("s", 3)
        self.assertEqual(
            jwt.decode(fresh, options={"verify_signature": False})["iss"],
            issuer_for(self.new_key.public_key()),
        )

    def test_old_tokens_refused_once_dropped(self) -> None:
        """Without the old key in the ring, its tokens are refused."""
        token, _ = self.old.issue_bridge_token("s", 2)
        self.assertRaises(TokenError, self.rotated().verify_bridge_token, token)

    def test_forged_issuer_of_ring_key(self) -> None:
        """A token naming an old key's issuer but signed with another key is refused."""
        forger = TokenAuthority(
            Ed25519PrivateKey.generate(), issuer_for(self.old_key.public_key()), self.clock
        )
        token, _ = forger.issue_bridge_token("s", 2)
        self.assertRaisesRegex(
            TokenError, "signature", self.rotated(self.old_key).verify_bridge_token, token
        )


class NodeTokenTests(SynchronousTestCase):
    """Node tokens (several relay nodes) carry one connection's facts, and only those."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.authority = _authority(self.clock)

    def test_round_trip(self) -> None:
        """What the accepting node learned arrives as it was sent."""
        token = self.authority.issue_node_token("s", "bridge", "c1", {"peer": 4})
        claims = self.authority.verify_node_token(token)
        self.assertEqual(
            (claims.session, claims.role, claims.connection_id, claims.attach),
            ("s", "bridge", "c1", {"peer": 4}),
        )

    def test_short_lived(self) -> None:
        """A node token is good for a minute: it is used at once."""
        token = self.authority.issue_node_token("s", "ide", "c1", {})
        self.clock.advance(60)
        self.assertRaisesRegex(TokenError, "expired", self.authority.verify_node_token, token)

    def test_other_tokens_are_not_node_tokens(self) -> None:
        """A bridge token or a browser cookie cannot open a node link."""
        bridge, _ = self.authority.issue_bridge_token("s", 1)
        _, cookie = self.authority.issue_browser_session()
        for token in (bridge, cookie):
            self.assertRaisesRegex(TokenError, "audience", self.authority.verify_node_token, token)
        node = self.authority.issue_node_token("s", "ide", "c1", {})
        self.assertRaises(TokenError, self.authority.verify_bridge_token, node)


class _CountingKey(Ed25519PrivateKey):
    """An Ed25519 key that counts how often its public half is derived."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.derived = 0

    def public_key(self) -> Ed25519PublicKey:
        self.derived += 1
        return self.key.public_key()

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        return self.key.sign(data)

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        return self.key.private_bytes(*args, **kwargs)

    def private_bytes_raw(self) -> bytes:
        return self.key.private_bytes_raw()

    def __copy__(self) -> _CountingKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _CountingKey:
        return self


class PublicKeyTests(SynchronousTestCase):
    """The signing key's public half is derived once, not per verification."""

    def test_public_key_derived_once(self) -> None:
        """Verifying many tokens derives the public key once, at construction."""
        clock = Clock()
        clock.advance(1_800_000_000)
        key = _CountingKey()
        authority = TokenAuthority(key, "coder1-relay:test", clock)
        token, _ = authority.issue_bridge_token("s", 1)
        for _ in range(5):
            self.assertEqual(authority.verify_bridge_token(token).session, "s")
        self.assertEqual(key.derived, 1)


class VerifiedTokensTests(SynchronousTestCase):
    """
    A token presented again is not verified again (L{VerifiedTokens}), yet is
    refused as soon as it expires, and only ever for its own audience.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.authority = _authority(self.clock)
        self.checks = 0
        decode = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.checks += 1
            return decode(*args, **kwargs)

        self.patch(tokens.jwt, "decode", counting)

    def test_issued_tokens_need_no_check(self) -> None:
        """A bridge token and a cookie issued here verify, again and again, unchecked."""
        token, _ = self.authority.issue_bridge_token("s", 1)
        session, cookie = self.authority.issue_browser_session()
        for _ in range(3):
            self.assertEqual(self.authority.verify_bridge_token(token).peer, 1)
            self.assertEqual(self.authority.verify_browser_session(cookie), session)
        self.assertEqual(self.checks, 0)

    def test_checked_once(self) -> None:
        """A token this authority did not issue itself (a restart) is checked once."""
        token, _ = _authority(self.clock, self.authority.signing_key).issue_bridge_token("s", 2)
        for _ in range(3):
            self.assertEqual(self.authority.verify_bridge_token(token).peer, 2)
        self.assertEqual(self.checks, 1)

    def test_remembered_token_expires(self) -> None:
        """A token remembered as checked is refused from its exp on, as any other."""
        token, claims = self.authority.issue_bridge_token("s", 1)
        self.authority.verify_bridge_token(token)
        self.clock.advance(claims.expires_at - self.clock.seconds())
        self.assertRaisesRegex(TokenError, "expired", self.authority.verify_bridge_token, token)
        _, cookie = self.authority.issue_browser_session()
        self.clock.advance(self.authority.browser_lifetime)
        self.assertRaisesRegex(TokenError, "expired", self.authority.verify_browser_session, cookie)

    def test_remembered_for_its_audience_only(self) -> None:
        """A bridge token checked as one is still no cookie, and a cookie no bridge token."""
        token, _ = self.authority.issue_bridge_token("s", 1)
        _, cookie = self.authority.issue_browser_session()
        self.authority.verify_bridge_token(token)
        self.authority.verify_browser_session(cookie)
        self.assertRaisesRegex(TokenError, "audience", self.authority.verify_browser_session, token)
        self.assertRaisesRegex(TokenError, "audience", self.authority.verify_bridge_token, cookie)

    def test_refused_tokens_are_not_remembered(self) -> None:
        """A token refused once is checked, and refused, every time."""
        token, _ = _authority(self.clock).issue_bridge_token("s", 1)  # another key
        for _ in range(2):
            self.assertRaisesRegex(
                TokenError, "signature", self.authority.verify_bridge_token, token
            )
        self.assertEqual(self.checks, 2)
        self.assertEqual(len(self.authority.verified), 0)

    def test_node_tokens_checked_each_time(self) -> None:
        """A node token (used once) is not remembered."""
        node = self.authority.issue_node_token("s", "ide", "c1", {})
        self.authority.verify_node_token(node)
        self.authority.verify_node_token(node)
        self.assertEqual(self.checks, 2)

    def test_bounded(self) -> None:
        """Past its size the oldest is forgotten, and checked again when it comes back."""
        first, _ = self.authority.issue_bridge_token("s", 1)
        for _ in range(tokens.VERIFIED_TOKENS):
            self.authority.issue_bridge_token("s", 1)
        self.assertEqual(len(self.authority.verified), tokens.VERIFIED_TOKENS)
        self.authority.verify_bridge_token(first)
        self.assertEqual(self.checks, 1)
        self.assertEqual(len(self.authority.verified), tokens.VERIFIED_TOKENS)
