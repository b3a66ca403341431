"""
The relay's state in Redis, shared by every relay process of a deployment.

Each promise of L{IRelayStore} holds across processes because each is one
atomic Redis operation: a code is taken with GETDEL (one taker, ever) and
made with SET NX PX; a rate window is a sorted set that one Lua script
prunes, counts and adds to; a bridge number comes from INCR; a key is set on
a bridge's record by one Lua script.  Times are the caller's (C{now}); Redis
expires keys on its own clock, only so that idle ones vanish.

What is kept, under the key prefix (docs/scaling.md, "State in Redis", has
the table): ids, labels, public keys and times, as C{pairings.json} holds
them, and the live codes and rate windows a single relay keeps in memory.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import txredisapi
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel
from zope.interface import implementer

from coder1_relay.redis_client import RedisClient, Script
from coder1_relay.store import BridgeRecord, IRelayStore, PendingCode, Presence

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: One event against a sliding window, if there is room: KEYS[1] the window;
#: ARGV the cutoff (events at or before it are gone), now, the limit, a unique
#: member and the window in ms (the key's lifetime after its newest event).
#: Answers nil when counted, else the score of the event whose leaving makes room.
_HIT = Script(
    """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[3])
if n >= limit then
  return redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')[2]
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return false
"""
)

#: Take back one event at time ARGV[1] from the window KEYS[1].
_RELEASE = Script(
    """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1], 'LIMIT', 0, 1)
if found[1] then
  redis.call('ZREM', KEYS[1], found[1])
end
return 0
"""
)

#: A bridge's record into its session's hash KEYS[1]: ARGV the peer, the
#: record, its key and code ('' for none), and its lifetime in ms; the hash
#: lives as long as its longest-lived record.
_ADD_BRIDGE = Script(
    """
local peer = ARGV[1]
redis.call('HSET', KEYS[1], peer, ARGV[2])
for i, suffix in ipairs({':key', ':code'}) do
  if ARGV[2 + i] == '' then
    redis.call('HDEL', KEYS[1], peer .. suffix)
  else
    redis.call('HSET', KEYS[1], peer .. suffix, ARGV[2 + i])
  end
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 0
"""
)

#: Bridge ARGV[1]'s key ARGV[2], once, and forget its code: answers nil when
#: there is no such bridge or it has a key, else its record and code.
_SET_BRIDGE_KEY = Script(
    """
local peer = ARGV[1]
local record = redis.call('HGET', KEYS[1], peer)
if not record or redis.call('HEXISTS', KEYS[1], peer .. ':key') == 1 then
  return false
end
local code = redis.call('HGET', KEYS[1], peer .. ':code') or ''
redis.call('HSET', KEYS[1], peer .. ':key', ARGV[2])
redis.call('HDEL', KEYS[1], peer .. ':code')
return {record, code}
"""
)


def _deferred(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Deferred[_T]]:
    """A coroutine method as one returning a Deferred, as L{IRelayStore} says."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper


