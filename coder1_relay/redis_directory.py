"""
The session directory of several relay nodes, in Redis (C{coder1_relay.mesh}).

Keys (C{prefix} is C{coder1:} by default; docs/scaling.md has the table):

  - C{node:ID}: a node's record, C{{"address", "key"}}, renewed every
    L{HEARTBEAT} seconds and gone L{NODE_TTL} seconds after its node stops
    renewing it (it died, or cannot reach Redis).
  - C{owner:SESSION}: the id of the node holding the session's connections.
    Valid while that node's record is; refreshed by its owner every
    L{REFRESH} seconds, so a session held for days keeps its owner, and
    gone a day after its owner stopped refreshing it.
  - channel C{events}: what one node tells all (a bridge paired, revoked).

A node's id is new at every start, so a restarted node never mistakes its
predecessor's sessions for its own.  The scripts make each claim atomic: of
two nodes claiming a session at once, one wins and the other is told.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from coder1_relay.mesh import EventHandler, ISessionDirectory, Owner
from coder1_relay.redis_client import RedisClient, Script, Subscription
from coder1_relay.store import StoreUnavailable

#: Seconds between a node's renewals of its record.
HEARTBEAT = 2.0
#: Seconds a node's record outlives its last renewal: how long a dead node's
#: sessions wait before another node may claim them.
NODE_TTL = 6.0
#: Seconds an owner record lasts without a refresh, and between refreshes.
OWNER_TTL = 86400.0
REFRESH = 3600.0
#: Sessions per refresh script.
BATCH = 500

#: KEYS[1] owner key; ARGV: my id, owner TTL (ms), node key prefix.
#: Returns {owner, its record or "", 1 if claimed from a node that is gone}.
CLAIM = Script(
    """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  local record = redis.call('GET', ARGV[3] .. owner)
  if record then return {owner, record, 0} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if owner and owner ~= ARGV[1] then return {ARGV[1], '', 1} end
return {ARGV[1], '', 0}
"""
)
#: KEYS[1] owner key; ARGV[1] my id.
RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
)
#: KEYS: owner keys; ARGV: my id, owner TTL (ms), node key prefix.  Keeps (or
#: takes back) each session whose owner is this node or gone; returns the
#: indexes (1-based) of the ones another live node holds now.
REASSERT = Script(
    """
