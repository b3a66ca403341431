"""
One-shot commands the IDE asks the bridge to run.

L{CommandRunner} reads CMD_START, CMD_STDIN and CMD_CANCEL frames and answers
with CMD_STDOUT, CMD_STDERR, CMD_EXIT and CMD_ERROR frames through the send
callable it was given: it has no network of its own.

Each command runs in a session of its own, so cancelling it or timing it out
signals its whole process group, grandchildren included.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
from twisted.python.failure import Failure

from coder1_bridge import processes
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


@attrs.frozen
class CommandSettings:
    """How the runner treats the commands it starts."""

    #: Seconds between TERM and KILL when a command is cancelled or times out.
    kill_grace: float = 5.0
    max_concurrent: int = 32
    #: Seconds a command may run when its request gives no timeout; None: forever.
    default_timeout: float | None = None
    #: Runs "shell" requests as ``[shell, "-l", "-c", line]``.
    shell: str = attrs.field(factory=processes.login_shell)
    #: Seconds a command's output stays open after its program ended, when a
    #: process that left its group still holds it, before the bridge closes it.
    linger: float = 1.0


class ProcessHandle(processes.ChildHandle, Protocol):
    """The part of L{IProcessTransport} the runner uses."""

    @property
    def pid(self) -> int: ...

    def closeStdin(self) -> None: ...

    def loseConnection(self) -> None: ...


#: The parts of L{IReactorProcess} and L{IReactorTime} the runner uses.
CommandReactor = processes.ProcessReactor[ProcessHandle]


@attrs.frozen
class _Request:
    """A valid CMD_START payload."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    stdin: bool
    timeout: float | None


def _parse(request: Envelope, settings: CommandSettings) -> _Request:
    try:
        body = request.json()
    except EnvelopeError as e:
        raise processes.bad_request("the request is not JSON") from e
    given = processes.json_object(body)

    if ("argv" in given) == ("shell" in given):
        raise processes.bad_request("give exactly one of argv and shell")
    if "shell" in given:
        line = given["shell"]
        if not processes.is_text(line):
            raise processes.bad_request("shell must be a string")
        argv = [settings.shell, "-l", "-c", line]
    else:
        argv = processes.parse_argv(given["argv"])

    cwd, env = processes.parse_cwd_and_env(given)
    stdin = given.get("stdin", False)
    if not isinstance(stdin, bool):
        raise processes.bad_request("stdin must be true or false")
    timeout = given.get("timeout", settings.default_timeout)
    if timeout is not None and not (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and timeout > 0
    ):
        raise processes.bad_request("timeout must be a positive number of seconds")
    return _Request(argv=tuple(argv), cwd=cwd, env=env, stdin=stdin, timeout=timeout)


@attrs.define(eq=False, kw_only=True)
class _Command(processes.ManagedProcess[ProcessHandle]):
    """
    One running command.  Its pid is its process group id because the
    trampoline made it a session leader.  Its timer is the timeout while it
    runs, then the KILL once it is stopping.
    """

    stdin_open: bool
    #: "timeout" or "cancelled" once the runner has begun to stop it.
    stopped_for: str | None = None
    #: Whether the program (the group leader) has ended and been reaped.
    exited: bool = False
    #: Whether the runner closed its output, which others still held open.
    held_open: bool = False


class _CommandProtocol(processes.ChildProtocol[_Command]):
    """Hands one child's events to the runner."""

    output_kind = Kind.CMD_STDOUT
    _manager: CommandRunner

    def __init__(self, manager: CommandRunner) -> None:
        super().__init__(manager)
        #: Whether Twisted reaped the program inside spawnProcess.
        self.exited_early = False

    def errReceived(self, data: bytes) -> None:
        assert self.child is not None
        self._manager._output(self.child, Kind.CMD_STDERR, data)

    def processExited(self, reason: Failure) -> None:
        if self.child is None:
            self.exited_early = True
        else:
            self._manager._exited(self.child)


