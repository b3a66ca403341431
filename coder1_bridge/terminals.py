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
holds the terminal then gets it hung up, and PTY_EXIT follows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_bridge.commands import Timer, _executable_exists, _is_text
from coder1_wire.envelope import Envelope, EnvelopeError, Kind, control

#: The smallest and largest number of columns or rows a terminal may have.
MIN_SIZE = 1
MAX_SIZE = 1000


class TerminalHandle(Protocol):
    """The part of Twisted's PTY process transport the manager uses."""

    def write(self, data: bytes) -> None: ...

    def signalProcess(self, signalID: str | int) -> None: ...

    def loseConnection(self) -> None: ...


class TerminalReactor(Protocol):
    """The parts of L{IReactorProcess} and L{IReactorTime} the manager uses."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        *,
        usePTY: tuple[int, int, str],
    ) -> TerminalHandle: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> Timer: ...

    def seconds(self) -> float: ...


def _login_shell() -> str:
    return os.environ.get("SHELL") or "/bin/sh"


@attrs.frozen
class TerminalSettings:
    """How the manager treats the terminals it opens."""

    max_terminals: int = 32
    #: Seconds between SIGHUP and SIGKILL when a terminal is closed.
    kill_grace: float = 2.0
    #: The program of a PTY_OPEN without argv, run as ``[shell, "-l"]``.
    shell: str = attrs.field(factory=_login_shell)
    #: TERM for every terminal's program.
    term: str = "xterm-256color"
    #: Seconds a terminal stays open after its program ended, when another
    #: process still holds it open, before it is hung up.
    linger: float = 1.0


def set_window_size(fd: int, cols: int, rows: int) -> None:
    """Set the window size of the pseudo-terminal C{fd} (either side) belongs to."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _Refused(Exception):
    """A PTY_OPEN that will not run; becomes one PTY_ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _BadSize(ValueError):
    """A window size outside what a terminal may have."""


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
    body = request.json()
    if not isinstance(body, dict):
        raise EnvelopeError("the request must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}


def _dimension(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and MIN_SIZE <= value <= MAX_SIZE:
        return value
    raise _BadSize(f"cols and rows must be whole numbers from {MIN_SIZE} to {MAX_SIZE}")


def _size(given: Mapping[str, object]) -> tuple[int, int]:
    """The columns and rows of a request."""
    return _dimension(given.get("cols")), _dimension(given.get("rows"))


def _parse(request: Envelope, settings: TerminalSettings) -> _Request:
    def bad(message: str) -> _Refused:
        return _Refused("bad-request", message)

    try:
        given = _given(request)
    except EnvelopeError as e:
        raise bad(str(e)) from e
    try:
        cols, rows = _size(given)
    except _BadSize as e:
        raise bad(str(e)) from e

    if "argv" in given:
        raw = given["argv"]
        if not (isinstance(raw, list) and raw and all(_is_text(a) for a in raw)):
            raise bad("argv must be a non-empty list of strings")
        argv: list[str] = raw
    else:
        argv = [settings.shell, "-l"]

    cwd = given.get("cwd", "")
    if not _is_text(cwd):
        raise bad("cwd must be a string")
    env = given.get("env", {})
    if not (
        isinstance(env, dict)
        and all(_is_text(k) and k and "=" not in k and _is_text(v) for k, v in env.items())
    ):
        raise bad("env must map variable names to strings")

    home = os.path.expanduser("~")
    return _Request(
        cols=cols,
        rows=rows,
        argv=tuple(argv),
        # A relative cwd is taken from the home directory, the default one.
        cwd=os.path.join(home, cwd) if cwd else home,
        env=env,
    )


@attrs.define(eq=False)
class _Terminal:
    """One open terminal."""

    stream: int
    peer: int
    process: TerminalHandle
    #: Its process group id, which is its pid: it leads a session of its own.
    pid: int
    #: A descriptor of the terminal's master side that is the manager's own, for
    #: resizing: Twisted closes its descriptor when the terminal ends, after which
    #: its number may belong to anything.  Closed when PTY_EXIT is sent.
    window: int
    cols: int
    rows: int
    started: float
    #: The KILL deadline while closing, then the hang-up once the program ended.
    timer: Timer | None = None
    closing: bool = False
    #: Whether the program (the group leader) has ended and been reaped.
    exited: bool = False
    seq: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    ended: Deferred[None] = attrs.field(factory=Deferred)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class _TerminalProtocol(ProcessProtocol):
    """Hands one terminal's events to the manager."""

    def __init__(self, manager: TerminalManager) -> None:
        self._manager = manager
        #: Set as soon as spawnProcess returns, which is before any output.
        self.terminal: _Terminal | None = None
        #: Read while spawnProcess runs: Twisted forgets a pid once it has reaped it.
        self.pid: int | None = None
        #: Whether Twisted reaped the program inside spawnProcess.
        self.exited_early = False

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        assert self.terminal is not None
        self._manager._output(self.terminal, data)

    def processExited(self, reason: Failure) -> None:
        if self.terminal is None:
            self.exited_early = True
        else:
            self._manager._exited(self.terminal)

    def processEnded(self, reason: Failure) -> None:
        assert self.terminal is not None
        self._manager._ended(self.terminal, reason)