local lost = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. owner) == 1 then
    table.insert(lost, i)
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return lost
"""
)


@implementer(ISessionDirectory)
@attrs.define
class RedisDirectory:
    """L{ISessionDirectory} over Redis."""

    redis: RedisClient
    clock: IReactorTime
    #: The signing key's id (its token issuer): nodes that differ are named at start.
    key_id: str
    prefix: str = "coder1:"
    node: str = attrs.field(factory=lambda: secrets.token_hex(8))
    #: Called with sessions another node holds now (this node must let them go).
    lost: Callable[[list[str]], None] = lambda sessions: None
    _owned: set[str] = attrs.field(factory=set)
    _handlers: list[EventHandler] = attrs.field(factory=list)
    _record: str = ""
    _subscription: Subscription | None = None
    _beat: LoopingCall | None = None
    _refresh: LoopingCall | None = None
    _joined: bool = False
    log: Logger = attrs.field(factory=Logger, init=False, repr=False)

    def _node_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def _owner_key(self, session: str) -> str:
        return f"{self.prefix}owner:{session}"

    async def _start(self, address: str) -> None:
        self._record = json.dumps({"address": address, "key": self.key_id})
        await self._renew()
        await self._check_keys()
        self._subscription = self.redis.subscription(self._heard, self._resubscribed)
        # One that fails now stays wanted, and is made once Redis answers.
        self._subscription.subscribe(f"{self.prefix}events").addErrback(lambda _: None)
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self.clock
        self._beat.start(HEARTBEAT, now=False)
        self._refresh = LoopingCall(self._reassert)
        self._refresh.clock = self.clock
        self._refresh.start(REFRESH, now=False)

    def start(self, address: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start(address))

    async def _stop(self) -> None:
        for loop in (self._beat, self._refresh):
            if loop is not None and loop.running:
                loop.stop()
        if self._subscription is not None:
            await self._subscription.stop()
        with contextlib.suppress(StoreUnavailable):  # else its record expires by itself
            await self.redis.call("DEL", self._node_key(self.node))

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _renew(self) -> bool:
        """Renew this node's record: whether it was still there (or this is the first time)."""
        ttl = int(NODE_TTL * 1000)
        previous = await self.redis.call(
            "SET", self._node_key(self.node), self._record, "PX", ttl, "GET"
        )
        first, self._joined = not self._joined, True
        return first or previous is not None

    async def _check_keys(self) -> None:
        """Warn when another live node signs tokens with another key."""
        cursor, others = 0, []
        while True:
            cursor, keys = await self.redis.call(
                "SCAN", cursor, "MATCH", self._node_key("*"), "COUNT", 1000
            )
            cursor = int(cursor)
            if keys:
                others += await self.redis.call("MGET", *keys)
            if cursor == 0:
                break
        for raw in others:
            if raw is None:
                continue
            other = json.loads(raw)
            if other.get("key") != self.key_id:
                self.log.error(
                    "this relay node signs tokens with key {mine}, another node with {theirs}: "
                    "tokens from one are refused by the other. Copy signing-key.pem (and "
                    "accepted-keys/) from the first node's --state-dir to every node.",
                    mine=self.key_id,
                    theirs=other.get("key"),
                )
                return

    def _heartbeat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._beat_once())

    async def _beat_once(self) -> None:
        try:
            still_there = await self._renew()
        except StoreUnavailable:
            self.log.warn("relay state (Redis) unreachable; sessions held here go on")
            return
        if not still_there:
            # Redis lost this node's record (restarted without it, or this node
            # was away too long): claim back what it holds, let go what others took.
            self.log.warn("this node's record was gone from Redis; claiming its sessions again")
            await self._reassert()

    async def _reassert(self) -> None:
        owned = sorted(self._owned)
        ttl = int(OWNER_TTL * 1000)
        for start in range(0, len(owned), BATCH):
            batch = owned[start : start + BATCH]
            try:
                lost = await self.redis.eval(
                    REASSERT,
                    [self._owner_key(s) for s in batch],
                    [self.node, ttl, self._node_key("")],
                )
            except StoreUnavailable:
                return
            gone = [batch[int(i) - 1] for i in lost]
            self._owned.difference_update(gone)
            if gone:
                self.lost(gone)

    async def _locate(self, session: str) -> Owner:
        owner, record, took_over = await self.redis.eval(
            CLAIM,
            [self._owner_key(session)],
            [self.node, int(OWNER_TTL * 1000), self._node_key("")],
        )
        if owner == self.node:
            self._owned.add(session)
            return Owner(self.node, "", took_over=bool(int(took_over)))
        self._owned.discard(session)
        return Owner(owner, json.loads(record)["address"])

    def locate(self, session: str) -> Deferred[Owner]:
        return Deferred.fromCoroutine(self._locate(session))

    def release(self, session: str) -> Deferred[None]:
        self._owned.discard(session)
        d = self.redis.eval(RELEASE, [self._owner_key(session)], [self.node])
        return d.addCallback(lambda _: None)

    def publish(self, event: dict[str, Any]) -> Deferred[None]:
        d = self.redis.call("PUBLISH", f"{self.prefix}events", json.dumps(event))
        return d.addCallback(lambda _: None)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def _heard(self, channel: str, message: bytes) -> None:
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._deliver(event)

    def _resubscribed(self) -> None:
        """Events published while the subscription was down may be lost: say so."""
        self._deliver({"event": "resync"})

    def _deliver(self, event: dict[str, Any]) -> None:
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                self.log.failure("handling a relay node event failed")

    def owned(self) -> Iterable[str]:
        """The sessions this node holds (for its metrics and tests)."""
        return iter(self._owned)
