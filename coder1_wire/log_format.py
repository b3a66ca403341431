"""
C{--log-format json}: twistd's log as one JSON object a line, for log shippers.

A line holds what the text log shows of an event and nothing more: its time
(ISO 8601, UTC), level, namespace, system, formatted text and traceback, if
any. An event's own fields are left out (a label, a path or a session id in a
field the message never printed would leak there), except the counts on
L{NUMERIC_FIELDS}, and those only when they hold a number, which carries no
content. L{JsonLog} makes twistd log this way from its first line ("starting
up") to its last ("Server Shut Down.").
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.application.service import IService, MultiService
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, eventAsText
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

#: The values of C{--log-format}.
LOG_FORMATS = ("text", "json")
#: Fields that are counts or seconds in the relay's and the bridge's log events.
NUMERIC_FIELDS = frozenset({"age", "cap", "count", "delay", "grace", "running", "seconds"})
#: twistd's log file when daemonized without C{--logfile}, as twistd names it.
TWISTD_LOGFILE = "twistd.log"


def event_as_json(event: LogEvent) -> str:
    """One line of JSON for C{event}."""
    when = datetime.fromtimestamp(event.get("log_time") or 0, UTC)
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "system": event.get("log_system", "-"),
        "text": eventAsText(
            event, includeTraceback=False, includeTimestamp=False, includeSystem=False
        ),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = _traceback(failure)
    for name in sorted(NUMERIC_FIELDS & event.keys()):
        value = event[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            line[name] = value
    return json.dumps(line) + "\n"


def _traceback(failure: Any) -> str:
    try:
        return str(failure.getTraceback())
    except Exception:
        return "(the traceback could not be formatted)"


def json_observer(out: TextIO) -> FileLogObserver:
    """An observer that writes each event to C{out} as a line of JSON."""
    return FileLogObserver(out, event_as_json)


def check_log_format(options: usage.Options) -> None:
    """
    Refuse a C{--log-format} other than text or json, and json with the twistd
    options it cannot honour (C{--syslog}, C{--logger}).
    """
    chosen = options["log-format"]
    if chosen not in LOG_FORMATS:
        raise usage.UsageError(f"--log-format must be text or json, not {chosen!r}")
    twistd: Any = getattr(options, "parent", None)
    if chosen != "json" or twistd is None:
        return
    for option in ("syslog", "logger"):
        if twistd.get(option):
            raise usage.UsageError(
                f"--log-format json writes to twistd's --logfile (or standard output), "
                f"not to its --{option}"
            )
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise usage.UsageError("a daemon cannot log to standard output; give --logfile or -n")


def twistd_log_file(twistd: Any) -> TextIO | LogFile:
    """
    The file twistd itself would log to with these options (checked by
    L{check_log_format}): C{--logfile}, standard output with C{-n} and no
    C{--logfile} (or C{--logfile=-}), else C{twistd.log}; a log file rotates on
    SIGUSR1, as twistd's does.
    """
    name = twistd.get("logfile") or ""
    if name == "-" or (not name and twistd.get("nodaemon")):
        return sys.stdout
    log_file = LogFile.fromFullPath(name or TWISTD_LOGFILE)
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: _rotate(log_file))
    return log_file


def _rotate(log_file: LogFile) -> None:
    from twisted.internet import reactor

    reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]


class JsonLog(MultiService):
    """
    The service twistd runs, wrapped so that twistd logs in JSON: twistd hands
    its application to C{setServiceParent}, and an L{ILogObserver} component on
    the application is the observer twistd installs (without C{--logger}).
    """

    def __init__(self, service: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def logging_as_chosen(options: usage.Options, service: IService) -> IService:
    """C{service}, wrapped by L{JsonLog} under twistd with C{--log-format json}."""
    twistd: Any = getattr(options, "parent", None)
    if options["log-format"] != "json" or twistd is None:
        return service
    return JsonLog(service, json_observer(twistd_log_file(twistd)))  # type: ignore[arg-type]
