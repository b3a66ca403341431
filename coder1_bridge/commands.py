"""
One-shot commands the IDE asks the bridge to run.

L{CommandRunner} reads CMD_START, CMD_STDIN and CMD_CANCEL frames and answers
with CMD_STDOUT, CMD_STDERR, CMD_EXIT and CMD_ERROR frames through the send
callable it was given: it has no network of its own.

Each command runs in a session of its own, so cancelling it or timing it out
signals its whole process group, grandchildren included.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeGuard

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_wire.envelope import Envelope, EnvelopeError, Kind, control

#: Runs ahead of every command, given the cwd and then the argv: a new session
#: (so the pid is also the process group id), the cwd, then exec of the command.
#: spawnProcess cannot setsid, so this is the way in with public APIs only.  The
#: cwd is set here, not by spawnProcess, because given a path spawnProcess forks
#: instead of using posix_spawnp, and a TERM that reaches the forked copy of this
#: process before its exec is caught by the reactor's handler and lost.
#: -I -S: ignore PYTHON* variables and site-packages, and start fast.
TRAMPOLINE = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    "import os,sys;os.setsid();os.chdir(sys.argv[1]);os.execvp(sys.argv[2],sys.argv[2:])",
)


class ProcessHandle(Protocol):
    """The part of L{IProcessTransport} the runner uses."""

    @property
    def pid(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def closeStdin(self) -> None: ...

    def signalProcess(self, signalID: str | int) -> None: ...


class Timer(Protocol):
    """The part of L{IDelayedCall} the runner uses."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class CommandReactor(Protocol):
    """The parts of L{IReactorProcess} and L{IReactorTime} the runner uses."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> ProcessHandle: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> Timer: ...

    def seconds(self) -> float: ...


def _login_shell() -> str:
    return os.environ.get("SHELL") or "/bin/sh"


@attrs.frozen
class CommandSettings:
    """How the runner treats the commands it starts."""

    #: Seconds between TERM and KILL when a command is cancelled or times out.
    kill_grace: float = 5.0
    max_concurrent: int = 32
    #: Seconds a command may run when its request gives no timeout; None: forever.
    default_timeout: float | None = None
    #: Runs "shell" requests as ``[shell, "-l", "-c", line]``.
    shell: str = attrs.field(factory=_login_shell)


class _Refused(Exception):
    """A CMD_START that will not run; becomes one CMD_ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@attrs.frozen
