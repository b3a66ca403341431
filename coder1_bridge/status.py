"""
C{coder1-bridge status}: the pairing, whether a bridge runs for it right now
(asked of the running bridge through its status socket, not guessed) and
whether the relay still accepts its token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

from twisted.python.filepath import FilePath

from coder1_bridge import status_socket
from coder1_bridge.config import BridgeConfig
from coder1_bridge.output import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, Problem
from coder1_bridge.relay_api import RelayAPI
from coder1_bridge.relay_errors import describe_time
from coder1_bridge.service import default_label


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def describe_running(running: dict[str, Any] | None) -> str:
    """A sentence about the bridge process of this pairing, from its own answer."""
    if running is None:
        return (
            "No bridge is running for this pairing. Start one with: coder1-bridge start "
            "(or at every login: coder1-bridge service install)."
        )
    pid = running.get("pid")
    open_now = (
        f"{_count(int(running.get('terminals') or 0), 'terminal')} and "
        f"{_count(int(running.get('commands') or 0), 'command')} open"
    )
    since = running.get("since")
    if running.get("connected") and isinstance(since, int | float):
        return (
            f"The bridge is running (pid {pid}) and connected to the relay since "
            f"{describe_time(since)}; {open_now}."
        )
    return (
        f"The bridge is running (pid {pid}) but not connected to the relay right now (it keeps "
        f"trying; its output or log says why); {open_now}."
    )


async def status(
    reactor: Any, directory: FilePath[str], out: TextIO, environ: Mapping[str, str]
) -> int:
    """Say what is paired, what runs, and what the relay thinks of it."""
    config = BridgeConfig.load(directory)
    if config is None:
        out.write("This machine is not paired. Pair it with: coder1-bridge pair CODE\n")
        return EXIT_FAILED
    out.write(
        f"Paired with {config.relay.url} as bridge #{config.peer} "
        f"(“{config.label or default_label()}”); verification code {config.verification}.\n"
    )
    out.write(describe_running(await status_socket.query(reactor, directory)) + "\n")
    try:
        async with RelayAPI(reactor, config.relay, environ) as api:
            answer = await api.call(b"GET", "/api/token", token=config.token)
    except Problem as e:
        out.write(f"Cannot ask the relay about this bridge's token: {e}\n")
        return EXIT_FAILED
    if answer.status == 200:
        expires = describe_time(answer.body.get("expires_at"))
        out.write(f"The relay accepts this bridge's token (valid until {expires}).\n")
        return EXIT_OK
    out.write(
        f"The relay refuses this bridge's token: {answer.message}. "
        "Pair again: coder1-bridge pair CODE\n"
    )
    return EXIT_REFUSED
