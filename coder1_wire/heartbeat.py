"""Heartbeats: a ping timer and a watchdog, both on an injected clock."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: The ping intervals, in seconds, a party takes from a WELCOME: a relay cannot make
#: it spin (a tiny one) or stop noticing that the relay is gone (a huge one).
MIN_INTERVAL = 5.0
MAX_INTERVAL = 30.0


def interval_from(value: object) -> float | None:
    """
    The ping interval a WELCOME's C{heartbeat} asks for, kept within
    L{MIN_INTERVAL} and L{MAX_INTERVAL}; None if it is not a number at all.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return min(max(float(value), MIN_INTERVAL), MAX_INTERVAL)


@attrs.define
class Heartbeat:
    """
    Calls C{ping} every C{interval} seconds, and C{on_timeout} once if
    C{feed} is not called for C{timeout} seconds (anything heard counts).
    """

    clock: IReactorTime
    interval: float
    timeout: float
    ping: Callable[[], None]
    on_timeout: Callable[[], None]
    _ping_call: IDelayedCall | None = None
    _dead_call: IDelayedCall | None = None

    def start(self) -> None:
        """Begin pinging and watching."""
        self._ping_call = self.clock.callLater(self.interval, self._ping)
        self._dead_call = self.clock.callLater(self.timeout, self._expire)

    def feed(self) -> None:
        """Something arrived from the other end: it is alive."""
        if self._dead_call is not None and self._dead_call.active():
            self._dead_call.reset(self.timeout)

    def stop(self) -> None:
        """Stop both timers (the connection is gone)."""
        for call in (self._ping_call, self._dead_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._dead_call = None

    def _ping(self) -> None:
        self._ping_call = self.clock.callLater(self.interval, self._ping)
        self.ping()

    def _expire(self) -> None:
        self.stop()
        self.on_timeout()
