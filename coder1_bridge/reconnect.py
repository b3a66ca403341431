"""
When the bridge tries its relay again, and what it tells the person meanwhile.

C{ClientService} counts failed attempts only until a TCP connection is made:
a relay whose TLS certificate is refused, or which refuses the WebSocket
handshake, would be retried twice a second for ever.  L{Reconnect} counts from
the last WebSocket that opened instead, and says why each attempt failed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_bridge.relay_errors import Where, WitnessedTLS, explain
from coder1_wire import closecodes

#: After the relay says it is going away (1001, or 4012: the node holding the
#: session went away), attempts come this many seconds apart, at random
#: within the range, for L{PROMPT_WINDOW} seconds: long enough for a relay
#: process to restart; without a balancer's other processes to take over,
#: the first attempts find nothing listening.
PROMPT_DELAY = (0.1, 1.0)
PROMPT_WINDOW = 20.0
_GOING_AWAY = "The relay is restarting; reconnecting."


@attrs.define
class Reconnect:
    """The retry policy of the bridge's C{ClientService}, and its words."""

    clock: Any
    where: Where
    tls: WitnessedTLS
    initial_delay: float = 0.5
    max_delay: float = 30.0
    #: Failed attempts since a WebSocket last opened.
    failures: int = 0
    #: Why the last attempt failed; None after a connection that had opened.
    why: Failure | BaseException | None = None
    #: The last explanation given, so that the same one is not repeated in full.
    said: str | None = None
    #: Until when attempts are prompt (the relay went away), on C{clock}.
    prompt_until: float | None = None
    #: A number in [0, 1): where in L{PROMPT_DELAY} the next prompt attempt is.
    uniform: Callable[[], float] = random.random
    log: Logger = attrs.field(factory=Logger, init=False)

    def failed(self, reason: Failure | BaseException) -> None:
        """An attempt failed before the WebSocket opened."""
        self.why = reason

    def opened(self) -> None:
        """A WebSocket to the relay is open."""
        self.failures = 0
        self.why = None
        self.said = None

    def closed(self, code: int | None) -> None:
        """A WebSocket that had opened closed, with C{code} from the relay (None: no close)."""
        if code in closecodes.RECONNECT_AT_ONCE:
            self.prompt_until = self.clock.seconds() + PROMPT_WINDOW

    def delay(self, attempt: int) -> float:
        """Seconds until the next attempt (C{ClientService}'s own count is not used)."""
        if self.prompt_until is not None and self.clock.seconds() < self.prompt_until:
            return self._prompt()
        self.prompt_until = None
        self.failures += 1
        delay = backoffPolicy(self.initial_delay, self.max_delay)(self.failures)
        if self.why is None:
            why = "Lost the connection to the relay."
        else:
            why = explain(self.why, self.where, self.clock.seconds(), self.tls.presented())
        self.why = None
        repeated, self.said = why == self.said, why
        self.log.info(
            "retrying in {delay:.2f} s: {why}",
            delay=delay,
            why=why,
            seconds=max(1, round(delay)),
            person="Relay still unreachable, retrying in {seconds} s."
            if repeated
            else "{why} Retrying in {seconds} s.",
        )
        return delay

    def _prompt(self) -> float:
        """
        A short random delay while the relay restarts or hands over: failed
        attempts are not counted, so the backoff after the window starts
        from its first step.
        """
        low, high = PROMPT_DELAY
        delay = low + (high - low) * self.uniform()
        if self.said != _GOING_AWAY:
            self.said = _GOING_AWAY
            self.log.info("the relay is going away; reconnecting", person=_GOING_AWAY)
        else:
            self.log.debug("relay still away; retrying in {delay:.2f} s", delay=delay)
        self.why = None
        self.failures = 0
        return delay


@implementer(IStreamClientEndpoint)
@attrs.frozen
class WatchedEndpoint:
    """An endpoint that tells C{failed} why a connection attempt failed."""

    endpoint: IStreamClientEndpoint
    failed: Callable[[Failure], None]

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self.failed(failure)
            return failure

        return self.endpoint.connect(protocolFactory).addErrback(failed)
