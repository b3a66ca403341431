"""
Signed tokens: the bridge's session JWT and the browser's session cookie.

Both are EdDSA (Ed25519) JWTs signed with the relay's own key; the algorithm
is pinned on verify, so C{alg: none} or an HMAC token made with the public
key is refused.  Time comes from the injected clock, not from PyJWT's
wall-clock checks, so expiry is testable and one clock rules the relay.
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.interfaces import IReactorTime

ALGORITHM = "EdDSA"
BRIDGE_AUDIENCE = "coder1-bridge"
BROWSER_AUDIENCE = "coder1-browser"
_REQUIRED = ["iss", "aud", "sub", "jti", "iat", "exp"]
#: Seconds of clock skew tolerated on C{iat} (tokens from "the future").
LEEWAY = 60.0


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
class TokenAuthority:
    """Issues and verifies the relay's tokens."""

    signing_key: Ed25519PrivateKey
    issuer: str
    clock: IReactorTime
    bridge_lifetime: float = 30 * 86400.0
    browser_lifetime: float = 30 * 86400.0

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
        return self._sign(claims), _bridge_claims(claims)

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
        return session, self._sign(self._claims(session, BROWSER_AUDIENCE, self.browser_lifetime))

    def verify_browser_session(self, cookie: str) -> str:
        """The session id in a valid session cookie.  @raise TokenError: otherwise."""
        return str(self._verify(cookie, BROWSER_AUDIENCE)["sub"])

    def _verify(self, token: str, audience: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.signing_key.public_key(),
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self.issuer,
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
        now = self.clock.seconds()
        if not all(isinstance(claims[c], int) for c in ("iat", "exp")):
            raise TokenError("token times are malformed")
        if claims["exp"] <= now:
            raise TokenError("token has expired")
        if claims["iat"] > now + LEEWAY:
            raise TokenError("token was issued in the future")
        return claims


def _bridge_claims(claims: dict[str, Any]) -> BridgeClaims:
    return BridgeClaims(
        session=str(claims["sub"]),
        peer=int(claims["peer"]),
        jti=str(claims["jti"]),
        issued_at=float(claims["iat"]),
        expires_at=float(claims["exp"]),
    )
