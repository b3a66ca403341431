"""
How many crash reports the relay keeps a day: per bridge, per session, in all.

A bridge that crashes in a loop, or one that pretends to, uses up its own
budget and its session's, not everyone's: the reports of other bridges are
still kept.  The relay-wide budget bounds what a day adds to the telemetry
database whatever the number of bridges (the size cap bounds the file).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import attrs

DAY = 86400


class _Clock(Protocol):
    def seconds(self) -> float: ...


@attrs.frozen
class CrashBudgetPolicy:
    """Crash reports kept per UTC day."""

    per_bridge: int = 5
    per_session: int = 20
    per_relay: int = 1000


@attrs.define
class CrashBudget:
    """What is left of today's budgets; everything resets at midnight UTC."""

    clock: _Clock
    policy: CrashBudgetPolicy = CrashBudgetPolicy()
    _day: int = attrs.field(default=-1, init=False)
    _bridges: Counter[tuple[str, int]] = attrs.field(factory=Counter, init=False)
    _sessions: Counter[str] = attrs.field(factory=Counter, init=False)
    _total: int = attrs.field(default=0, init=False)

    def take(self, session: str, peer: int) -> bool:
        """Whether bridge C{peer} of C{session} may have one more report kept today."""
        day = int(self.clock.seconds() // DAY)
        if day != self._day:
            self._day, self._total = day, 0
            self._bridges.clear()
            self._sessions.clear()
        if (
            self._bridges[session, peer] >= self.policy.per_bridge
            or self._sessions[session] >= self.policy.per_session
            or self._total >= self.policy.per_relay
        ):
            return False
        self._bridges[session, peer] += 1
        self._sessions[session] += 1
        self._total += 1
        return True
