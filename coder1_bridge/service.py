"""The bridge as a Twisted service: connect out, stay connected, run commands."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from coder1_bridge.commands import CommandRunner
from coder1_bridge.config import BridgeConfig
from coder1_bridge.connection import BridgeClientFactory, BridgeClientProtocol, BridgeSession
from coder1_bridge.crash_log import CrashLog
from coder1_bridge.reconnect import Reconnect, WatchedEndpoint
from coder1_bridge.relay_endpoint import relay_endpoint, relay_tls
from coder1_bridge.relay_errors import UpgradeRefused, Where
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.terminals import TerminalManager
from coder1_wire import __version__
from coder1_wire.e2e import unb64u

_NOT_LABEL = re.compile(r"[^\w.@:+-]+", re.ASCII)
#: Seconds a stopping bridge waits for its connection to close before it aborts it.
CLOSE_TIMEOUT = 5.0
#: How Autobahn says the relay answered the WebSocket handshake with an HTTP error.
_UPGRADE_FAILED = re.compile(r"upgrade failed \[(\d+)\]")


def default_label() -> str:
    """This machine's host name, cut to what the relay accepts as a label."""
    return _NOT_LABEL.sub("-", socket.gethostname())[:64] or "bridge"


class BridgeService(MultiService):
    """Keeps one WebSocket to the relay open, reconnecting with backoff and jitter."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: BridgeConfig,
        *,
        telemetry: bool,
        label: str | None = None,
        max_delay: float = 30.0,
        replay: ReplaySettings | None = None,
        environ: Mapping[str, str] | None = None,
        crash_log: CrashLog | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.label = label or default_label()
        #: When the WebSocket to the relay opened; None while there is none.
        self.connected_since: float | None = None
        self.runner = CommandRunner(reactor, lambda envelope: self.session.send(envelope))
        self.terminals = TerminalManager(reactor, lambda envelope: self.session.send(envelope))
        self.session = BridgeSession(
            reactor,
            self.runner,
            self.terminals,
            __version__,
            telemetry,
            self._refused,
            config.identity,
            unb64u(config.browser_key),
            config.peer,
            replay=replay or ReplaySettings(),
            crash_log=crash_log,
        )
        self.refused: Deferred[str] = Deferred()
        self.protocol: BridgeClientProtocol | None = None
        self._waiting: list[Deferred[BridgeClientProtocol]] = []
        relay = config.relay
        headers = {
            "Authorization": f"Bearer {config.token}",
            "X-Coder1-Bridge-Version": __version__,
            "X-Coder1-Label": self.label,
            "X-Coder1-Telemetry": "on" if telemetry else "off",
        }
        factory = BridgeClientFactory(
            relay.websocket_url("/ws/bridge"),
            self.session,
            headers,
            self._connected,
            self._disconnected,
        )
        tls = relay_tls(relay)
        where = Where(relay, "pair again with the relay's certificate: --ca-cert FILE")
        self.reconnect = Reconnect(reactor, where, tls, max_delay=max_delay)
        endpoint = relay_endpoint(reactor, relay, tls, os.environ if environ is None else environ)
        self.client = ClientService(
            WatchedEndpoint(endpoint, self.reconnect.failed),
            factory,
            retryPolicy=self.reconnect.delay,
        )
        self.client.setServiceParent(self)

    def startService(self) -> None:
        self.log.info(
            "connecting to {url} as {label}",
            url=self.config.relay.url,
            label=self.label,
            host=self.config.relay.host,
            person="Connecting to {host} as “{label}”…",
        )
        super().startService()

    def snapshot(self) -> dict[str, Any]:
        """What C{coder1-bridge status} shows of this bridge: counts, never content."""
        return {
            "pid": os.getpid(),
            "relay": self.config.relay.url,
            "label": self.label,
            "connected": self.connected_since is not None,
            "since": self.connected_since,
            "terminals": self.terminals.running,
            "commands": self.runner.running,
            "telemetry": self.session.telemetry,
        }

    def when_connected(self) -> Deferred[BridgeClientProtocol]:
        """Fires with the protocol once a WebSocket to the relay is open."""
        if self.protocol is not None and self.protocol.state == BridgeClientProtocol.STATE_OPEN:
            return succeed(self.protocol)
        d: Deferred[BridgeClientProtocol] = Deferred()
        self._waiting.append(d)
        return d

    def _connected(self, protocol: BridgeClientProtocol) -> None:
        self.protocol = protocol
        self.connected_since = self.reactor.seconds()
        self.reconnect.opened()
        self.log.info(
            "connected to the relay",
            host=self.config.relay.host,
            code=self.config.verification,
            person="Connected to {host} (verification code {code})",
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(protocol)

    def _disconnected(self, protocol: BridgeClientProtocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
            self.connected_since = None
            self.log.info("disconnected from the relay; reconnecting")
            self.reconnect.closed(protocol.relay_close_code)
            return
        upgrade = _UPGRADE_FAILED.search(protocol.wasNotCleanReason or "")
        if upgrade is not None:
            self.reconnect.failed(UpgradeRefused(int(upgrade.group(1))))
        elif protocol.lost_because is not None:
            self.reconnect.failed(protocol.lost_because)

    def _refused(self, reason: str) -> None:
        if self.refused.called:
            return
        self.log.error("the relay refused this bridge: {reason}", reason=reason)
        self._let_go()
        self.client.stopService()
        self.refused.callback(reason)

    def _let_go(self, abort_after: float | None = None) -> IDelayedCall | None:
        """
        Unregister the connection's producer: ClientService closes it with
        loseConnection, and a TLS transport with a producer waits for it to go
        before it closes.  With C{abort_after}, abort the connection if it has
        not closed by then: a relay that holds this bridge (its tabs do not
        read) takes nothing of what is queued, the close included.
        """
        transport: Any = self.protocol.transport if self.protocol is not None else None
        if transport is None:
            return None
        transport.unregisterProducer()
        if abort_after is None:
            return None
        return self.reactor.callLater(abort_after, transport.abortConnection)

    async def _stop(self) -> None:
        running = self.runner.running + self.terminals.running
        if running:
            self.log.info(
                "stopping {running} processes",
                running=running,
                person="Stopping: ending {running} terminals and commands…",
            )
        self.session.stop_pausing()
        await gatherResults([self.runner.stop_all(), self.terminals.stop_all()])
        self.session.close()
        abort = self._let_go(abort_after=CLOSE_TIMEOUT)
        await super().stopService()
        if abort is not None and abort.active():
            abort.cancel()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