class TerminalManager:
    """
    Opens and runs the IDE's interactive terminals, one per stream id.

    Never logs what a terminal runs, where or how, nor what is typed into it or
    what it prints: only stream ids and counts.
    """

    log = Logger()

    def __init__(
        self,
        reactor: TerminalReactor,
        send: Callable[[Envelope], None],
        settings: TerminalSettings | None = None,
        *,
        kill: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self._reactor = reactor
        self._send = send
        self._settings = settings if settings is not None else TerminalSettings()
        self._kill = kill
        self._terminals: dict[int, _Terminal] = {}

    @property
    def running(self) -> int:
        """How many terminals are open now."""
        return len(self._terminals)

    def handle(self, envelope: Envelope) -> None:
        """Act on a PTY_OPEN, PTY_INPUT, PTY_RESIZE, PTY_CLOSE or PTY_LIST frame."""
        if envelope.kind == Kind.PTY_OPEN:
            self._open(envelope)
            return
        if envelope.kind == Kind.PTY_LIST:
            self._list(envelope)
            return
        if envelope.kind not in (Kind.PTY_INPUT, Kind.PTY_RESIZE, Kind.PTY_CLOSE):
            self.log.warn("ignored a frame of kind {kind}", kind=envelope.kind)
            return
        terminal = self._terminals.get(envelope.stream)
        if terminal is None:
            return  # it may just have ended
        if envelope.kind == Kind.PTY_INPUT:
            self._input(terminal, envelope.payload)
        elif envelope.kind == Kind.PTY_RESIZE:
            self._resize(terminal, envelope)
        else:
            self._close(terminal)

    def stop_all(self) -> Deferred[None]:
        """HUP, then KILL, every terminal; fires once all have ended."""
        terminals = list(self._terminals.values())
        for terminal in terminals:
            self._close(terminal)
        return gatherResults([t.ended for t in terminals]).addCallback(lambda _: None)

    def _open(self, request: Envelope) -> None:
        try:
            terminal = self._spawn(request)
        except _Refused as e:
            self.log.info("terminal {stream} refused: {code}", stream=request.stream, code=e.code)
            live = self._terminals.get(request.stream)
            self._send(
                attrs.evolve(
                    control(
                        Kind.PTY_ERROR,
                        {"error": e.code, "message": e.message},
                        stream=request.stream,
                        peer=request.peer,
                    ),
                    # A refused duplicate must not disturb the live terminal's numbering.
                    seq=0 if live is None else live.next_seq(),
                )
            )
            return
        self._terminals[terminal.stream] = terminal
        self.log.info(
            "terminal {stream} opened, {running} open",
            stream=terminal.stream,
            running=self.running,
        )
        body = {"pid": terminal.pid, "cols": terminal.cols, "rows": terminal.rows}
        self._reply(terminal, Kind.PTY_OPENED, control(Kind.PTY_OPENED, body).payload)

    def _spawn(self, request: Envelope) -> _Terminal:
        if request.stream in self._terminals:
            raise _Refused("stream-in-use", "a terminal is already open on this stream")
        spec = _parse(request, self._settings)
        if self.running >= self._settings.max_terminals:
            raise _Refused(
                "too-many",
                f"at most {self._settings.max_terminals} terminals may be open at once",
            )
        if not os.path.isdir(spec.cwd):
            raise _Refused("bad-cwd", f"no such directory: {spec.cwd}")
        env = {**os.environ, **spec.env, "TERM": self._settings.term, "COLORTERM": "truecolor"}
        # Found here, the user gets PTY_ERROR rather than a traceback in the terminal.
        if not _executable_exists(spec.argv[0], env.get("PATH", os.defpath), spec.cwd):
            raise _Refused("not-found", f"command not found: {spec.argv[0]}")

        try:
            master, slave = os.openpty()
        except OSError as e:
            raise _Refused("no-pty", f"could not open a terminal: {e}") from e
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
                raise _Refused("spawn-failed", f"could not start the program: {e}") from e
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
        protocol.terminal = terminal
        if protocol.exited_early:
            self._exited(terminal)
        return terminal

    def _input(self, terminal: _Terminal, data: bytes) -> None:
        if terminal.exited or not data:
            return
        terminal.input_bytes += len(data)
        terminal.process.write(data)

    def _resize(self, terminal: _Terminal, request: Envelope) -> None:
        try:
            cols, rows = _size(_given(request))
        except (EnvelopeError, _BadSize):
            # No reply: PTY_ERROR means a terminal that did not open.
            self.log.warn("terminal {stream}: ignored a bad resize", stream=terminal.stream)
            return
        try:
            set_window_size(terminal.window, cols, rows)
        except OSError:
            self.log.failure("terminal {stream}: resize failed", stream=terminal.stream)
            return
        terminal.cols, terminal.rows = cols, rows

    def _close(self, terminal: _Terminal) -> None:
        if terminal.closing:
            return  # keep the first KILL deadline
        terminal.closing = True
        if terminal.exited:
            # Only what left the group and holds the terminal keeps it open.
            terminal.cancel_timer()
            self._signal(terminal, signal.SIGKILL)
            self._hang_up(terminal)
            return
        self._signal(terminal, signal.SIGHUP)
        terminal.timer = self._reactor.callLater(
            self._settings.kill_grace, self._signal, terminal, signal.SIGKILL
        )

    def _signal(self, terminal: _Terminal, sig: int) -> None:
        try:
            self._kill(terminal.pid, sig)
        except ProcessLookupError:
            # No such group: either the child has not reached setsid() yet, and
            # is a lone process to signal alone, or the group is gone, and
            # Twisted has reaped the process and refuses to signal a pid that may
            # since have been reused.
            with contextlib.suppress(ProcessExitedAlready):
                terminal.process.signalProcess(sig)

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
        self.log.info("terminal {stream}: hanging up", stream=terminal.stream)
        terminal.process.loseConnection()

    def _output(self, terminal: _Terminal, data: bytes) -> None:
        terminal.output_bytes += len(data)
        self._reply(terminal, Kind.PTY_OUTPUT, data)

    def _ended(self, terminal: _Terminal, reason: Failure) -> None:
        del self._terminals[terminal.stream]
        terminal.cancel_timer()
        os.close(terminal.window)
        exit_code = sig = None
        if isinstance(reason.value, ProcessDone | ProcessTerminated):
            exit_code, sig = reason.value.exitCode, reason.value.signal
        self.log.info(
            "terminal {stream} ended ({outcome}), {input} bytes in, {output} bytes out",
            stream=terminal.stream,
            outcome="closed" if terminal.closing else "exited",
            input=terminal.input_bytes,
            output=terminal.output_bytes,
        )
        try:
            body = {"exit_code": exit_code, "signal": sig}
            self._reply(terminal, Kind.PTY_EXIT, control(Kind.PTY_EXIT, body).payload)
        finally:
            terminal.ended.callback(None)

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
                for t in self._terminals.values()
            ]
        }
        live = self._terminals.get(request.stream)
        frame = control(Kind.PTY_LISTING, body, stream=request.stream, peer=request.peer)
        # Asked on a terminal's stream, the reply takes that stream's next seq.
        self._send(attrs.evolve(frame, seq=0 if live is None else live.next_seq()))

    def _reply(self, terminal: _Terminal, kind: Kind, payload: bytes) -> None:
        self._send(Envelope(kind, terminal.stream, terminal.next_seq(), terminal.peer, payload))
