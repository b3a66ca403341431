"""
Processes the bridge runs for the IDE, one per stream id.

What L{coder1_bridge.commands} (one-shot commands) and
L{coder1_bridge.terminals} (interactive terminals) have in common:

  - the parts of the reactor, of a process transport and of a delayed call
    they use, as typing protocols, so that tests can hand in fakes;
  - checks on a start request: strings exec can pass, argv, cwd and env, and
    whether exec would find the program on the merged PATH;
  - L{Refused}, a start request that will not run, with the code and message
    of the error frame that answers it;
  - L{ProcessManager}, the base of both managers: one process per stream id,
    frames numbered per stream, refusals, stopping a process group with a
    first signal then SIGKILL after a grace, and pausing every process's
    output while the connection to the relay is full (flow control).

Every process runs in a session of its own, so its pid is also its process
group id, and stopping it signals its whole group, grandchildren included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeGuard, TypeVar, runtime_checkable

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_bridge.writes import read_more
from coder1_wire.envelope import Envelope, Kind, control


class Timer(Protocol):
    """The part of L{IDelayedCall} the managers use."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ChildHandle(Protocol):
    """The part of Twisted's process transports every manager uses."""

    def write(self, data: bytes) -> None: ...

    def signalProcess(self, signalID: str | int) -> None: ...


@runtime_checkable
class Pausable(Protocol):
    """
    What Twisted's process transports (pipes and pseudo-terminals alike) have
    to stop and start reading a child's output.  A fake handle without them is
    simply never paused.
    """

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


_Handle = TypeVar("_Handle", bound=ChildHandle)
_Handle_co = TypeVar("_Handle_co", covariant=True)


class ProcessReactor(Protocol[_Handle_co]):
    """
    The parts of L{IReactorProcess} and L{IReactorTime} the managers use.

    Its type argument is what spawnProcess returns, as far as the manager
    cares: pipes for commands, a pseudo-terminal for terminals.
    """

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        *,
        usePTY: bool | tuple[int, int, str] = False,
    ) -> _Handle_co: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> Timer: ...

    def seconds(self) -> float: ...


class ProcessSettings(Protocol):
    """What the settings of every manager say."""

    @property
    def kill_grace(self) -> float:
        """Seconds between the first signal and SIGKILL when a process is stopped."""
        ...


def login_shell() -> str:
    """The user's login shell: C{$SHELL}, else C{/bin/sh}."""
    return os.environ.get("SHELL") or "/bin/sh"


class Refused(Exception):
    """A request to start a process that will not run; becomes one error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def bad_request(message: str) -> Refused:
    """The refusal of a malformed request."""
    return Refused("bad-request", message)


def is_text(value: object) -> TypeGuard[str]:
    """Whether exec can pass C{value}: a string without NUL that the OS can encode."""
    # Refused here, rather than failing inside spawnProcess or the trampoline.
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def json_object(body: object) -> dict[str, object]:
    """
    A request's JSON object without its null values: a null counts as absent,
    for every key.

    @raise Refused: a bad-request, if C{body} is not an object.
    """
    if not isinstance(body, dict):
        raise bad_request("the request must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}


def parse_argv(raw: object) -> list[str]:
    """A request's argv, which must be a non-empty list of strings exec can pass."""
    if not (isinstance(raw, list) and raw and all(is_text(a) for a in raw)):
        raise bad_request("argv must be a non-empty list of strings")
    return raw


def parse_cwd_and_env(given: Mapping[str, object]) -> tuple[str, Mapping[str, str]]:
    """
    Where a request's program runs: its cwd, taken from the home directory (the
    default one) when relative, and the variables it adds to the environment.
    """
    cwd = given.get("cwd", "")
    if not is_text(cwd):
        raise bad_request("cwd must be a string")
    env = given.get("env", {})
    if not (
        isinstance(env, dict)
        and all(is_text(k) and k and "=" not in k and is_text(v) for k, v in env.items())
    ):
        raise bad_request("env must map variable names to strings")
    home = os.path.expanduser("~")
    return (os.path.join(home, cwd) if cwd else home), env