class CommandRunner(processes.ProcessManager[ProcessHandle, CommandSettings, _Command]):
    """
    Runs the IDE's one-shot commands, one per stream id.

    Never logs what a command is, where or how it runs, or what it prints: only
    stream ids and counts.
    """

    noun = "command"
    error_kind = Kind.CMD_ERROR
    in_use = "a command is already running on this stream"
    settings_type = CommandSettings

    def _actions(self) -> Mapping[int, Callable[[Envelope], None]]:
        return {Kind.CMD_START: self._start}

    def _stream_actions(self) -> Mapping[int, Callable[[_Command, Envelope], None]]:
        return {
            Kind.CMD_STDIN: lambda command, frame: self._stdin(command, frame.payload),
            Kind.CMD_CANCEL: lambda command, _: self._stop(command),
        }

    def _spawn(self, request: Envelope) -> _Command:
        spec = _parse(request, self._settings)
        self._check_room(self._settings.max_concurrent, "at most {} commands may run at once")
        env = {**os.environ, **spec.env}
        processes.check_program(spec.argv[0], spec.cwd, env)

        protocol = _CommandProtocol(self)
        try:
            process = self._reactor.spawnProcess(
                protocol, TRAMPOLINE[0], [*TRAMPOLINE, spec.cwd, *spec.argv], env
            )
        except OSError as e:
            raise processes.Refused("spawn-failed", f"could not start the command: {e}") from e
        command = _Command(
            stream=request.stream,
            peer=request.peer,
            process=process,
            pid=process.pid,
            started=self._reactor.seconds(),
            stdin_open=spec.stdin,
        )
        protocol.child = command
        if not spec.stdin:
            process.closeStdin()
        if spec.timeout is not None:
            command.timer = self._reactor.callLater(spec.timeout, self._stop, command, "timeout")
        if protocol.exited_early:
            self._exited(command)
        return command

    def _started(self, command: _Command) -> None:
        self.log.info(
            "command {stream} started, {running} running",
            stream=command.stream,
            running=self.running,
        )

    def _stdin(self, command: _Command, data: bytes) -> None:
        if not command.stdin_open:
            return
        if data:
            command.process.write(data)
        else:
            command.process.closeStdin()
            command.stdin_open = False

    def _stop(self, command: _Command, reason: str = "cancelled") -> None:
        """TERM the command's group, then KILL it after the grace."""
        if command.stopped_for is not None:
            return  # keep the first reason and its KILL deadline
        command.stopped_for = reason
        if command.exited:
            # Only what left the group and holds the output keeps it open.
            self._signal(command, signal.SIGKILL)
            self._close(command)
            return
        self._stop_group(command, signal.SIGTERM)

    def _exited(self, command: _Command) -> None:
        """The program has ended; a process that left its group may still hold its output."""
        command.exited = True
        killing = command.timer is not None and command.timer.active()
        command.cancel_timer()
        if command.stopped_for is not None and killing:
            # What else of its group ignored TERM must not outlive a stopped command.
            self._signal(command, signal.SIGKILL)
        # Usually the output closes at once, the program's group being its last writers.
        command.timer = self._reactor.callLater(self._settings.linger, self._close, command)

    def _close(self, command: _Command) -> None:
        """Stop reading output that others hold open, so that the command can end."""
        command.cancel_timer()
        if command.holds and command.stopped_for is None:
            # What is left of its output is waiting to be read, not held open.
            command.timer = self._reactor.callLater(self._settings.linger, self._close, command)
            return
        self.log.info(
            "command {stream}: its output is still held open; closing it", stream=command.stream
        )
        command.held_open = True
        command.process.loseConnection()

    def _exit_frame(self, command: _Command, exit_code: int | None, sig: int | None) -> Envelope:
        command.cancel_timer()
        outcome = "held-open" if command.held_open else command.stopped_for or "exited"
        self.log.info(
            "command {stream} ended ({outcome}), {count} bytes of output",
            stream=command.stream,
            outcome=outcome,
            count=command.output_bytes,
        )
        body = {
            "exit_code": exit_code,
            "signal": sig,
            "duration": self._reactor.seconds() - command.started,
            "reason": outcome,
        }
        return control(Kind.CMD_EXIT, body)