class _Request:
    """A valid CMD_START payload."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    stdin: bool
    timeout: float | None


def _is_text(value: object) -> TypeGuard[str]:
    """Whether exec can pass C{value}: a string without NUL that the OS can encode."""
    # Refused here, rather than failing inside spawnProcess or the trampoline.
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def _parse(request: Envelope, settings: CommandSettings) -> _Request:
    def bad(message: str) -> _Refused:
        return _Refused("bad-request", message)

    try:
        body = request.json()
    except EnvelopeError as e:
        raise bad("the request is not JSON") from e
    if not isinstance(body, dict):
        raise bad("the request must be a JSON object")
    # An explicit null counts as absent, for every key.
    given: dict[str, object] = {k: v for k, v in body.items() if v is not None}

    if ("argv" in given) == ("shell" in given):
        raise bad("give exactly one of argv and shell")
    if "shell" in given:
        line = given["shell"]
        if not _is_text(line):
            raise bad("shell must be a string")
        argv: list[str] = [settings.shell, "-l", "-c", line]
    else:
        raw = given["argv"]
        if not (isinstance(raw, list) and raw and all(_is_text(a) for a in raw)):
            raise bad("argv must be a non-empty list of strings")
        argv = raw

    cwd = given.get("cwd", "")
    if not _is_text(cwd):
        raise bad("cwd must be a string")
    env = given.get("env", {})
    if not (
        isinstance(env, dict)
        and all(_is_text(k) and k and "=" not in k and _is_text(v) for k, v in env.items())
    ):
        raise bad("env must map variable names to strings")
    stdin = given.get("stdin", False)
    if not isinstance(stdin, bool):
        raise bad("stdin must be true or false")
    timeout = given.get("timeout", settings.default_timeout)
    if timeout is not None and not (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and timeout > 0
    ):
        raise bad("timeout must be a positive number of seconds")

    home = os.path.expanduser("~")
    return _Request(
        argv=tuple(argv),
        # A relative cwd is taken from the home directory, the default one.
        cwd=os.path.join(home, cwd) if cwd else home,
        env=env,
        stdin=stdin,
        timeout=timeout,
    )


def _executable_exists(name: str, path: str, cwd: str) -> bool:
    """Whether execvp, run in C{cwd} with C{path} as PATH, would find C{name}."""
    if os.sep in name:
        full = os.path.join(cwd, name)
        return os.path.isfile(full) and os.access(full, os.X_OK)
    return shutil.which(name, path=path) is not None


@attrs.define(eq=False)
class _Command:
    """One running command."""

    stream: int
    peer: int
    process: ProcessHandle
    #: Its process group id, which is its pid: the trampoline made it a session leader.
    pid: int
    started: float
    stdin_open: bool
    #: The timeout while the command runs, then the KILL once it is stopping.
    timer: Timer | None = None
    #: "timeout" or "cancelled" once the runner has begun to stop it.
    stopped_for: str | None = None
    seq: int = 0
    output_bytes: int = 0
    ended: Deferred[None] = attrs.field(factory=Deferred)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1


class _CommandProtocol(ProcessProtocol):
    """Hands one child's events to the runner."""

    #: Set as soon as spawnProcess returns, which is before any event.
    command: _Command

    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def outReceived(self, data: bytes) -> None:
        self._runner._output(self.command, Kind.CMD_STDOUT, data)

    def errReceived(self, data: bytes) -> None:
        self._runner._output(self.command, Kind.CMD_STDERR, data)

    def processEnded(self, reason: Failure) -> None:
        self._runner._ended(self.command, reason)