def executable_exists(name: str, path: str, cwd: str) -> bool:
    """Whether execvp, run in C{cwd} with C{path} as PATH, would find C{name}."""
    if os.sep in name:
        full = os.path.join(cwd, name)
        return os.path.isfile(full) and os.access(full, os.X_OK)
    return shutil.which(name, path=path) is not None


def check_program(program: str, cwd: str, env: Mapping[str, str]) -> None:
    """
    Refuse to run C{program} in C{cwd} with the whole environment C{env} when
    C{cwd} is not a directory (bad-cwd) or exec would not find C{program} on
    C{env}'s PATH (not-found).  Found here, the user gets an error frame rather
    than a traceback where the program's output would go.
    """
    if not os.path.isdir(cwd):
        raise Refused("bad-cwd", f"no such directory: {cwd}")
    if not executable_exists(program, env.get("PATH", os.defpath), cwd):
        raise Refused("not-found", f"command not found: {program}")


@attrs.define(eq=False, kw_only=True)
class ManagedProcess(Generic[_Handle]):
    """One process a manager runs, on its stream."""

    stream: int
    peer: int
    process: _Handle
    #: Its process group id, which is its pid: it leads a session of its own.
    pid: int
    started: float
    #: What is due next for it, if anything (see the subclass).
    timer: Timer | None = None
    output_bytes: int = 0
    #: Why its output is left unread now, if it is: "link" (the connection to
    #: the relay is full), "replay" (its replay log is full).
    holds: set[str] = attrs.field(factory=set)
    #: Fires once its exit frame has been sent.
    ended: Deferred[None] = attrs.field(factory=Deferred)

    def cancel_timer(self) -> None:
        """Cancel what was due next for it, if anything."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


_Settings = TypeVar("_Settings", bound=ProcessSettings)
_Process = TypeVar("_Process", bound=ManagedProcess[Any])


class ProcessManager(Generic[_Handle, _Settings, _Process]):
    """
    Runs the IDE's processes, one per stream id, and answers on their streams
    through the send callable it was given: it has no network of its own.

    A subclass says which frames it takes (L{_actions}, L{_stream_actions}), how
    a request becomes a running process (L{_spawn}), how to stop one at the
    IDE's request (L{_stop}), and what its exit frame says (L{_exit_frame}).
    This class keeps the processes by stream, numbers the frames of each stream
    0, 1, 2..., refuses requests with an error frame, and signals process groups.

    Never logs what a process is, where or how it runs, or what goes in and out
    of it: only stream ids and counts.
    """

    log = Logger()

    #: What one process is called in log lines: "command", "terminal".
    noun: ClassVar[str]
    #: The kind of frame that refuses a start request.
    error_kind: ClassVar[Kind]
    #: The message of the refusal of a start on a stream already in use.
    in_use: ClassVar[str]
    #: The settings when none are given are C{settings_type()}.
    settings_type: type[_Settings]

    def __init__(
        self,
        reactor: ProcessReactor[_Handle],
        send: Callable[[Envelope], None],
        settings: _Settings | None = None,
        *,
        kill: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self._reactor = reactor
        self._send = send
        self._settings = settings if settings is not None else self.settings_type()
        self._kill = kill
        self._processes: dict[int, _Process] = {}
        self._output_paused = False
        #: L{_actions} and L{_stream_actions}, made at the first frame (not per frame).
        self._action_table: (
            tuple[
                Mapping[int, Callable[[Envelope], None]],
                Mapping[int, Callable[[_Process, Envelope], None]],
            ]
            | None
        ) = None

    @property
    def running(self) -> int:
        """How many processes run now."""
        return len(self._processes)

    @property
    def output_paused(self) -> bool:
        """Whether what the processes write is left unread now."""
        return self._output_paused

    def pause_output(self) -> None:
        """
        Stop reading what every process writes, and what those started from
        now on will write, until L{resume_output}: the connection to the relay
        has more queued than it should.  A process then blocks in its next
        write once its pipe or terminal is full; nothing is dropped.
        """
        if self._output_paused:
            return
        self._output_paused = True
        for process in self._processes.values():
            _hold(process, "link")

    def resume_output(self) -> None:
        """Read what the processes write again."""
        if not self._output_paused:
            return
        self._output_paused = False
        for process in list(self._processes.values()):
            _release(process, "link")

    def is_running(self, stream: int) -> bool:
        """Whether a process runs on C{stream}."""
        return stream in self._processes

    def hold(self, stream: int) -> None:
        """Leave the output of the process on C{stream} unread: its replay log is full."""
        process = self._processes.get(stream)
        if process is not None:
            _hold(process, "replay")

    def release(self, stream: int) -> None:
        """Read the output of the process on C{stream} again, as far as its replay log goes."""
        process = self._processes.get(stream)
        if process is not None:
            _release(process, "replay")

    def handle(self, envelope: Envelope) -> None:
        """Act on a frame from the browser; one of a kind not taken here is logged."""
        if self._action_table is None:
            self._action_table = (self._actions(), self._stream_actions())
        actions, stream_actions = self._action_table
        act = actions.get(envelope.kind)
        if act is not None:
            act(envelope)
            return
        act_on = stream_actions.get(envelope.kind)
        if act_on is None:
            self.log.warn("ignored a frame of kind {kind}", kind=envelope.kind)
            return
        process = self._processes.get(envelope.stream)
        if process is None:
            return  # it may just have ended
        act_on(process, envelope)

    def stop_all(self) -> Deferred[None]:
        """
        Stop every process, as the IDE would; fires once all have ended, which
        takes reading their output to its end, paused or not.
        """
        self.resume_output()
        processes = list(self._processes.values())
        for process in processes:
            _release(process, "replay")
            self._stop(process)
        return gatherResults([p.ended for p in processes]).addCallback(lambda _: None)

    # What a subclass says.

    def _actions(self) -> Mapping[int, Callable[[Envelope], None]]:
        """What each kind of frame that concerns no running process does."""
        raise NotImplementedError

    def _stream_actions(self) -> Mapping[int, Callable[[_Process, Envelope], None]]:
        """What each kind of frame does to the process on the frame's stream."""
        raise NotImplementedError

    def _spawn(self, request: Envelope) -> _Process:
        """
        Start the process a start request asks for, on a stream that is free.

        @raise Refused: if it will not run.
        """
        raise NotImplementedError

    def _started(self, process: _Process) -> None:
        """C{process} has started and is kept by its stream."""
        raise NotImplementedError

    def _stop(self, process: _Process) -> None:
        """Begin to stop C{process} at the IDE's request."""
        raise NotImplementedError

    def _exit_frame(self, process: _Process, exit_code: int | None, sig: int | None) -> Envelope:
        """
        Tidy up after C{process}, which has ended; its exit frame, the last on its
        stream, which is sent with the stream, seq and peer filled in.
        """
        raise NotImplementedError

    # What this class does.

    def _start(self, request: Envelope) -> None:
        try:
            if request.stream in self._processes:
                raise Refused("stream-in-use", self.in_use)
            process = self._spawn(request)
        except Refused as e:
            self.log.info(
                self.noun + " {stream} refused: {code}", stream=request.stream, code=e.code
            )
            body = {"error": e.code, "message": e.message}
            self._send(control(self.error_kind, body, stream=request.stream, peer=request.peer))
            return
        self._processes[process.stream] = process
        if self._output_paused:
            _hold(process, "link")
        self._started(process)

    def _check_room(self, limit: int, message: str) -> None:
        """Refuse a start when C{limit} processes already run, with C{message}
        formatted with C{limit}."""
        if self.running >= limit:
            raise Refused("too-many", message.format(limit))

    def _signal(self, process: _Process, sig: int) -> None:
        """Send C{sig} to the process group of C{process}."""
        try:
            self._kill(process.pid, sig)
        except ProcessLookupError:
            # No such group: either the child has not reached setsid() yet, and
            # is a lone process (with no children) to signal alone, or the group
            # is gone, and Twisted has reaped the process and refuses to signal
            # a pid that may since have been reused.
            with contextlib.suppress(ProcessExitedAlready):
                process.process.signalProcess(sig)

    def _stop_group(self, process: _Process, sig: int) -> None:
        """
        Send C{sig} to the process group of C{process} now, and SIGKILL
        C{kill_grace} seconds later, in place of whatever else was due.
        """
        process.cancel_timer()
        self._signal(process, sig)
        process.timer = self._reactor.callLater(
            self._settings.kill_grace, self._signal, process, signal.SIGKILL
        )

    def _output(self, process: _Process, kind: Kind, data: bytes) -> None:
        process.output_bytes += len(data)
        self._reply(process, kind, data)

    def _ended(self, process: _Process, reason: Failure) -> None:
        """C{process} has ended and all its output is read: send its exit frame."""
        del self._processes[process.stream]
        exit_code = sig = None
        if isinstance(reason.value, ProcessDone | ProcessTerminated):
            exit_code, sig = reason.value.exitCode, reason.value.signal
        frame = self._exit_frame(process, exit_code, sig)
        try:
            self._reply(process, frame.kind, frame.payload)
        finally:
            process.ended.callback(None)

    def _reply(self, process: _Process, kind: int, payload: bytes) -> None:
        # Numbered by byte position on the way out (coder1_bridge.replay).
        self._send(Envelope(kind, process.stream, 0, process.peer, payload))


