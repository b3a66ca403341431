"""
When the bridge tries its relay again, and what it tells the person meanwhile.

C{ClientService} counts failed attempts only until a TCP connection is made:
a relay whose TLS certificate is refused, or which refuses the WebSocket
handshake, would be retried twice a second for ever.  L{Reconnect} counts from
the last WebSocket that opened instead, and says why each attempt failed.
"""

from __future__ import annotations

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
    log: Logger = attrs.field(factory=Logger, init=False)

    def failed(self, reason: Failure | BaseException) -> None:
        """An attempt failed before the WebSocket opened."""
        self.why = reason

    def opened(self) -> None:
        """A WebSocket to the relay is open."""
        self.failures = 0
        self.why = None
        self.said = None

    def delay(self, attempt: int) -> float:
        """Seconds until the next attempt (C{ClientService}'s own count is not used)."""
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
