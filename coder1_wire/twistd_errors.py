"""
How a twistd plugin (C{twistd coder1-relay}, C{twistd coder1-bridge}) says
that it cannot start: one line on stderr, no usage screen, no traceback.

twistd itself prints its whole usage before an option error, and a traceback
for an exception raised while the application starts.  L{OneLineUsageErrors}
turns the first into one line (and "see --help"); L{CannotStart} is the
exception for the second, and L{say_cannot_start} the hook that prints it as
its message alone.  A L{CannotStart} raised from C{privilegedStartService} or
C{startService} is still an ordinary exception to twistd: a daemon's parent
process hears of it through twistd's status pipe and exits 1, and twistd
removes its pid file, as for any start failure.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from types import TracebackType

from twisted.python import usage

#: The exit status of an option error (as argparse's; a start failure is 1).
USAGE_EXIT = 2


class CannotStart(Exception):
    """The program cannot start: the message is one line that says why and what to do."""


class OneLineUsageErrors(usage.Options):
    """
    Options whose errors, under twistd, are one line and a pointer to C{--help}
    (exit status L{USAGE_EXIT}) instead of twistd's usage screen; used on
    their own (no twistd above them) they raise C{UsageError} as usual.
    """

    #: How the person started the program, for the message.
    command = "twistd"

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"{self.command}: {e} (see {self.command} --help)\n")
            # As usage.Options does for --help: twistd lets SystemExit through.
            raise SystemExit(USAGE_EXIT) from None


_Hook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def say_cannot_start(foreground: bool) -> None:
    """
    Print an uncaught L{CannotStart} as its message alone; any other exception
    as before.  In the foreground it goes to the real stderr, not to twistd's
    log (which takes over C{sys.stderr} once it starts); a daemon's
    C{sys.stderr} is the terminal until twistd detaches it, its log file after.
    Process-wide: for twistd's plugins' C{makeService}.
    """
    previous: _Hook = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(error, CannotStart):
            previous(kind, error, tb)
            return
        stream = (sys.__stderr__ if foreground else None) or sys.stderr
        stream.write(f"{error}\n")
        stream.flush()

    sys.excepthook = hook


def runs_in_foreground(options: usage.Options) -> bool:
    """Whether twistd, above these options, keeps the process in the foreground (C{-n})."""
    parent = options.parent
    return parent is None or bool(parent.get("nodaemon"))


def exit_with_status_when_done(status: int) -> None:
    """
    Make this process exit with C{status} once twistd is done with it (its
    reactor stopped, its pid file removed): twistd itself exits 0 after its
    reactor stops, whatever stopped it (Twisted issue #11335).  For a
    service that stops its reactor because it cannot run, so that systemd
    and scripts see the failure.  The last handler at exit: the standard
    streams are flushed, the handlers registered before it do not run.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    atexit.register(leave)
