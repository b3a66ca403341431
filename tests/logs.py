"""What the code under test logs, for tests that look at it."""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase


def capture_logs(case: SynchronousTestCase) -> list[LogEvent]:
    """Every event logged through twisted.logger from now until C{case} ends, in order."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events
