"""
Telemetry of a deployment's relay processes, in their shared Redis.

With C{--store redis://...} every relay process writes its telemetry here
instead of its own SQLite file, so an operator reads one place
(C{coder1-relay telemetry --store ...}).  The same content-free rows as in
SQLite (docs/security.md, "Telemetry"), kept by construction for at most the
retention: every key is per hour or per day and expires with it.

| Key (after the prefix) | Type | Holds |
|---|---|---|
| C{telemetry:counts:HOUR} | hash | C{name|label} -> count |
| C{telemetry:connections:HOUR} | hash | C{role|count}, C{role|seconds} (closed that hour) |
| C{telemetry:crashes:DAY} | list | crash rows as JSON, at most C{per_day} a day |

C{HOUR} and C{DAY} are the period's start in unix seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults

from coder1_relay.crash_budget import DAY
from coder1_relay.redis_client import RedisClient, Script

HOUR = 3600

#: HINCRBY each field ARGV[2k] by ARGV[2k+1] in the hash KEYS[1]; it expires at ARGV[1].
_ADD = Script(
    """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 0
"""
)

#: Append ARGV[3..] to the list KEYS[1], which expires at ARGV[1] and keeps
#: its first ARGV[2] entries: the number of those appended that were dropped.
_PUSH = Script(
    """
local pushed = #ARGV - 2
local n = redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIREAT', KEYS[1], ARGV[1])
local cap = tonumber(ARGV[2])
if n <= cap then
  return 0
end
redis.call('LTRIM', KEYS[1], 0, cap - 1)
return n - math.max(cap, n - pushed)
"""
)


@attrs.define
class RedisTelemetry:
    """Writes telemetry batches to Redis; see the module's key table."""

    client: RedisClient
    retention: float
    crashes_per_day: int

    def key(self, kind: str, period: int) -> str:
        return f"{self.client.settings.prefix}telemetry:{kind}:{period}"

    def write(
        self,
        counts: Mapping[tuple[int, str, str], int],
        closed: Sequence[Sequence[Any]],
        crashes: Sequence[Sequence[Any]],
    ) -> Deferred[int]:
        """
        Add one flush's counts, closed connections and crash rows; fires with
        the number of crash rows dropped because their day's list was full.
        """
        writes: list[Deferred[Any]] = []
        by_period: dict[int, dict[str, int]] = {}
        for (period, name, label), value in counts.items():
            by_period.setdefault(period, {})[f"{name}|{label}"] = value
        for period, fields in by_period.items():
            writes.append(self._add(self.key("counts", period), period, fields))
        connections: dict[int, Counter[str]] = {}
        for role, opened_at, closed_at in closed:
            hour = connections.setdefault(int(closed_at // HOUR) * HOUR, Counter())
            hour[f"{role}|count"] += 1
            hour[f"{role}|seconds"] += round(closed_at - opened_at)
        for period, fields in connections.items():
            writes.append(self._add(self.key("connections", period), period, fields))
        days: dict[int, list[str]] = {}
        for received_at, type_, version, frames, signature in crashes:
            row = {
                "received_at": received_at,
                "type": type_,
                "version": version,
                "frames": json.loads(frames),
                "signature": signature,
            }
            days.setdefault(int(received_at // DAY) * DAY, []).append(
                json.dumps(row, separators=(",", ":"))
            )
        dropped: list[Deferred[Any]] = [
            self.client.eval(
                _PUSH,
                [self.key("crashes", day)],
                [int(day + DAY + self.retention), self.crashes_per_day, *rows],
            )
            for day, rows in days.items()
        ]
        done = gatherResults([*writes, *dropped], consumeErrors=True)
        return done.addCallback(lambda answers: sum(answers[len(writes) :]))

    def _add(self, key: str, period: int, fields: Mapping[str, int]) -> Deferred[Any]:
        args: list[str | int] = [int(period + HOUR + self.retention)]
        for field, value in fields.items():
            args += [field, value]
        return self.client.eval(_ADD, [key], args)
