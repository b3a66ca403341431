"""
Pairing codes: issued to a browser session, redeemed by a bridge for a JWT.

No I/O here: state is in the store, time comes from the clock, and the web
layer turns the exceptions into HTTP answers.
"""

from __future__ import annotations

import re
import secrets

import attrs
from twisted.internet.interfaces import IReactorTime

from coder1_relay.store import BridgeRecord, IRelayStore, PendingCode
from coder1_relay.tokens import BridgeClaims, TokenAuthority

CODE_DIGITS = 6
_CODE = re.compile(r"[0-9]{6}")
_LABEL = re.compile(r"[\w .@:+-]{1,64}", re.ASCII)
#: A public identity key as the ends send it (base64url).  The relay passes it on
#: and never uses it: it only checks that it looks like one.
_PUBLIC_KEY = re.compile(r"[A-Za-z0-9_-]{43,128}")
_GLOBAL = "global"


@attrs.frozen
class PairingPolicy:
    """The pairing rules; docs/security.md explains the numbers."""

    code_lifetime: float = 300.0
    codes_per_minute: int = 5
    failures_per_ip_per_hour: int = 10
    failures_per_hour: int = 600


class RateLimited(Exception):
    """Too many requests; try again after C{retry_after} seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited, retry after {retry_after:.0f}s")
        self.retry_after = retry_after


class RedeemRefused(Exception):
    """The code is not live: unknown, used, or expired (deliberately not saying which)."""


@attrs.frozen
class CodeGrant:
    """A pairing code shown to the user."""

    code: str
    expires_at: float


@attrs.frozen
class Redemption:
    """A redeemed code: the bridge's token, and the browser key it should pin."""

    token: str
    claims: BridgeClaims
    record: BridgeRecord
    browser_key: str


def check_public_key(key: object) -> str:
    """C{key} if it looks like a base64url public key; ValueError otherwise."""
    if not isinstance(key, str) or not _PUBLIC_KEY.fullmatch(key):
        raise ValueError("a public identity key (base64url) is required")
    return key


@attrs.frozen
class Pairing:
    """Issues codes to browser sessions and redeems them for bridge tokens."""

    store: IRelayStore
    tokens: TokenAuthority
    clock: IReactorTime
    policy: PairingPolicy = PairingPolicy()

    async def new_code(self, session: str, client_ip: str, browser_key: str) -> CodeGrant:
        """
        A fresh code bound to C{session}, carrying the browser's public key
        for the bridge that redeems it.

        @raise RateLimited: past C{codes_per_minute} for the session or the IP.
        @raise ValueError: C{browser_key} does not look like a public key.
        """
        check_public_key(browser_key)
        now = self.clock.seconds()
        for key in (f"code:session:{session}", f"code:ip:{client_ip}"):
            wait = await self.store.hit(key, now, 60.0, self.policy.codes_per_minute)
            if wait is not None:
                raise RateLimited(wait)
        expires_at = now + self.policy.code_lifetime
        while True:
            code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
            pending = PendingCode(session, browser_key, expires_at)
            if await self.store.add_code(code, pending, now):
                return CodeGrant(code, expires_at)

    async def redeem(self, code: str, client_ip: str, label: str) -> Redemption:
        """
        Consume C{code} and return a token for a new bridge of its session,
        with the browser's public key.  The bridge presents its own key only
        afterwards (L{present_key}): a relay that wants to fake matching
        verification codes must then commit to the browser key it hands the
        bridge before it learns the bridge's key (docs/e2e.md).

        Failed attempts are counted per client IP and globally, and past either
        bound every attempt is refused before the code is even looked at.

        @raise RateLimited: too many failures lately.
        @raise RedeemRefused: the code is not live.
        @raise ValueError: the label is not acceptable.
        """
        if not _LABEL.fullmatch(label):
            raise ValueError("label must be 1-64 letters, digits or . _ - @ : + space")
        now = self.clock.seconds()
        hour = 3600.0
        ip_key, global_key = f"fail:ip:{client_ip}", f"fail:{_GLOBAL}"
        for key, limit in (
            (ip_key, self.policy.failures_per_ip_per_hour),
            (global_key, self.policy.failures_per_hour),
        ):
            if await self.store.count(key, now, hour) >= limit:
                raise RateLimited(hour)
        pending = await self.store.take_code(code, now) if _CODE.fullmatch(code) else None
        if pending is None:
            await self.store.hit(ip_key, now, hour, self.policy.failures_per_ip_per_hour)
            await self.store.hit(global_key, now, hour, self.policy.failures_per_hour)
            raise RedeemRefused()
        peer = await self.store.next_peer(pending.session)
        token, claims = self.tokens.issue_bridge_token(pending.session, peer)
        record = BridgeRecord(peer, claims.jti, label, now, claims.expires_at, code=code)
        await self.store.add_bridge(pending.session, record)
        return Redemption(token, claims, record, pending.browser_key)

    async def present_key(self, claims: BridgeClaims, bridge_key: str) -> BridgeRecord:
        """
        The bridge's public key, once, after it redeemed its code.

        @raise ValueError: not a key, or this bridge presented one already.
        """
        check_public_key(bridge_key)
        record = await self.store.set_bridge_key(claims.session, claims.peer, bridge_key)
        if record is None:
            raise ValueError(
                "this bridge has presented its key already, or its pairing is gone; pair again"
            )
        return record
