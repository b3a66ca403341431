"""
What the bridge says to the person at the terminal.

The bridge logs with C{twisted.logger} as usual.  A log event meant for a
person carries a second format string under L{PERSON} (C{person=...} in the
call): a short sentence,
such as C{"Connected to {host} (verification code {code})"}.  In the
foreground (C{coder1-bridge start}) only those sentences are shown, one line
each, with no timestamp, namespace or object repr; C{--verbose} and the
daemon's log file (C{twistd coder1-bridge}, the systemd journal) get every
event, in full.  A failure never reaches the person as a traceback: it is
said in one line, with C{--verbose} as the way to see it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

#: The key of a log event's sentence for the person.
PERSON = "person"

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 3
#: What a shell reports for a program ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

#: Said (once) when something failed inside the bridge, in the foreground.
INTERNAL = (
    "Something went wrong inside the bridge; it carries on. Run with --verbose to see what, "
    "and please report it."
)


class Problem(Exception):
    """
    Something the person has to know, said in a sentence or two that end with
    what to do.  The CLI prints it and exits with status 1.
    """


def person_line(event: LogEvent) -> str | None:
    """The sentence of C{event} for the person, or None if it has none."""
    text = event.get(PERSON)
    if not isinstance(text, str):
        return None
    return formatEvent({**event, "log_format": text})


@implementer(ILogObserver)
class ForegroundObserver:
    """
    The foreground's observer: a line per event that has a sentence for the
    person, one line (once) for the first failure, nothing else.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.said_internal = False

    def __call__(self, event: LogEvent) -> None:
        line = person_line(event)
        if line is None and _is_failure(event) and not self.said_internal:
            self.said_internal = True
            line = INTERNAL
        if line is not None:
            self.out.write(line + "\n")
            self.out.flush()


def _is_failure(event: Mapping[str, Any]) -> bool:
    return "log_failure" in event or event.get("log_level") == LogLevel.critical


def detailed_observer(out: TextIO, environ: Mapping[str, str]) -> ILogObserver:
    """
    Every event, for C{--verbose}: with timestamps, except into the systemd
    journal (C{JOURNAL_STREAM} set), which stamps each line itself.
    """
    if environ.get("JOURNAL_STREAM"):
        return FileLogObserver(out, _journal_line)
    return textFileLogObserver(out)


def _journal_line(event: LogEvent) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    return f"[{event.get('log_namespace', '-')}] {text}\n"