class CommandRunner:
    """
    Runs the IDE's one-shot commands, one per stream id.

    Never logs what a command is, where or how it runs, or what it prints: only
    stream ids and counts.
    """

    log = Logger()

    def __init__(
        self,
        reactor: CommandReactor,
        send: Callable[[Envelope], None],
        settings: CommandSettings | None = None,
        *,
        kill: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self._reactor = reactor
        self._send = send
        self._settings = settings if settings is not None else CommandSettings()
        self._kill = kill
        self._commands: dict[int, _Command] = {}

    @property
    def running(self) -> int:
        """How many commands run now."""
        return len(self._commands)

    def handle(self, envelope: Envelope) -> None:
        """Act on a CMD_START, CMD_STDIN or CMD_CANCEL frame from the browser."""
        if envelope.kind == Kind.CMD_START:
            self._start(envelope)
            return
        if envelope.kind not in (Kind.CMD_STDIN, Kind.CMD_CANCEL):
            self.log.warn("ignored a frame of kind {kind}", kind=envelope.kind)
            return
        command = self._commands.get(envelope.stream)
        if command is None:
            return  # it may just have ended
        if envelope.kind == Kind.CMD_STDIN:
            self._stdin(command, envelope.payload)
        else:
            self._stop(command, "cancelled")

    def stop_all(self) -> Deferred[None]:
        """TERM, then KILL, every running command; fires once all have ended."""
        commands = list(self._commands.values())
        for command in commands:
            self._stop(command, "cancelled")
        return gatherResults([c.ended for c in commands]).addCallback(lambda _: None)

    def _start(self, request: Envelope) -> None:
        try:
            command = self._spawn(request)
        except _Refused as e:
            self.log.info("command {stream} refused: {code}", stream=request.stream, code=e.code)
            live = self._commands.get(request.stream)
            self._send(
                attrs.evolve(
                    control(
                        Kind.CMD_ERROR,
                        {"error": e.code, "message": e.message},
                        stream=request.stream,
                        peer=request.peer,
                    ),
                    # A refused duplicate must not disturb the live command's numbering.
                    seq=0 if live is None else live.next_seq(),
                )
            )
            return
        self._commands[command.stream] = command
        self.log.info(
            "command {stream} started, {running} running",
            stream=command.stream,
            running=self.running,
        )

    def _spawn(self, request: Envelope) -> _Command:
        if request.stream in self._commands:
            raise _Refused("stream-in-use", "a command is already running on this stream")
        spec = _parse(request, self._settings)
        if self.running >= self._settings.max_concurrent:
            raise _Refused(
                "too-many",
                f"at most {self._settings.max_concurrent} commands may run at once",
            )
        if not os.path.isdir(spec.cwd):
            raise _Refused("bad-cwd", f"no such directory: {spec.cwd}")
        env = {**os.environ, **spec.env}
        # Found here, the user gets CMD_ERROR rather than the trampoline's traceback.
        if not _executable_exists(spec.argv[0], env.get("PATH", os.defpath), spec.cwd):
            raise _Refused("not-found", f"command not found: {spec.argv[0]}")

        protocol = _CommandProtocol(self)
        try:
            process = self._reactor.spawnProcess(
                protocol, TRAMPOLINE[0], [*TRAMPOLINE, spec.cwd, *spec.argv], env
            )
        except OSError as e:
            raise _Refused("spawn-failed", f"could not start the command: {e}") from e
        command = _Command(
            stream=request.stream,
            peer=request.peer,
            process=process,
            pid=process.pid,
            started=self._reactor.seconds(),
            stdin_open=spec.stdin,
        )
        protocol.command = command
        if not spec.stdin:
            process.closeStdin()
        if spec.timeout is not None:
            command.timer = self._reactor.callLater(spec.timeout, self._stop, command, "timeout")
        return command

    def _stdin(self, command: _Command, data: bytes) -> None:
        if not command.stdin_open:
            return
        if data:
            command.process.write(data)
        else:
            command.process.closeStdin()
            command.stdin_open = False

    def _stop(self, command: _Command, reason: str) -> None:
        if command.stopped_for is not None:
            return  # keep the first reason and its KILL deadline
        command.stopped_for = reason
        if command.timer is not None and command.timer.active():
            command.timer.cancel()
        self._signal(command, signal.SIGTERM)
        command.timer = self._reactor.callLater(
            self._settings.kill_grace, self._signal, command, signal.SIGKILL
        )

    def _signal(self, command: _Command, sig: int) -> None:
        try:
            self._kill(command.pid, sig)
        except ProcessLookupError:
            # No such group: either the trampoline has not reached setsid() yet,
            # and the command is a lone process (with no children) to signal
            # alone, or the group is gone, and Twisted has reaped the process and
            # refuses to signal a pid that may since have been reused.
            with contextlib.suppress(ProcessExitedAlready):
                command.process.signalProcess(sig)

    def _output(self, command: _Command, kind: Kind, data: bytes) -> None:
        command.output_bytes += len(data)
        self._reply(command, kind, data)

    def _ended(self, command: _Command, reason: Failure) -> None:
        del self._commands[command.stream]
        if command.timer is not None and command.timer.active():
            command.timer.cancel()
            if command.stopped_for is not None:
                # Its leader is gone but what else of its group ignored TERM and
                # let go of the output must not outlive a stopped command.
                self._signal(command, signal.SIGKILL)
        exit_code = sig = None
        if isinstance(reason.value, ProcessDone | ProcessTerminated):
            exit_code, sig = reason.value.exitCode, reason.value.signal
        outcome = command.stopped_for or "exited"
        self.log.info(
            "command {stream} ended ({outcome}), {count} bytes of output",
            stream=command.stream,
            outcome=outcome,
            count=command.output_bytes,
        )
        try:
            body = {
                "exit_code": exit_code,
                "signal": sig,
                "duration": self._reactor.seconds() - command.started,
                "reason": outcome,
            }
            self._reply(command, Kind.CMD_EXIT, control(Kind.CMD_EXIT, body).payload)
        finally:
            command.ended.callback(None)

    def _reply(self, command: _Command, kind: Kind, payload: bytes) -> None:
        self._send(Envelope(kind, command.stream, command.next_seq(), command.peer, payload))