def _ms(seconds: float) -> int:
    """A Redis expiry: whole milliseconds, at least one."""
    return max(1, math.ceil(seconds * 1000))


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL's answer as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@implementer(IRelayStore)
class RedisStore:
    """
    L{IRelayStore} in Redis, through C{client} (whose settings give the key
    prefix).  Any method may fail with C{StoreUnavailable}.
    """

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.prefix = client.settings.prefix

    def key(self, kind: str, name: str) -> str:
        """The Redis key of C{name} of C{kind} (C{code}, C{rate}, ...)."""
        return f"{self.prefix}{kind}:{name}"

    @_deferred
    async def add_code(self, code: str, pending: PendingCode, now: float) -> bool:
        value = {
            "session": pending.session,
            "browser_key": pending.browser_key,
            "expires_at": pending.expires_at,
        }
        lifetime = _ms(pending.expires_at - now)
        answer = await self.client.call(
            "SET", self.key("code", code), _json(value), "NX", "PX", lifetime
        )
        return answer is not None

    @_deferred
    async def take_code(self, code: str, now: float) -> PendingCode | None:
        value = await self.client.call("GETDEL", self.key("code", code))
        if value is None:
            return None
        pending = PendingCode(**json.loads(value))
        return pending if pending.expires_at > now else None

    @_deferred
    async def hit(self, key: str, now: float, window: float, limit: int) -> float | None:
        member = f"{now!r}:{secrets.token_hex(6)}"
        oldest = await self.client.eval(
            _HIT, [self.key("rate", key)], [now - window, now, limit, member, _ms(window)]
        )
        return None if oldest is None else float(oldest) + window - now

    @_deferred
    async def count(self, key: str, now: float, window: float) -> int:
        events: int = await self.client.call(
            "ZCOUNT", self.key("rate", key), f"({now - window!r}", "+inf"
        )
        return events

    @_deferred
    async def release(self, key: str, now: float) -> None:
        await self.client.eval(_RELEASE, [self.key("rate", key)], [now])

    @_deferred
    async def revoke(self, jti: str, expires_at: float, now: float) -> None:
        if expires_at > now:  # else the token is dead anyway
            await self.client.call(
                "SET", self.key("revoked", jti), repr(expires_at), "PX", _ms(expires_at - now)
            )

    @_deferred
    async def is_revoked(self, jti: str, now: float) -> bool:
        until = await self.client.call("GET", self.key("revoked", jti))
        return until is not None and float(until) > now

    @_deferred
    async def next_peer(self, session: str) -> int:
        peer: int = await self.client.call("INCR", self.key("peers", session))
        return peer

    @_deferred
    async def add_bridge(self, session: str, record: BridgeRecord) -> None:
        value = {
            "jti": record.jti,
            "label": record.label,
            "paired_at": record.paired_at,
            "expires_at": record.expires_at,
        }
        lifetime = _ms(record.expires_at - record.paired_at)
        await self.client.eval(
            _ADD_BRIDGE,
            [self.key("bridges", session)],
            [record.peer, _json(value), record.bridge_key, record.code, lifetime],
        )

    @_deferred
    async def set_bridge_key(self, session: str, peer: int, bridge_key: str) -> BridgeRecord | None:
        answer = await self.client.eval(
            _SET_BRIDGE_KEY, [self.key("bridges", session)], [peer, bridge_key]
        )
        if answer is None:
            return None
        value, code = answer
        return BridgeRecord(peer, **json.loads(value), bridge_key=bridge_key, code=code)

    @_deferred
    async def bridges(self, session: str, now: float) -> list[BridgeRecord]:
        """
        Expired records are dropped from the hash as they are found; revoked
        ones stay (they expire with their tokens) but are not listed.
        """
        key = self.key("bridges", session)
        fields = _pairs(await self.client.call("HGETALL", key))
        live: list[BridgeRecord] = []
        expired: list[str] = []
        for field, value in fields.items():
            if ":" in field:
                continue
            record = BridgeRecord(
                int(field),
                **json.loads(value),
                bridge_key=fields.get(f"{field}:key", ""),
                code=fields.get(f"{field}:code", ""),
            )
            if record.expires_at > now:
                live.append(record)
            else:
                expired += [field, f"{field}:key", f"{field}:code"]
        if expired:
            await self.client.call("HDEL", key, *expired)
        if live:
            revoked = await self.client.call("MGET", *(self.key("revoked", r.jti) for r in live))
            live = [
                r
                for r, until in zip(live, revoked, strict=True)
                if until is None or float(until) <= now
            ]
        return sorted(live, key=lambda r: r.peer)

    @_deferred
    async def set_presence(self, session: str, presence: Presence) -> None:
        value = {
            "label": presence.label,
            "version": presence.version,
            "since": presence.since,
            "bridge_key": presence.bridge_key,
        }
        await self.client.call("HSET", self.key("presence", session), presence.peer, _json(value))

    @_deferred
    async def clear_presence(self, session: str, peer: int) -> None:
        await self.client.call("HDEL", self.key("presence", session), peer)

    @_deferred
    async def clear_all_presence(self, session: str) -> None:
        await self.client.call("DEL", self.key("presence", session))

    @_deferred
    async def presence(self, session: str) -> list[Presence]:
        fields = _pairs(await self.client.call("HGETALL", self.key("presence", session)))
        connected = [Presence(int(peer), **json.loads(value)) for peer, value in fields.items()]
        return sorted(connected, key=lambda p: p.peer)

    @_deferred
    async def persistence(self) -> list[tuple[LogLevel, str]]:
        """
        What a crash of Redis (or of its machine) could lose, from its
        C{appendonly} and C{appendfsync} settings: (level, message) to log.
        """
        try:
            answer = await self.client.call("CONFIG", "GET", "append*")
        except txredisapi.ResponseError:  # CONFIG renamed, disabled, or not for our user
            answer = None
        return persistence_notes(self.client.settings.address, answer)


_ADVICE = "set appendonly yes and appendfsync always (docs/scaling.md, Operating Redis)"


def persistence_notes(address: str, config: list[str] | None) -> list[tuple[LogLevel, str]]:
    """
    What to log about the persistence of the Redis at C{address}, given its
    answer to C{CONFIG GET append*} (None when it could not be asked).
    """
    if config is None:
        return [
            (
                LogLevel.warn,
                f"could not read the persistence settings of Redis at {address} (CONFIG is "
                "disabled or renamed): unless it has appendonly yes and appendfsync always, a "
                "revocation can be lost in a crash and the revoked bridge connect again; "
                + _ADVICE,
            )
        ]
    settings = _pairs(config)
    appendonly, fsync = settings.get("appendonly"), settings.get("appendfsync")
    if appendonly != "yes":
        return [
            (
                LogLevel.warn,
                f"Redis at {address} has appendonly {appendonly}: a crash of Redis loses every "
                "revocation and pairing since its last snapshot (all of them without one), and "
                "revoked bridges can connect again; " + _ADVICE,
            )
        ]
    if fsync == "everysec":
        return [
            (
                LogLevel.info,
                f"Redis at {address} has appendfsync everysec: a crash of its machine (not of "
                "Redis alone) can lose the revocations of the last second or two, and those "
                "bridges connect again; with appendfsync always a revocation is on disk before "
                "the relay confirms it",
            )
        ]
    if fsync != "always":
        return [
            (
                LogLevel.warn,
                f"Redis at {address} has appendfsync {fsync}: a crash of its machine can lose "
                "the revocations of the last 30 seconds or so (the kernel writes them when it "
                "likes), and those bridges connect again; " + _ADVICE,
            )
        ]
    return []