def _hold(process: ManagedProcess[Any], reason: str) -> None:
    if not process.holds and isinstance(process.process, Pausable):
        process.process.pauseProducing()
    process.holds.add(reason)


def _release(process: ManagedProcess[Any], reason: str) -> None:
    if reason not in process.holds:
        return
    process.holds.discard(reason)
    if not process.holds and isinstance(process.process, Pausable):
        process.process.resumeProducing()


class ChildProtocol(ProcessProtocol, Generic[_Process]):
    """Hands one process's events to its manager."""

    #: The kind of frame that carries what the process writes (to stdout).
    output_kind: ClassVar[Kind]

    def __init__(self, manager: ProcessManager[Any, Any, _Process]) -> None:
        self._manager = manager
        #: Set as soon as spawnProcess returns, which is before any output.
        self.child: _Process | None = None
        #: Per child descriptor, the one to read more from (None: not readable here).
        self._fds: dict[int, int | None] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # What else the process wrote by now goes in the same frame (writes.read_more).
        fd = self._fds.get(childFD, -1)
        if fd == -1:
            fd = self._fds[childFD] = _readable_fd(self.transport, childFD)
        super().childDataReceived(childFD, read_more(fd, data))

    def outReceived(self, data: bytes) -> None:
        assert self.child is not None
        self._manager._output(self.child, self.output_kind, data)

    def processEnded(self, reason: Failure) -> None:
        assert self.child is not None
        self._manager._ended(self.child, reason)


def _readable_fd(transport: object, child_fd: int) -> int | None:
    """
    The descriptor Twisted reads C{child_fd} of a process from: a pipe's, or the
    terminal's for a process on one; None if there is none, or it blocks.
    """
    pipes = getattr(transport, "pipes", None)
    reader = pipes.get(child_fd) if isinstance(pipes, dict) else transport
    fileno = getattr(reader, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
        if not isinstance(fd, int) or os.get_blocking(fd):
            return None
    except (OSError, ValueError):
        return None
    return fd
