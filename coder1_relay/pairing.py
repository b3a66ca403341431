"""
Pairing codes: issued to a browser session, redeemed by a bridge for a JWT.

No I/O here: state is in the store, time comes from the clock, and the web
layer turns the exceptions into HTTP answers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets

import attrs
from twisted.internet.interfaces import IReactorTime

from coder1_relay.store import BridgeRecord, IRelayStore, PendingCode, StoreUnavailable
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
    """
    The pairing rules; docs/security.md (section 5) explains the numbers.

    Failed redemptions are bounded per client address, per network (what one
    guesser holds cheaply: an IPv4 /24, an IPv6 /48) and over the whole relay.
    The relay-wide bound refuses only networks that have failed: a guesser
    can slow pairing for its own networks, never for anyone else's.
    """

    code_lifetime: float = 300.0
    codes_per_minute: int = 5
    failures_per_ip_per_hour: int = 10
    failures_per_network_per_hour: int = 30
    #: Past this many failures in an hour over the whole relay, it is under attack ...
    failures_per_hour: int = 600
    #: ... and a network may then fail only this often an hour (a person's typos).
    failures_per_network_under_attack: int = 3


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


def network_of(client_ip: str) -> str:
    """
    The network C{client_ip} is in, as far as guessing goes: its IPv4 /24 or
    IPv6 /48 (an IPv4-mapped IPv6 address is IPv4); anything else is its own.
    """
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network((address, prefix), strict=False))


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

        Failed attempts are counted per client IP, per network and over the
        relay (L{PairingPolicy}); past a bound, an attempt is refused before
        the code is even looked at, so a refused guess cannot succeed.  An
        attempt takes its place in the counts before it looks at the code, and
        gives it back when the code was good: attempts made at the same time,
        on any relay process, cannot all pass the check before any of them is
        counted.

        @raise RateLimited: too many failures lately.
        @raise RedeemRefused: the code is not live.
        @raise ValueError: the label is not acceptable.
        @raise StoreUnavailable: the store failed; the code may be used up.
        """
        if not _LABEL.fullmatch(label):
            raise ValueError("label must be 1-64 letters, digits or . _ - @ : + space")
        now, policy, store = self.clock.seconds(), self.policy, self.store
        hour = 3600.0
        ip_key, net_key = f"fail:ip:{client_ip}", f"fail:net:{network_of(client_ip)}"
        global_key = f"fail:{_GLOBAL}"
        # The relay-wide bound holds back only networks with failures of their
        # own: the guesser's, never its victims'.
        suspect = await store.count(net_key, now, hour) >= policy.failures_per_network_under_attack
        checked = [
            (ip_key, policy.failures_per_ip_per_hour),
            (net_key, policy.failures_per_network_per_hour),
        ]
        if suspect:
            checked.append((global_key, policy.failures_per_hour))
        reserved: list[str] = []
        for key, limit in checked:
            if await store.hit(key, now, hour, limit) is not None:
                await self._release(reserved, now)
                raise RateLimited(hour)
            reserved.append(key)
        pending = await store.take_code(code, now) if _CODE.fullmatch(code) else None
        if pending is None:
            if not suspect:  # counted over the relay, though it does not hold this network back
                await store.hit(global_key, now, hour, policy.failures_per_hour)
            raise RedeemRefused()
        await self._release(reserved, now)
        peer = await self.store.next_peer(pending.session)
        token, claims = self.tokens.issue_bridge_token(pending.session, peer)
        record = BridgeRecord(peer, claims.jti, label, now, claims.expires_at, code=code)
        try:
            await self.store.add_bridge(pending.session, record)
        except StoreUnavailable:
            # The record may have been stored all the same: revoked, it counts
            # for nothing (its token is never handed out).
            with contextlib.suppress(StoreUnavailable):
                await self.store.revoke(claims.jti, claims.expires_at, now)
            raise
        return Redemption(token, claims, record, pending.browser_key)

    async def _release(self, keys: list[str], now: float) -> None:
        """Give back the places an attempt took; one the store fails to give back stays counted."""
        for key in keys:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(key, now)

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
