"""
Stopping the relay without losing anyone (README, "Restarting without losing
anyone").

On C{SIGTERM} (twistd's C{stopService}) the relay stops accepting, closes
every WebSocket with 1001 "going away", which bridges and pages take as "come
back at once" (to another relay process where there is one, or to this one
restarted), and waits up to C{--drain-timeout} for the connections to close and
the store to write what it holds.  Whatever is left then is dropped, and the
process exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from coder1_relay.context import Connections
from coder1_wire import closecodes

#: Seconds a stopping relay waits for its connections to close and its store to flush.
DRAIN_TIMEOUT = 10.0
#: The reason sent with the 1001 close.
REASON = "relay going away"


@attrs.frozen
class Drain:
    """The steps of a stop, in order, each within what is left of C{timeout} seconds."""

    clock: Any
    timeout: float = DRAIN_TIMEOUT
    log = Logger()

    async def run(
        self,
        listeners: Sequence[IListeningPort],
        leave: Callable[[], Deferred[None]] | None,
        connections: Connections,
        flushed: Callable[[], Deferred[None]],
    ) -> None:
        """
        Stop C{listeners}; C{leave} the deployment (several relay nodes) so
        that the clients closed next are claimed elsewhere; close every
        connection with 1001, dropping those still open at the deadline; then
        wait for C{flushed} until the deadline.
        """
        deadline = self.clock.seconds() + self.timeout
        for port in listeners:
            await maybeDeferred(port.stopListening)
        if leave is not None:
            await leave()
        live = list(connections.live)
        for connection in live:
            connection.close(closecodes.GOING_AWAY, REASON)
        dropped = 0
        if not await self._within(connections.when_idle(), deadline):
            dropped = len(connections.live)
            for connection in list(connections.live):
                connection.abort()
            await connections.when_idle()
        stored = await self._within(flushed(), deadline)
        self.log.info(
            "relay stopped: WebSockets closed with 1001 (going away): {closed}, "
            "dropped at the drain timeout: {dropped}",
            closed=len(live) - dropped,
            dropped=dropped,
        )
        if not stored:
            self.log.warn(
                "the store had not finished writing within --drain-timeout ({timeout:g} s); "
                "the last changes may be lost",
                timeout=self.timeout,
            )

    async def _within(self, d: Deferred[None], deadline: float) -> bool:
        """Whether C{d} fired before C{deadline}; it is cancelled if not."""
        left = max(0.0, deadline - self.clock.seconds())
        try:
            await d.addTimeout(left, self.clock)
        except defer.TimeoutError:
            return False
        return True


def exit_zero_after_sigterm(reactor: Any) -> None:
    """
    A relay drained on SIGTERM stopped as asked: let twistd exit 0.  (Twisted
    records the signal, C{reactor._exitSignal}, and twistd kills itself with
    it once the reactor has stopped, so the exit status would say "killed by
    SIGTERM".)
    """
    if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
        reactor._exitSignal = None
