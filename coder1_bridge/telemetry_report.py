"""
C{coder1-bridge telemetry}: what this bridge sends the relay about itself.

Whether telemetry is on, and why (C{CODER1_TELEMETRY} in this shell, and what
the running bridge of this pairing says through its status socket); what the
relay keeps of a bridge with telemetry on; and the crash reports the bridge
sent, verbatim, from its own copies (L{coder1_bridge.crash_log}).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.python.filepath import FilePath

from coder1_bridge import status_socket
from coder1_bridge.crash_log import CRASH_LOG_NAME, KEEP, read_reports
from coder1_bridge.output import EXIT_OK
from coder1_wire import __version__
from coder1_wire.crash import telemetry_enabled

VARIABLE = "CODER1_TELEMETRY"

WHAT_IS_KEPT = f"""\
With telemetry on, the relay keeps for 30 days:
  - this bridge's version ({__version__}), from the X-Coder1-Bridge-Version header of each \
connection, counted per hour;
  - when each of its connections opened and closed, as the relay sees them (not which bridge's);
  - how many commands the IDE started on it and how many completed, per hour (never which);
  - the crash reports it sends: the exception's type and the bridge's own code lines \
(module, function, line number), never a message, an argument, a path or what runs.
Crash reports are never queued: each is sent the moment it is made, over the open \
connection, or not made at all; none is waiting to be sent.
"""

WHAT_OFF_MEANS = """\
With telemetry off, the bridge tells the relay so (X-Coder1-Telemetry: off) with each \
connection, and the relay records nothing about it: not its version, its connection times or \
its commands. The bridge makes no crash report, so none is sent or kept.
"""


def describe_setting(environ: Mapping[str, str]) -> str:
    """Whether telemetry is on for a bridge started from here, and why."""
    value = environ.get(VARIABLE, "")
    if not value.strip():
        return f"Telemetry is on: {VARIABLE} is not set. To turn it off: export {VARIABLE}=false"
    if not telemetry_enabled(environ):
        return f"Telemetry is off: {VARIABLE}={value} is in effect in this shell."
    return (
        f"Telemetry is on: {VARIABLE}={value} does not turn it off (false, 0, no or off do). "
        f"To turn it off: export {VARIABLE}=false"
    )


def describe_running(running: dict[str, Any] | None, here: bool) -> str | None:
    """A sentence about the running bridge's own setting, when it says and it matters."""
    if running is None or not isinstance(running.get("telemetry"), bool):
        return None
    on = running["telemetry"]
    said = f"The bridge running for this pairing (pid {running.get('pid')}) has telemetry "
    if on == here:
        return said + ("on." if on else "off.")
    return said + (
        f"{'on' if on else 'off'}, as set where it was started; restart it (or run "
        "`coder1-bridge service install` again) to use this shell's setting."
    )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_reports(directory: FilePath[str], here: bool) -> list[str]:
    """The crash reports kept, verbatim, with where they are."""
    path = directory.child(CRASH_LOG_NAME)
    reports = read_reports(path)
    if not reports:
        return [f"This bridge has sent no crash report (it keeps a copy of each in {path.path})."]
    which = f"last {len(reports)} crash reports" if len(reports) > 1 else "crash report"
    earlier = "" if here else " while telemetry was on"
    lines = [
        f"The {which} this bridge sent{earlier}, exactly as sent (it keeps up to {KEEP}, "
        f"in {path.path}):"
    ]
    for report in reports:
        lines += [f"Sent {_when(report.sent_at)}:", report.payload]
    return lines


async def telemetry(
    reactor: Any, directory: FilePath[str], out: TextIO, environ: Mapping[str, str]
) -> int:
    """Say whether telemetry is on and why, what it sends, and the crash reports sent."""
    here = telemetry_enabled(environ)
    lines = [describe_setting(environ)]
    running = describe_running(await status_socket.query(reactor, directory), here)
    if running is not None:
        lines.append(running)
    lines.append((WHAT_IS_KEPT if here else WHAT_OFF_MEANS).rstrip("\n"))
    lines += describe_reports(directory, here)
    out.write("\n".join(lines) + "\n")
    return EXIT_OK
