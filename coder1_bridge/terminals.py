"""
Interactive terminals the IDE opens on the user's machine.

L{TerminalManager} reads PTY_OPEN, PTY_INPUT, PTY_RESIZE, PTY_CLOSE and PTY_LIST
frames and answers with PTY_OPENED, PTY_OUTPUT, PTY_EXIT, PTY_ERROR and
PTY_LISTING frames through the send callable it was given: it has no network of
its own.

Each terminal is one program on a pseudo-terminal of its own, opened here so
that its window size is set before the program starts.  Twisted makes the
program a session leader with that terminal as its controlling terminal, so its
pid is also its process group id, and the terminal's line discipline (echo,
Ctrl-C, SIGWINCH on resize) works as in any terminal emulator.

Closing a terminal sends SIGHUP to its process group, as a terminal emulator
does when its window closes, and SIGKILL if the group is still there
C{kill_grace} seconds later.  Once the program has ended, the terminal stays open
at most C{linger} seconds for the rest of its output: a process that left the
group (a job of an interactive shell, a C{setsid} or C{nohup} child) and still
holds the terminal then gets it hung up, and PTY_EXIT follows.  While output is
paused (flow control) the rest of it is not being read, so the linger starts
over until it is: pausing loses nothing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.python.failure import Failure

from coder1_bridge import processes
from coder1_wire.envelope import Envelope, EnvelopeError, Kind, control

#: The smallest and largest number of columns or rows a terminal may have.
MIN_SIZE = 1
MAX_SIZE = 1000


@attrs.frozen
class TerminalSettings:
    """How the manager treats the terminals it opens."""

    max_terminals: int = 32
    #: Seconds between SIGHUP and SIGKILL when a terminal is closed.
    kill_grace: float = 2.0
    #: The program of a PTY_OPEN without argv, run as ``[shell, "-l"]``.
    shell: str = attrs.field(factory=processes.login_shell)
    #: TERM for every terminal's program.
    term: str = "xterm-256color"
    #: Seconds a terminal stays open after its program ended, when another
    #: process still holds it open, before it is hung up.
    linger: float = 1.0


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """Set the window size of the pseudo-terminal C{fd} (either side) belongs to."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class TerminalHandle(processes.ChildHandle, Protocol):
    """The part of Twisted's PTY process transport the manager uses."""

    def loseConnection(self) -> None: ...


#: The parts of L{IReactorProcess} and L{IReactorTime} the manager uses.
TerminalReactor = processes.ProcessReactor[TerminalHandle]


@attrs.frozen
class _Request:
    """A valid PTY_OPEN payload."""

    cols: int
    rows: int
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]


def _given(request: Envelope) -> dict[str, object]:
    """The JSON object of a request, without its null values: a null counts as absent."""
    try:
        return processes.json_object(request.json())
    except EnvelopeError as e:
        raise processes.bad_request(str(e)) from e


