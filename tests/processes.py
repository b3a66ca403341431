"""
Helpers for the tests of L{coder1_bridge.commands} and L{coder1_bridge.terminals}.

For the fake side, L{SpawningClock} is a clock whose spawnProcess records what
it would run, with L{RecordingProcess} as the process, and
L{FakeSpawnerTestCase} holds what a manager sends and the signals it sends to
process groups.  For the real side, L{RealProcessTestCase} runs the real
reactor, collects frames in an L{Inbox}, waits for conditions, and L{alive}
tells whether a pid still runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar
from unittest import mock

import attrs
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from coder1_bridge.processes import ProcessManager
from coder1_wire.envelope import Envelope, Kind


def alive(pid: int) -> bool:
    """Whether C{pid} still runs.  A zombie has ended: only its reaping is left,
    which inside some containers never comes."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def exit_reason(code: int | None = 0, sig: int | None = None) -> Failure:
    """What Twisted gives processExited and processEnded for an exit status or a signal."""
    if code == 0 and sig is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, sig))


def request_payloads(
    keys: Sequence[str], leaves: st.SearchStrategy[object]
) -> st.SearchStrategy[bytes]:
    """Any bytes, or a JSON object with some of C{keys}, its values built from C{leaves}."""
    return st.binary() | st.dictionaries(
        st.sampled_from(keys),
        st.recursive(
            leaves,
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
            ),
            max_leaves=6,
        ),
    ).map(lambda body: json.dumps(body).encode())


@attrs.define(kw_only=True)
class RecordingProcess:
    """What a fake reactor's spawnProcess returns: records input and signals."""

    written: list[bytes] = attrs.Factory(list)
    signals: list[str | int] = attrs.Factory(list)
    #: Set once Twisted would have reaped the process, and refuse to signal it.
    reaped: bool = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, signalID: str | int) -> None:
        if self.reaped:
            raise ProcessExitedAlready()
        self.signals.append(signalID)


class _HasShell(Protocol):
    @property
    def shell(self) -> str: ...


_Process = TypeVar("_Process", bound=RecordingProcess)
_Settings = TypeVar("_Settings", bound=_HasShell)
#: A command runner or a terminal manager.
Manager = ProcessManager[Any, Any, Any]


@attrs.define(kw_only=True)
class SpawnCall:
    """The arguments of one spawnProcess call."""

    protocol: ProcessProtocol
    executable: str
    args: list[str]
    env: Mapping[str, str] | None
    path: str | None
    usePTY: bool | tuple[int, int, str]


@attrs.define(kw_only=True)
class SpawnedProcess(SpawnCall, Generic[_Process]):
    """One recorded spawnProcess call, and the fake process it returned."""

    process: _Process

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        """The process ends, as Twisted would tell its protocol."""
        raise NotImplementedError

    @classmethod
    def of(cls, call: SpawnCall, **fields: Any) -> Self:
        """The record of C{call}, with the other fields of this class."""
        return cls(**attrs.asdict(call, recurse=False), **fields)


_Spawned = TypeVar("_Spawned", bound=SpawnedProcess[Any])


