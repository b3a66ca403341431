"""
Signed tokens: the bridge's session JWT and the browser's session cookie.

Both are EdDSA (Ed25519) JWTs signed with the relay's own key; the algorithm
is pinned on verify, so C{alg: none} or an HMAC token made with the public
key is refused.  Time comes from the injected clock, not from PyJWT's
wall-clock checks, so expiry is testable and one clock rules the relay.

A token presented again (the page's cookie at the API, then at its WebSocket;
the bridge's token at POST /api/pair/key, then at its WebSocket) is not
checked twice: L{VerifiedTokens} remembers the last few that passed the
signature, issuer and audience checks (and those issued here), with their
claims.  What can change for a token is checked on every use: its times here,
its revocation by the callers (the store).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.interfaces import IReactorTime

ALGORITHM = "EdDSA"
BRIDGE_AUDIENCE = "coder1-bridge"
BROWSER_AUDIENCE = "coder1-browser"
NODE_AUDIENCE = "coder1-node"
#: Seconds a node token is good for: it is made for one node link, used at once.
NODE_TOKEN_LIFETIME = 60
_REQUIRED = ["iss", "aud", "sub", "jti", "iat", "exp"]
#: Seconds of clock skew tolerated on C{iat} (tokens from "the future").
LEEWAY = 60.0


def issuer_for(key: Ed25519PublicKey) -> str:
    """
    The C{iss} of tokens signed with C{key}: names the key, so deployments
    differ, and a key ring finds the key a token was signed with.
    """
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "coder1-relay:" + hashlib.sha256(raw).hexdigest()[:16]


#: Tokens L{VerifiedTokens} remembers: a pairing uses two, each twice within
#: a second or so, so this covers well over a hundred pairings at once.
VERIFIED_TOKENS = 256


class VerifiedTokens:
    """
    The claims of the last C{size} tokens whose signature, issuer and
    audience checked out, by audience and the token's exact text (the
    oldest forgotten first).  It belongs to one L{TokenAuthority}, so to its
    keys: a relay started with other keys starts with none remembered.
    """

    def __init__(self, size: int = VERIFIED_TOKENS) -> None:
        self.size = size
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def get(self, audience: str, token: str) -> dict[str, Any] | None:
        return self._claims.get((audience, token))

    def add(self, audience: str, token: str, claims: dict[str, Any]) -> None:
        if len(self._claims) >= self.size:
            del self._claims[next(iter(self._claims))]
        self._claims[(audience, token)] = claims


class TokenError(Exception):
    """A token refused; C{str(error)} is a short reason safe to show and log."""


@attrs.frozen
class BridgeClaims:
    """What a verified bridge token says."""

    session: str
    peer: int
    jti: str
    issued_at: float
    expires_at: float


@attrs.frozen
class NodeClaims:
    """
    What a node token says: one connection that another relay node accepted
    and checked, to be attached here (its session's owner) as if it were local.
    """

    session: str
    #: "ide" or "bridge".
    role: str
    connection_id: str
    #: The rest of what the accepting node learned (a bridge's peer, label,
    #: version, telemetry choice, token expiry and key), as C{Hub.attach_bridge} takes it.
    attach: dict[str, Any]


@attrs.frozen
class TokenAuthority:
    """Issues and verifies the relay's tokens."""

    signing_key: Ed25519PrivateKey
    issuer: str
    clock: IReactorTime
    bridge_lifetime: float = 30 * 86400.0
    browser_lifetime: float = 30 * 86400.0
    #: Keys signed with before a rotation whose tokens are still accepted, by
    #: their issuer (C{iss}): a key ring, signed with only C{signing_key}.
    accepted: Mapping[str, Ed25519PublicKey] = attrs.field(factory=dict)
    #: C{signing_key}'s public half, derived once rather than per verification.
    _public_key: Ed25519PublicKey = attrs.field(init=False)
    #: Bridge tokens and browser cookies checked (or issued) lately.
    verified: VerifiedTokens = attrs.field(factory=VerifiedTokens, kw_only=True)

    @_public_key.default
    def _derive_public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.signing_key, algorithm=ALGORITHM)

    def _claims(self, subject: str, audience: str, lifetime: float) -> dict[str, Any]:
        now = int(self.clock.seconds())
        return {
            "iss": self.issuer,
            "aud": audience,
            "sub": subject,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + int(lifetime),
        }

    def issue_bridge_token(self, session: str, peer: int) -> tuple[str, BridgeClaims]:
        """A token that lets one bridge connect as number C{peer} of C{session}."""
        claims = self._claims(session, BRIDGE_AUDIENCE, self.bridge_lifetime)
        claims["peer"] = peer
        token = self._sign(claims)
        self.verified.add(BRIDGE_AUDIENCE, token, claims)
        return token, _bridge_claims(claims)

    def verify_bridge_token(self, token: str) -> BridgeClaims:
        """
        The claims of a valid bridge token (revocation is the store's to say).

        @raise TokenError: for anything but a well-formed, unexpired token this
            relay signed for a bridge.
        """
        claims = self._verify(token, BRIDGE_AUDIENCE)
        if not isinstance(claims.get("peer"), int) or claims["peer"] < 1:
            raise TokenError("token has no valid peer claim")
        return _bridge_claims(claims)

    def issue_browser_session(self) -> tuple[str, str]:
        """A fresh browser session: (session id, cookie value)."""
        session = secrets.token_urlsafe(18)
        claims = self._claims(session, BROWSER_AUDIENCE, self.browser_lifetime)
        cookie = self._sign(claims)
        self.verified.add(BROWSER_AUDIENCE, cookie, claims)
        return session, cookie

    def verify_browser_session(self, cookie: str) -> str:
        """The session id in a valid session cookie.  @raise TokenError: otherwise."""
        return str(self._verify(cookie, BROWSER_AUDIENCE)["sub"])

    def issue_node_token(
        self, session: str, role: str, connection_id: str, attach: dict[str, Any]
    ) -> str:
        """A token for one node link: only nodes holding the signing key can make one."""
        claims = self._claims(session, NODE_AUDIENCE, NODE_TOKEN_LIFETIME)
        claims.update(role=role, cid=connection_id, attach=attach)
        return self._sign(claims)

    def verify_node_token(self, token: str) -> NodeClaims:
        """The claims of a valid node token.  @raise TokenError: otherwise."""
        claims = self._verify(token, NODE_AUDIENCE)
        role, cid, attach = claims.get("role"), claims.get("cid"), claims.get("attach")
        if role not in ("ide", "bridge") or not (isinstance(cid, str) and isinstance(attach, dict)):
            raise TokenError("node token is malformed")
        return NodeClaims(str(claims["sub"]), role, cid, attach)

    def _key_for(self, token: str) -> tuple[str, Ed25519PublicKey]:
        """The issuer and key a token claims: an accepted older key's, else ours."""
        if self.accepted:
            try:
                issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            except jwt.InvalidTokenError:
                issuer = None
            older = self.accepted.get(issuer) if isinstance(issuer, str) else None
            if older is not None and isinstance(issuer, str):
                return issuer, older
        return self.issuer, self._public_key

    def _verify(self, token: str, audience: str) -> dict[str, Any]:
        """
        The claims of C{token} if it is good now for C{audience}: its signature,
        issuer and audience checked once (node tokens each time: each is used
        once), its times on every call.  The claims returned are not to be changed.
        """
        claims = self.verified.get(audience, token)
        if claims is None:
            claims = self._check(token, audience)
            if audience != NODE_AUDIENCE:
                self.verified.add(audience, token, claims)
        now = self.clock.seconds()
        if claims["exp"] <= now:
            raise TokenError("token has expired")
        if claims["iat"] > now + LEEWAY:
            raise TokenError("token was issued in the future")
        return claims

    def _check(self, token: str, audience: str) -> dict[str, Any]:
        """C{token}'s signature, issuer, audience, required claims and their types."""
        issuer, key = self._key_for(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=issuer,
                options={
                    "require": _REQUIRED,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenError("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token is from another relay") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token lacks the {e.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature is invalid") from None
        except jwt.InvalidTokenError:
            raise TokenError("token is malformed") from None
        if not all(isinstance(claims[c], int) for c in ("iat", "exp")):
            raise TokenError("token times are malformed")
        return claims


def _bridge_claims(claims: dict[str, Any]) -> BridgeClaims:
    return BridgeClaims(
        session=str(claims["sub"]),
        peer=int(claims["peer"]),
        jti=str(claims["jti"]),
        issued_at=float(claims["iat"]),
        expires_at=float(claims["exp"]),
    )
