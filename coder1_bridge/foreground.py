"""
C{coder1-bridge start}: the bridge in the foreground, until Ctrl-C (or a
signal) stops it or the relay refuses it, with its status socket for
C{coder1-bridge status}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from coder1_bridge import status_socket
from coder1_bridge.config import BridgeConfig
from coder1_bridge.crash_log import CrashLog
from coder1_bridge.output import EXIT_OK, EXIT_REFUSED, Problem
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.service import BridgeService
from coder1_wire.crash import telemetry_enabled


def bridge_services(
    reactor: Any,
    directory: FilePath[str],
    config: BridgeConfig,
    label: str,
    replay: ReplaySettings,
    environ: Mapping[str, str],
) -> tuple[MultiService, BridgeService]:
    """The bridge and its status socket, as C{start} and C{twistd coder1-bridge} run them."""
    bridge = BridgeService(
        reactor,
        config,
        telemetry=telemetry_enabled(environ),
        label=label,
        replay=replay,
        environ=environ,
        crash_log=CrashLog(directory, reactor),
    )
    services = MultiService()
    bridge.setServiceParent(services)
    status_socket.StatusService(reactor, directory, bridge.snapshot).setServiceParent(services)
    return services, bridge


async def start(
    reactor: Any,
    directory: FilePath[str],
    config: BridgeConfig,
    label: str,
    replay: ReplaySettings,
    out: TextIO,
    environ: Mapping[str, str],
) -> int:
    """Run the bridge until stopped (0) or refused by the relay (3)."""
    running = await status_socket.query(reactor, directory)
    if running is not None:
        raise Problem(
            f"A bridge is already running for this pairing (pid {running.get('pid')}); "
            "`coder1-bridge status` says more. Stop it first to start another."
        )
    if label != config.label:
        config = attrs.evolve(config, label=label)
        config.save(directory)  # later starts, twistd and the service keep it
    services, bridge = bridge_services(reactor, directory, config, label, replay, environ)
    outcome: Deferred[str | None] = Deferred()

    async def stop() -> None:
        await services.stopService()
        # After the ^C a terminal echoes, on a line of its own.
        out.write("\nStopped.\n" if out.isatty() else "Stopped.\n")
        out.flush()
        if not outcome.called:
            outcome.callback(None)

    trigger = reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(stop())
    )

    def refused(reason: str) -> None:
        if not outcome.called:
            outcome.callback(reason)

    bridge.refused.addCallback(refused)
    services.startService()
    out.write("Press Ctrl-C to stop the bridge.\n")
    out.flush()
    reason = await outcome
    if reason is None:
        return EXIT_OK
    reactor.removeSystemEventTrigger(trigger)
    await services.stopService()
    out.write(f"The relay refused this bridge: {reason}. Pair again: coder1-bridge pair CODE\n")
    return EXIT_REFUSED
