"""A bridge session for unit tests, on a fake reactor, that sends what it is told to only."""

from __future__ import annotations

from typing import Any

from coder1_bridge.commands import CommandRunner
from coder1_bridge.connection import BridgeSession
from coder1_bridge.crash_log import CrashLog
from coder1_bridge.terminals import TerminalManager
from coder1_wire.e2e import Identity


def quiet_session(
    reactor: Any, *, telemetry: bool = False, crash_log: CrashLog | None = None
) -> BridgeSession:
    """
    A L{BridgeSession} on C{reactor} whose processes' events go nowhere (its
    runner and terminals send nothing), paired as bridge 1 with keys of its
    own, that ignores a refusal.
    """
    return BridgeSession(
        reactor,
        CommandRunner(reactor, lambda e: None),
        TerminalManager(reactor, lambda e: None),
        "0.1.0",
        telemetry,
        lambda reason: None,
        Identity.generate(),
        Identity.generate().public_raw,
        1,
        crash_log=crash_log,
    )