def _dimension(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and MIN_SIZE <= value <= MAX_SIZE:
        return value
    raise processes.bad_request(
        f"cols and rows must be whole numbers from {MIN_SIZE} to {MAX_SIZE}"
    )


def _size(given: Mapping[str, object]) -> tuple[int, int]:
    """The columns and rows of a request."""
    return _dimension(given.get("cols")), _dimension(given.get("rows"))


def _parse(request: Envelope, settings: TerminalSettings) -> _Request:
    given = _given(request)
    cols, rows = _size(given)
    argv = processes.parse_argv(given["argv"]) if "argv" in given else [settings.shell, "-l"]
    cwd, env = processes.parse_cwd_and_env(given)
    return _Request(cols=cols, rows=rows, argv=tuple(argv), cwd=cwd, env=env)


@attrs.define(eq=False, kw_only=True)
class _Terminal(processes.ManagedProcess[TerminalHandle]):
    """
    One open terminal.  Its pid is its process group id because it leads a
    session of its own.  Its timer is the KILL deadline while closing, then
    the hang-up once the program ended.
    """

    #: A descriptor of the terminal's master side that is the manager's own, for
    #: resizing: Twisted closes its descriptor when the terminal ends, after which
    #: its number may belong to anything.  Closed when PTY_EXIT is sent.
    window: int
    cols: int
    rows: int
    closing: bool = False
    #: Whether the program (the group leader) has ended and been reaped.
    exited: bool = False
    input_bytes: int = 0


class _TerminalProtocol(processes.ChildProtocol[_Terminal]):
    """Hands one terminal's events to the manager."""

    output_kind = Kind.PTY_OUTPUT
    _manager: TerminalManager

    def __init__(self, manager: TerminalManager) -> None:
        super().__init__(manager)
        #: Read while spawnProcess runs: Twisted forgets a pid once it has reaped it.
        self.pid: int | None = None
        #: Whether Twisted reaped the program inside spawnProcess.
        self.exited_early = False

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def processExited(self, reason: Failure) -> None:
        if self.child is None:
            self.exited_early = True
        else:
            self._manager._exited(self.child)


class TerminalManager(processes.ProcessManager[TerminalHandle, TerminalSettings, _Terminal]):
    """
    Opens and runs the IDE's interactive terminals, one per stream id.

    Never logs what a terminal runs, where or how, nor what is typed into it or
    what it prints: only stream ids and counts.
    """

    noun = "terminal"
    error_kind = Kind.PTY_ERROR
    in_use = "a terminal is already open on this stream"
    settings_type = TerminalSettings

    def _actions(self) -> Mapping[int, Callable[[Envelope], None]]:
        return {Kind.PTY_OPEN: self._start, Kind.PTY_LIST: self._list}

    def _stream_actions(self) -> Mapping[int, Callable[[_Terminal, Envelope], None]]:
        return {
            Kind.PTY_INPUT: lambda terminal, frame: self._input(terminal, frame.payload),
            Kind.PTY_RESIZE: self._resize,
            Kind.PTY_CLOSE: lambda terminal, _: self._stop(terminal),
        }

    def _spawn(self, request: Envelope) -> _Terminal:
        spec = _parse(request, self._settings)
        self._check_room(self._settings.max_terminals, "at most {} terminals may be open at once")
        env = {**os.environ, **spec.env, "TERM": self._settings.term, "COLORTERM": "truecolor"}
        processes.check_program(spec.argv[0], spec.cwd, env)

        try:
            master, slave = os.openpty()
        except OSError as e:
            raise processes.Refused("no-pty", f"could not open a terminal: {e}") from e
        window: int | None = None
        try:
            set_window_size(master, spec.cols, spec.rows)
            window = os.dup(master)
            protocol = _TerminalProtocol(self)
            process = self._reactor.spawnProcess(
                protocol,
                spec.argv[0],
                spec.argv,
                env,
                spec.cwd,
                usePTY=(master, slave, os.ttyname(slave)),
            )
        except BaseException as e:
            # Had spawnProcess succeeded, it would have closed the slave here and
            # the master when the terminal ends.
            for fd in (master, slave, window):
                if fd is not None:
                    os.close(fd)
            if isinstance(e, OSError):
                raise processes.Refused("spawn-failed", f"could not start the program: {e}") from e
            raise
        assert protocol.pid is not None
        terminal = _Terminal(
            stream=request.stream,
            peer=request.peer,
            process=process,
            pid=protocol.pid,
            window=window,
            cols=spec.cols,
            rows=spec.rows,
            started=self._reactor.seconds(),
        )
        protocol.child = terminal
        if protocol.exited_early:
            self._exited(terminal)
        return terminal

    def _started(self, terminal: _Terminal) -> None:
        self.log.info(
            "terminal {stream} opened, {running} open",
            stream=terminal.stream,
            running=self.running,
            person="Terminal opened ({running} open)",
        )
        body = {"pid": terminal.pid, "cols": terminal.cols, "rows": terminal.rows}
        self._reply(terminal, Kind.PTY_OPENED, control(Kind.PTY_OPENED, body).payload)

    def _input(self, terminal: _Terminal, data: bytes) -> None:
        if terminal.exited or not data:
            return
        terminal.input_bytes += len(data)
        # Queued for the end of the reactor's turn, not written at once: on a busy
        # machine the program then runs once the bridge is done with the frame,
        # rather than waiting for it mid-way (measured: bench keystroke --stages).
        terminal.process.write(data)

    def _resize(self, terminal: _Terminal, request: Envelope) -> None:
        try:
            cols, rows = _size(_given(request))
        except processes.Refused:
            # No reply: PTY_ERROR means a terminal that did not open.
            self.log.warn("terminal {stream}: ignored a bad resize", stream=terminal.stream)
            return
        try:
            set_window_size(terminal.window, cols, rows)
        except OSError:
            self.log.failure("terminal {stream}: resize failed", stream=terminal.stream)
            return
        terminal.cols, terminal.rows = cols, rows

    def _stop(self, terminal: _Terminal) -> None:
        """Close the terminal: HUP its group, then KILL it after the grace."""
        if terminal.closing:
            return  # keep the first KILL deadline
        terminal.closing = True
        if terminal.exited:
            # Only what left the group and holds the terminal keeps it open.
            terminal.cancel_timer()
            self._signal(terminal, signal.SIGKILL)
            self._hang_up(terminal)
            return
        self._stop_group(terminal, signal.SIGHUP)

    def _exited(self, terminal: _Terminal) -> None:
        """The program has ended; its terminal may still be held open by others."""
        terminal.exited = True
        terminal.cancel_timer()
        if terminal.closing:
            # What else of its group ignored HUP must not outlive a closed terminal.
            self._signal(terminal, signal.SIGKILL)
        # Usually the terminal closes at once, the program being its last user.
        terminal.timer = self._reactor.callLater(self._settings.linger, self._hang_up, terminal)

    def _hang_up(self, terminal: _Terminal) -> None:
        if terminal.holds and not terminal.closing:
            # What is left of its output is waiting to be read, not gone.
            terminal.timer = self._reactor.callLater(self._settings.linger, self._hang_up, terminal)
            return
        self.log.info("terminal {stream}: hanging up", stream=terminal.stream)
        terminal.process.loseConnection()

    def _exit_frame(self, terminal: _Terminal, exit_code: int | None, sig: int | None) -> Envelope:
        terminal.cancel_timer()
        os.close(terminal.window)
        self.log.info(
            "terminal {stream} ended ({outcome}), {input} bytes in, {output} bytes out",
            stream=terminal.stream,
            outcome="closed" if terminal.closing else "exited",
            input=terminal.input_bytes,
            output=terminal.output_bytes,
            person="Terminal closed",
        )
        return control(Kind.PTY_EXIT, {"exit_code": exit_code, "signal": sig})

    def _list(self, request: Envelope) -> None:
        body: dict[str, Any] = {
            "terminals": [
                {
                    "stream": t.stream,
                    "peer": t.peer,
                    "cols": t.cols,
                    "rows": t.rows,
                    "started": t.started,
                    "pid": t.pid,
                }
                for t in self._processes.values()
            ]
        }
        frame = control(Kind.PTY_LISTING, body, stream=request.stream, peer=request.peer)
        self._send(frame)
