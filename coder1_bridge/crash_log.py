"""
The bridge's own copy of the crash reports it sent, for C{coder1-bridge telemetry}.

With telemetry on, each crash report the bridge sends to the relay is also
kept, exactly as sent (its JSON payload) with the time it was sent, in
C{crash-reports.json} in the pairing's directory: mode 0600, the last
L{KEEP} reports. With telemetry off no report is made, so none is kept. The
bridge does not queue reports: one is sent at once over the open connection,
and one that could not be sent is neither queued nor kept.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from coder1_wire.crash import sanitize_crash_report
from coder1_wire.secretfile import write_secret

CRASH_LOG_NAME = "crash-reports.json"
#: The reports kept, the latest ones.
KEEP = 20

_log = Logger()


@attrs.frozen
class SentReport:
    """A crash report as it was sent: its JSON payload, and when (unix seconds)."""

    sent_at: float
    payload: str


@attrs.define
class CrashLog:
    """The kept copies, in C{directory}/L{CRASH_LOG_NAME}."""

    directory: FilePath[str]
    clock: IReactorTime

    @property
    def path(self) -> FilePath[str]:
        return self.directory.child(CRASH_LOG_NAME)

    def record(self, payload: bytes) -> None:
        """Keep a copy of a report just sent; the oldest beyond L{KEEP} go."""
        kept = [*read_reports(self.path), SentReport(self.clock.seconds(), payload.decode())]
        entries = [attrs.asdict(report) for report in kept[-KEEP:]]
        try:
            write_secret(self.path, json.dumps(entries, indent=1).encode())
        except OSError as e:
            _log.warn("could not keep a copy of the crash report sent: {why}", why=e.strerror)


def read_reports(path: FilePath[str]) -> list[SentReport]:
    """
    The copies kept in C{path}, oldest first; an entry that is not exactly a
    report as the bridge sends it is left out (so is a file that is not ours).
    """
    try:
        entries: Any = json.loads(path.getContent())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [report for report in map(_entry, entries[-KEEP:]) if report is not None]


def _entry(entry: Any) -> SentReport | None:
    if not isinstance(entry, dict) or entry.keys() != {"sent_at", "payload"}:
        return None
    sent_at, payload = entry["sent_at"], entry["payload"]
    if not isinstance(sent_at, int | float) or not isinstance(payload, str):
        return None
    try:
        if sanitize_crash_report(json.loads(payload)) is None:
            return None
    except ValueError:
        return None
    return SentReport(float(sent_at), payload)