class SpawningClock(MemoryReactorClock, Generic[_Process, _Spawned]):
    """A clock that records spawnProcess calls instead of running anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[_Spawned] = []
        #: Raised by spawnProcess, if set.
        self.spawn_error: OSError | None = None

    @property
    def next_pid(self) -> int:
        """The pid of the next process: 4000, 4001..."""
        return 4000 + len(self.spawned)

    def record(self, call: SpawnCall) -> _Spawned:
        """Make the fake process C{call} starts; its record."""
        raise NotImplementedError

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        *,
        usePTY: bool | tuple[int, int, str] = False,
    ) -> _Process:
        if self.spawn_error is not None:
            raise self.spawn_error
        call = SpawnCall(
            protocol=processProtocol,
            executable=executable,
            args=list(args),
            env=env,
            path=path,
            usePTY=usePTY,
        )
        spawned = self.record(call)
        self.spawned.append(spawned)
        return spawned.process


_Clock = TypeVar("_Clock", bound=SpawningClock[Any, Any])


class FakeSpawnerTestCase(TestCase, Generic[_Clock]):
    """A manager against a fake reactor and a fake kill: what it sends and signals."""

    #: The kind of the frame that refuses a request.
    error_kind: ClassVar[Kind]
    #: Set by the subclass's setUp.
    reactor: _Clock

    def setUp(self) -> None:
        self.sent: list[Envelope] = []
        #: The (pid, signal) of every call of the manager's kill.
        self.kills: list[tuple[int, int]] = []
        #: Whether kill finds no process group, as before setsid or after reaping.
        self.no_groups = False

    def kill(self, pid: int, sig: int) -> None:
        """Record a signal to a process group, or find no such group."""
        if self.no_groups:
            raise ProcessLookupError
        self.kills.append((pid, sig))

    def assert_bad_requests(
        self, handle: Callable[[Envelope], None], kind: Kind, payloads: Sequence[bytes]
    ) -> None:
        """Each payload, handled as a frame of C{kind} on streams 1, 2... from peer 9,
        gets one bad-request error frame."""
        for stream, payload in enumerate(payloads, 1):
            handle(Envelope(kind, stream, 0, 9, payload))
        self.assertEqual(len(self.sent), len(payloads))
        for stream, frame in enumerate(self.sent, 1):
            self.assertEqual(
                (frame.kind, frame.stream, frame.seq, frame.peer), (self.error_kind, stream, 0, 9)
            )
            body = frame.json()
            self.assertEqual(body["error"], "bad-request", payloads[stream - 1])
            self.assertIsInstance(body["message"], str)

    def make_tool(self) -> str:
        """A new directory holding an empty executable named C{tool}; its path."""
        bin_dir = os.path.abspath(self.mktemp())
        os.mkdir(bin_dir)
        tool = os.path.join(bin_dir, "tool")
        with open(tool, "w"):
            pass
        os.chmod(tool, 0o755)
        return bin_dir

    def make_plain_file(self) -> str:
        """A new empty file, not executable; its absolute path."""
        plain = os.path.abspath(self.mktemp())
        with open(plain, "w"):
            pass
        return plain

    def assert_default_shell(self, settings_type: Callable[[], _Settings]) -> _Settings:
        """The default shell is $SHELL, else /bin/sh, read when settings are made;
        settings made with C{$SHELL} set."""
        with mock.patch.dict(os.environ, {"SHELL": "/bin/zsh"}):
            settings = settings_type()
        self.assertEqual(settings.shell, "/bin/zsh")
        with mock.patch.dict(os.environ, clear=True):
            self.assertEqual(settings_type().shell, "/bin/sh")
        return settings

    def stop_without_group(
        self, manager: Manager, start: Envelope, stop: Envelope, grace: float, reaped: bool
    ) -> RecordingProcess:
        """With C{manager}, whose kill is L{kill}, finding no process group, handle
        C{start}, mark the process reaped if C{reaped}, handle C{stop} and let C{grace}
        pass; the process."""
        self.no_groups = True
        manager.handle(start)
        process: RecordingProcess = self.reactor.spawned[-1].process
        process.reaped = reaped
        manager.handle(stop)
        self.reactor.advance(grace)
        return process

    def assert_stop_all(self, manager: Manager, sig: int) -> None:
        """With processes 4000 and 4001 running, stop_all sends C{sig} to both groups, and
        fires once both have ended."""
        stopped = manager.stop_all()
        self.assertEqual(self.kills, [(4000, sig), (4001, sig)])
        self.assertNoResult(stopped)
        self.reactor.spawned[0].exit(None, sig)
        self.assertNoResult(stopped)
        self.reactor.spawned[1].exit(None, sig)
        self.assertIsNone(self.successResultOf(stopped))

    def assert_not_logged(self, secret: str, events: Sequence[LogEvent], at_least: int) -> None:
        """C{secret} is in none of C{events}, of which there are at least C{at_least}."""
        self.assertTrue(len(events) >= at_least)
        for event in events:
            self.assertNotIn(secret, formatEvent(event))
            self.assertNotIn(secret, repr(event))

    def only_error(self, stream: int = 1) -> Any:
        """The one frame sent, which must be an error frame on C{stream}; its body."""
        [frame] = self.sent
        self.assertEqual((frame.kind, frame.stream, frame.seq), (self.error_kind, stream, 0))
        return frame.json()


class Inbox:
    """
    Collects what a command runner or a terminal manager sends; lets a test wait
    for a stream's CMD_EXIT or PTY_EXIT.
    """

    #: The kinds of frame that end a stream.
    EXITS = frozenset({Kind.CMD_EXIT, Kind.PTY_EXIT})
    #: The kinds of frame that carry a command's stdout or a terminal's output.
    OUTPUTS = frozenset({Kind.CMD_STDOUT, Kind.PTY_OUTPUT})

    def __init__(self) -> None:
        self.frames: list[Envelope] = []
        self._exits: dict[int, Deferred[Any]] = {}

    def send(self, envelope: Envelope) -> None:
        self.frames.append(envelope)
        if envelope.kind in self.EXITS:
            self.exit(envelope.stream).callback(envelope.json())

    def exit(self, stream: int) -> Deferred[Any]:
        """Fires with the body of the exit frame of C{stream}."""
        return self._exits.setdefault(stream, Deferred())

    def stream(self, stream: int) -> list[Envelope]:
        """The frames sent on C{stream}."""
        return [f for f in self.frames if f.stream == stream]

    def output(self, stream: int, kind: Kind | None = None) -> bytes:
        """What came out on C{stream}: in frames of C{kind}, by default the output
        (stdout) kinds."""
        kinds = self.OUTPUTS if kind is None else {kind}
        return b"".join(f.payload for f in self.stream(stream) if f.kind in kinds)


class RealProcessTestCase(TestCase):
    """Real processes on the real reactor; their frames go to C{self.inbox}."""

    timeout = 15
    #: Seconds L{eventually} waits at most.
    patience: ClassVar[float]

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.inbox = Inbox()

    async def eventually(self, condition: Callable[[], bool], what: str) -> None:
        """Wait, for at most C{patience} seconds, until C{condition} holds."""
        for _ in range(round(self.patience / 0.02)):
            if condition():
                return
            await deferLater(self.reactor, 0.02)
        self.fail(f"timed out waiting for {what}")

    async def until_gone(self, pid: int) -> None:
        """Wait until C{pid}, a grandchild, has ended."""
        await self.eventually(lambda: not alive(pid), "the grandchild to end")

    async def printed_pid(self, stream: int, line_end: bytes) -> int:
        """Wait for the output on C{stream} to be a pid and C{line_end}; that pid, which
        must run."""
        await self.eventually(lambda: self.inbox.output(stream).endswith(line_end), "the pid")
        pid = int(self.inbox.output(stream))
        self.assertTrue(alive(pid))
        return pid
