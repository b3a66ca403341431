"""
Tests for L{coder1_bridge.commands}.

L{FakeProcessTests} drive the runner with a fake reactor and a fake kill, so
clock times and signals are exact; L{RealProcessTests} run real commands on the
real reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from typing import Any, cast
from unittest import mock

import attrs
import hypothesis
from hypothesis import strategies as st
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from coder1_bridge.commands import TRAMPOLINE, CommandReactor, CommandRunner, CommandSettings
from coder1_wire.envelope import Envelope, Kind
from tests import processes

HOME = os.path.expanduser("~")


def start(stream: int, peer: int = 7, **body: object) -> Envelope:
    """A CMD_START frame with C{body} as its JSON payload."""
    return Envelope(Kind.CMD_START, stream, 0, peer, json.dumps(body).encode())


@attrs.define(kw_only=True)
class FakeProcess(processes.RecordingProcess):
    """What the fake reactor's spawnProcess returns: records stdin."""

    pid: int
    stdin_closed: bool = False
    #: Whether the runner closed its output pipes.
    output_closed: bool = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def loseConnection(self) -> None:
        self.output_closed = True


@attrs.define(kw_only=True)
class Spawned(processes.SpawnedProcess[FakeProcess]):
    """One recorded spawnProcess call."""

    @property
    def cwd(self) -> str:
        """The directory the trampoline changes to."""
        return self.args[len(TRAMPOLINE)]

    @property
    def argv(self) -> list[str]:
        """The command line the trampoline execs."""
        return self.args[len(TRAMPOLINE) + 1 :]

    def reap(self, code: int | None = 0, sig: int | None = None) -> None:
        """The program has ended and been reaped: deliver processExited."""
        self.process.reaped = True
        self.protocol.processExited(processes.exit_reason(code, sig))

    def end(self, code: int | None = 0, sig: int | None = None) -> None:
        """Its output pipes have closed too: deliver processEnded."""
        self.protocol.processEnded(processes.exit_reason(code, sig))

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        """The program ended and its group with it, as usual: both, as Twisted would."""
        self.reap(code, sig)
        self.end(code, sig)


class FakeReactor(processes.SpawningClock[FakeProcess, Spawned]):
    """A clock that records spawnProcess calls instead of running anything."""

    def record(self, call: processes.SpawnCall) -> Spawned:
        assert call.usePTY is False, "commands run on pipes"
        return Spawned.of(call, process=FakeProcess(pid=self.next_pid))


class FakeProcessTests(processes.FakeSpawnerTestCase[FakeReactor]):
    """The runner against a fake reactor: what it spawns, sends and signals."""

    error_kind = Kind.CMD_ERROR

    def setUp(self) -> None:
        super().setUp()
        self.reactor = FakeReactor()
        self.runner = self.make_runner()

    def make_runner(self, **settings: Any) -> CommandRunner:
        settings.setdefault("shell", "/bin/sh")
        return CommandRunner(
            self.reactor, self.sent.append, CommandSettings(**settings), kill=self.kill
        )

    def test_trampoline(self) -> None:
        """The trampoline starts a new session, changes to argv[1], then execs argv[2:]
        by PATH."""
        self.assertEqual(
            TRAMPOLINE,
            (
                sys.executable,
                "-I",
                "-S",
                "-c",
                "import os,sys;os.setsid();"
                "os.chdir(sys.argv[1]);os.execvp(sys.argv[2],sys.argv[2:])",
            ),
        )

    def test_argv(self) -> None:
        """argv runs as given behind the trampoline, in the home directory, stdin closed;
        spawnProcess gets no path, so that it can use posix_spawnp."""
        self.runner.handle(start(1, argv=["ls", "-l", "a b"]))
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.executable, sys.executable)
        self.assertEqual(spawned.args, [*TRAMPOLINE, HOME, "ls", "-l", "a b"])
        self.assertIsNone(spawned.path)
        self.assertEqual(spawned.env, dict(os.environ))
        self.assertTrue(spawned.process.stdin_closed)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.runner.running, 1)

    def test_shell(self) -> None:
        """A shell line runs as [shell, -l, -c, line] in the configured login shell."""
        self.runner.handle(start(1, shell="echo hi | wc -c"))
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.argv, ["/bin/sh", "-l", "-c", "echo hi | wc -c"])

    def test_default_shell(self) -> None:
        """The default shell is $SHELL, else /bin/sh, read when settings are made."""
        self.assert_default_shell(CommandSettings)

    def test_cwd_and_env(self) -> None:
        """cwd is used (relative ones from home); env is added to the bridge's own."""
        self.runner.handle(start(1, argv=["ls"], cwd="/", env={"COLOR": "blue", "HOME": "/x"}))
        self.runner.handle(start(2, argv=["ls"], cwd="."))
        first, second = self.reactor.spawned
        self.assertEqual(first.cwd, "/")
        self.assertEqual(first.env, {**os.environ, "COLOR": "blue", "HOME": "/x"})
        self.assertEqual(second.cwd, os.path.join(HOME, "."))

    def test_invalid_requests(self) -> None:
        """Malformed CMD_START payloads get one bad-request CMD_ERROR and run nothing."""
        payloads = [
            b"not json",
            b"\xff\xfe",
            b"[]",
            b"{}",
            json.dumps({"argv": ["ls"], "shell": "ls"}).encode(),
            json.dumps({"argv": []}).encode(),
            json.dumps({"argv": "ls"}).encode(),
            json.dumps({"argv": ["ls", 1]}).encode(),
            json.dumps({"argv": ["l\0s"]}).encode(),
            json.dumps({"argv": ["\ud800"]}).encode(),
            json.dumps({"shell": ["ls"]}).encode(),
            json.dumps({"argv": ["ls"], "cwd": 3}).encode(),
            json.dumps({"argv": ["ls"], "env": ["A=1"]}).encode(),
            json.dumps({"argv": ["ls"], "env": {"A": 1}}).encode(),
            json.dumps({"argv": ["ls"], "env": {"A=B": "1"}}).encode(),
            json.dumps({"argv": ["ls"], "env": {"": "1"}}).encode(),
            json.dumps({"argv": ["ls"], "stdin": "yes"}).encode(),
            json.dumps({"argv": ["ls"], "timeout": "5"}).encode(),
            json.dumps({"argv": ["ls"], "timeout": True}).encode(),
            json.dumps({"argv": ["ls"], "timeout": 0}).encode(),
            json.dumps({"argv": ["ls"], "timeout": -1}).encode(),
            b'{"argv": ["ls"], "timeout": Infinity}',
            b'{"argv": ["ls"], "timeout": NaN}',
        ]
        self.assert_bad_requests(self.runner.handle, Kind.CMD_START, payloads)
        self.assertEqual(self.reactor.spawned, [])

    def test_null_is_absent(self) -> None:
        """A JSON null counts as a missing key."""
        self.runner.handle(start(1, argv=["ls"], shell=None, cwd=None, timeout=None))
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.cwd, HOME)

    def test_duplicate_stream(self) -> None:
        """A start on a live stream is refused; the command running there goes on."""
        self.runner.handle(start(1, argv=["ls"]))
        self.runner.handle(start(1, argv=["ls"]))
        self.assertEqual(self.only_error()["error"], "stream-in-use")
        self.reactor.spawned[0].protocol.outReceived(b"x")
        self.assertEqual([f.kind for f in self.sent], [Kind.CMD_ERROR, Kind.CMD_STDOUT])
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_too_many(self) -> None:
        """Past max_concurrent, starts are refused until a command ends."""
        self.runner = self.make_runner(max_concurrent=2)
        for stream in (1, 2, 3):
            self.runner.handle(start(stream, argv=["ls"]))
        self.assertEqual(self.only_error(3)["error"], "too-many")
        self.reactor.spawned[0].exit()
        self.runner.handle(start(4, argv=["ls"]))
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.runner.running, 2)

    def test_missing_cwd(self) -> None:
        """A cwd that is not a directory is refused."""
        self.runner.handle(start(1, argv=["ls"], cwd="/no/such/dir"))
        self.assertEqual(self.only_error()["error"], "bad-cwd")
        self.assertEqual(self.reactor.spawned, [])

    def test_not_found(self) -> None:
        """Executables that exec would not find are refused before spawning."""
        plain = self.make_plain_file()
        self.runner.handle(start(1, argv=["no-such-command-c0der1"]))
        self.runner.handle(start(2, argv=[plain]))
        self.runner.handle(start(3, argv=["ls"], env={"PATH": "/nonexistent"}))
        self.runner = self.make_runner(shell="/no/such/shell")
        self.runner.handle(start(4, shell="ls"))
        self.assertEqual([f.json()["error"] for f in self.sent], ["not-found"] * 4)
        self.assertEqual(self.reactor.spawned, [])

    def test_found_by_request_path_and_cwd(self) -> None:
        """The request's PATH is searched, and relative paths are taken from cwd."""
        bin_dir = self.make_tool()
        self.runner.handle(start(1, argv=["tool"], env={"PATH": bin_dir}))
        self.runner.handle(start(2, argv=["./tool"], cwd=bin_dir))
        self.assertEqual([s.argv for s in self.reactor.spawned], [["tool"], ["./tool"]])
        self.assertEqual(self.sent, [])

    def test_spawn_failure(self) -> None:
        """An OSError from spawnProcess becomes spawn-failed, and nothing is left running."""
        self.reactor.spawn_error = OSError(7, "Argument list too long")
        self.runner.handle(start(1, argv=["ls"]))
        self.assertEqual(self.only_error()["error"], "spawn-failed")
        self.assertEqual(self.runner.running, 0)

    def test_timeout(self) -> None:
        """On timeout the group gets TERM at the deadline, then KILL kill_grace later."""
        self.runner = self.make_runner(kill_grace=5.0)
        self.runner.handle(start(1, argv=["sleep", "100"], timeout=10))
        [spawned] = self.reactor.spawned
        pid = spawned.process.pid
        self.reactor.advance(9.9)
        self.assertEqual(self.kills, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.kills, [(pid, signal.SIGTERM)])
        self.reactor.advance(4.9)
        self.assertEqual(self.kills, [(pid, signal.SIGTERM)])
        self.reactor.advance(0.1)
        self.assertEqual(self.kills, [(pid, signal.SIGTERM), (pid, signal.SIGKILL)])
        spawned.exit(None, signal.SIGKILL)
        [exit_frame] = self.sent
        self.assertEqual(
            exit_frame.json(),
            {"exit_code": None, "signal": 9, "duration": 15.0, "reason": "timeout"},
        )
        self.assertEqual(len(self.kills), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_default_timeout(self) -> None:
        """Without a timeout in the request, settings.default_timeout applies."""
        self.runner = self.make_runner(default_timeout=3.0)
        self.runner.handle(start(1, argv=["ls"]))
        self.reactor.advance(3.0)
        self.assertEqual(self.kills, [(4000, signal.SIGTERM)])

    def test_exit_before_timeout(self) -> None:
        """A command that exits in time is never signalled and leaves no timer."""
        self.runner.handle(start(1, argv=["ls"], timeout=10))
        self.reactor.advance(2.5)
        self.reactor.spawned[0].exit(3)
        self.assertEqual(
            self.sent[0].json(),
            {"exit_code": 3, "signal": None, "duration": 2.5, "reason": "exited"},
        )
        self.assertEqual(self.kills, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.runner.running, 0)

    def test_cancel(self) -> None:
        """Cancel TERMs the group at once and KILLs it kill_grace later; a second cancel
        changes nothing."""
        self.runner.handle(start(1, argv=["sleep", "100"]))
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        self.assertEqual(self.kills, [(4000, signal.SIGTERM)])
        self.reactor.advance(3)
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        self.reactor.advance(2)
        self.assertEqual(self.kills, [(4000, signal.SIGTERM), (4000, signal.SIGKILL)])
        self.reactor.spawned[0].exit(None, signal.SIGKILL)
        self.assertEqual(self.sent[0].json()["reason"], "cancelled")

    def test_cancel_sweeps_group_on_end(self) -> None:
        """When a stopped command ends within the grace, the rest of its group gets KILL
        at once, and no timer is left."""
        self.runner.handle(start(1, argv=["sleep", "100"], timeout=60))
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        self.reactor.spawned[0].exit(None, signal.SIGTERM)
        self.assertEqual(self.kills, [(4000, signal.SIGTERM), (4000, signal.SIGKILL)])
        self.assertEqual(
            self.sent[0].json(),
            {"exit_code": None, "signal": 15, "duration": 0.0, "reason": "cancelled"},
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_linger(self) -> None:
        """
        When something outside the command's group still holds its output after
        the program ended, its output is still forwarded for linger seconds, then
        closed, and CMD_EXIT says so (reason held-open); nobody is signalled.
        """
        self.runner.handle(start(1, argv=["sh"]))
        [spawned] = self.reactor.spawned
        spawned.reap(3)
        self.reactor.advance(0.9)
        spawned.protocol.outReceived(b"from a straggler")
        self.assertFalse(spawned.process.output_closed)
        self.reactor.advance(0.1)
        self.assertTrue(spawned.process.output_closed)
        self.assertEqual(self.runner.running, 1)
        spawned.end(3)
        self.assertEqual([f.kind for f in self.sent], [Kind.CMD_STDOUT, Kind.CMD_EXIT])
        self.assertEqual(
            self.sent[-1].json(),
            {"exit_code": 3, "signal": None, "duration": 1.0, "reason": "held-open"},
        )
        self.assertEqual((self.kills, self.reactor.getDelayedCalls()), ([], []))

    def test_linger_waits_for_unread_output(self) -> None:
        """While its output is left unread (flow control), a command's linger starts over:
        what is waiting in the pipe is not held open by others."""
        self.runner.handle(start(1, argv=["sh"]))
        [spawned] = self.reactor.spawned
        self.runner.hold(1)
        spawned.reap(0)
        self.reactor.advance(5)
        self.assertFalse(spawned.process.output_closed)
        self.runner.release(1)
        self.reactor.advance(1)
        self.assertTrue(spawned.process.output_closed)

    def test_cancel_while_output_held_open(self) -> None:
        """Cancelling a command whose program ended but whose output is held open KILLs
        what is left of its group and closes its output at once."""
        self.runner.handle(start(1, argv=["sh"]))
        [spawned] = self.reactor.spawned
        spawned.reap(0)
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        self.assertEqual(self.kills, [(4000, signal.SIGKILL)])
        self.assertTrue(spawned.process.output_closed)
        spawned.end(0)
        self.assertEqual(self.sent[-1].json()["reason"], "held-open")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_group_yet(self) -> None:
        """With no process group yet (the trampoline has not called setsid), the signal
        goes to the process itself."""
        cancel = Envelope(Kind.CMD_CANCEL, 1)
        process = self.stop_without_group(
            self.runner, start(1, argv=["ls"]), cancel, 5, reaped=False
        )
        self.assertEqual(process.signals, [15, 9])

    def test_group_gone(self) -> None:
        """With the group gone and the process reaped, signals are quietly dropped."""
        cancel = Envelope(Kind.CMD_CANCEL, 1)
        process = self.stop_without_group(
            self.runner, start(1, argv=["ls"]), cancel, 5, reaped=True
        )
        self.assertEqual((process.signals, self.runner.running), ([], 1))

    def test_seq_and_output(self) -> None:
        """Output goes out raw, per stream, with seq 0, 1, 2... per stream and the peer
        and stream of the request; CMD_EXIT comes last."""
        self.runner.handle(start(1, peer=3, argv=["ls"]))
        self.runner.handle(start(2, peer=4, argv=["ls"]))
        one, two = self.reactor.spawned
        one.protocol.outReceived(b"\xff\x00")
        two.protocol.errReceived(b"e")
        one.protocol.errReceived(b"\xfe")
        one.protocol.outReceived(b"more")
        two.exit()
        one.exit(1)
        self.assertEqual(
            [(f.stream, f.peer, f.kind) for f in self.sent],
            [
                (1, 3, Kind.CMD_STDOUT),
                (2, 4, Kind.CMD_STDERR),
                (1, 3, Kind.CMD_STDERR),
                (1, 3, Kind.CMD_STDOUT),
                (2, 4, Kind.CMD_EXIT),
                (1, 3, Kind.CMD_EXIT),
            ],
        )
        self.assertEqual([f.payload for f in self.sent[:4]], [b"\xff\x00", b"e", b"\xfe", b"more"])

    def test_stream_reuse(self) -> None:
        """A stream id may be used again once its command has ended."""
        self.runner.handle(start(1, argv=["ls"]))
        self.reactor.spawned[0].exit()
        self.runner.handle(start(1, argv=["ls"]))
        self.reactor.spawned[1].exit()
        self.assertEqual([f.kind for f in self.sent], [Kind.CMD_EXIT, Kind.CMD_EXIT])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stdin(self) -> None:
        """With stdin true, CMD_STDIN bytes are written, an empty one closes stdin, and
        later ones are dropped."""
        self.runner.handle(start(1, argv=["cat"], stdin=True))
        process = self.reactor.spawned[0].process
        self.assertFalse(process.stdin_closed)
        for data in (b"a\x00", b"\xff", b"", b"late"):
            self.runner.handle(Envelope(Kind.CMD_STDIN, 1, 0, 7, data))
        self.assertEqual(process.written, [b"a\x00", b"\xff"])
        self.assertTrue(process.stdin_closed)

    def test_stdin_not_requested(self) -> None:
        """Without stdin, CMD_STDIN frames are dropped."""
        self.runner.handle(start(1, argv=["cat"]))
        self.runner.handle(Envelope(Kind.CMD_STDIN, 1, 0, 7, b"data"))
        self.assertEqual(self.reactor.spawned[0].process.written, [])

    def test_unknown_stream(self) -> None:
        """CMD_STDIN and CMD_CANCEL for a stream with no command are silently ignored."""
        self.runner.handle(start(1, argv=["cat"], stdin=True))
        self.runner.handle(Envelope(Kind.CMD_STDIN, 2, 0, 7, b"data"))
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 2))
        self.assertEqual((self.sent, self.kills), ([], []))
        self.assertEqual(self.reactor.spawned[0].process.written, [])

    def test_stop_all(self) -> None:
        """stop_all TERMs every command and fires once the last one has ended."""
        self.runner.handle(start(1, argv=["ls"]))
        self.runner.handle(start(2, argv=["ls"]))
        self.assert_stop_all(self.runner, signal.SIGTERM)
        self.assertEqual([f.json()["reason"] for f in self.sent], ["cancelled"] * 2)

    def test_stop_all_idle(self) -> None:
        """stop_all with nothing running fires at once."""
        self.assertIsNone(self.successResultOf(self.runner.stop_all()))

    def test_logs_keep_secrets(self) -> None:
        """Logs never carry a command's argv, shell line, cwd, env or output."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        secret = "s3cr3t"
        cwd = os.path.abspath(self.mktemp() + secret)
        os.mkdir(cwd)
        self.runner.handle(start(1, argv=["ls", secret], cwd=cwd, env={secret: secret}))
        self.runner.handle(start(2, shell=f"echo {secret}"))
        self.runner.handle(start(3, argv=[secret]))
        self.runner.handle(start(4, argv=["ls"], cwd=cwd + "/gone"))
        self.reactor.spawned[0].protocol.outReceived(secret.encode())
        self.reactor.spawned[0].exit()
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 2))
        self.reactor.spawned[1].exit(None, 15)
        self.assert_not_logged(secret, events, at_least=6)

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(
        processes.request_payloads(
            ["argv", "shell", "cwd", "env", "stdin", "timeout", "x"],
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        )
    )
    def test_any_start(self, payload: bytes) -> None:
        """Any CMD_START payload either spawns silently or gets exactly one CMD_ERROR."""
        reactor = FakeReactor()
        sent: list[Envelope] = []
        CommandRunner(reactor, sent.append).handle(Envelope(Kind.CMD_START, 5, 0, 0, payload))
        if reactor.spawned:
            self.assertEqual(sent, [])
        else:
            [frame] = sent
            self.assertEqual(frame.kind, Kind.CMD_ERROR)
            self.assertEqual(set(frame.json()), {"error", "message"})


class RealProcessTests(processes.RealProcessTestCase):
    """Real commands on the real reactor."""

    patience = 3.0

    def setUp(self) -> None:
        super().setUp()
        self.runner = self.make_runner(kill_grace=0.5)

    def make_runner(self, **settings: Any) -> CommandRunner:
        # The reactor is typed as zope interfaces, which match a Protocol only
        # under the mypy-zope plugin.
        reactor = cast(CommandReactor, self.reactor)
        runner = CommandRunner(
            reactor, self.inbox.send, CommandSettings(shell="/bin/sh", **settings)
        )
        self.addCleanup(runner.stop_all)
        return runner

    async def run_command(self, stream: int = 1, **body: Any) -> Any:
        """Start a command and wait for its CMD_EXIT body."""
        self.runner.handle(start(stream, **body))
        return await self.inbox.exit(stream)

    async def test_output_is_raw_and_separate(self) -> None:
        """stdout and stderr arrive on their own kinds, byte for byte, non-UTF-8 too."""
        body = await self.run_command(shell=r"printf '\377\000\376'; printf '\001\200' >&2")
        self.assertEqual(self.inbox.output(1), b"\xff\x00\xfe")
        self.assertEqual(self.inbox.output(1, Kind.CMD_STDERR), b"\x01\x80")
        self.assertEqual(body["exit_code"], 0)
        self.assertEqual(self.inbox.frames[-1].kind, Kind.CMD_EXIT)

    async def test_large_output(self) -> None:
        """10 MB of random bytes come through intact."""
        path = os.path.abspath(self.mktemp())
        data = os.urandom(10 * 1024 * 1024)
        with open(path, "wb") as f:
            f.write(data)
        body = await self.run_command(argv=["cat", path])
        self.assertEqual(body["exit_code"], 0)
        self.assertEqual(
            hashlib.sha256(self.inbox.output(1)).hexdigest(), hashlib.sha256(data).hexdigest()
        )

    async def test_exit_code_and_signal(self) -> None:
        """CMD_EXIT reports an exit status, or the signal that killed the command."""
        body = await self.run_command(1, argv=["sh", "-c", "exit 3"])
        self.assertEqual(
            body, {"exit_code": 3, "signal": None, "reason": "exited", "duration": mock.ANY}
        )
        body = await self.run_command(2, shell="kill -KILL $$")
        self.assertEqual((body["exit_code"], body["signal"]), (None, 9))
        self.assertEqual(body["reason"], "exited")
        self.assertGreater(body["duration"], 0)

    async def test_stdin_round_trip(self) -> None:
        """CMD_STDIN bytes reach the command; an empty one is EOF."""
        self.runner.handle(start(1, argv=["cat"], stdin=True))
        for data in (b"hello\x00", b"\xff world", b""):
            self.runner.handle(Envelope(Kind.CMD_STDIN, 1, 0, 7, data))
        body = await self.inbox.exit(1)
        self.assertEqual(body["exit_code"], 0)
        self.assertEqual(self.inbox.output(1), b"hello\x00\xff world")

    async def test_stdin_closed_by_default(self) -> None:
        """Without stdin, a command that reads it sees EOF at once instead of hanging."""
        body = await self.run_command(argv=["cat"])
        self.assertEqual((body["exit_code"], self.inbox.output(1)), (0, b""))

    async def test_env_and_cwd(self) -> None:
        """The command sees the request's env on top of the bridge's, and runs in cwd."""
        cwd = os.path.abspath(self.mktemp())
        os.mkdir(cwd)
        await self.run_command(
            1,
            argv=["sh", "-c", 'printf "%s|%s\\n" "$COLOR" "$PATH"; pwd -P'],
            env={"COLOR": "blue"},
            cwd=cwd,
        )
        expected = f"blue|{os.environ['PATH']}\n{os.path.realpath(cwd)}\n"
        self.assertEqual(self.inbox.output(1), expected.encode())
        await self.run_command(2, argv=["pwd", "-P"])
        self.assertEqual(self.inbox.output(2), f"{os.path.realpath(HOME)}\n".encode())

    async def test_concurrent(self) -> None:
        """Several commands run at the same time, each with its own output."""
        began = time.monotonic()
        streams = range(1, 9)
        for n in streams:
            self.runner.handle(start(n, argv=["sh", "-c", 'sleep 0.3; printf "$0"', str(n)]))
        self.assertEqual(self.runner.running, 8)
        for n in streams:
            self.assertEqual((await self.inbox.exit(n))["exit_code"], 0)
            self.assertEqual(self.inbox.output(n), str(n).encode())
        self.assertLess(time.monotonic() - began, 8 * 0.3)
        self.assertEqual(self.runner.running, 0)

    async def start_with_grandchild(self, stream: int, line: str, **body: Any) -> int:
        """Start a shell line that prints a background child's pid; that pid."""
        self.runner.handle(start(stream, shell=line, **body))
        return await self.printed_pid(stream, b"\n")

    async def test_cancel_kills_group(self) -> None:
        """Cancel ends the command and its grandchildren with TERM."""
        pid = await self.start_with_grandchild(1, "sleep 1000 & echo $!; wait")
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        body = await self.inbox.exit(1)
        self.assertEqual((body["reason"], body["signal"]), ("cancelled", signal.SIGTERM))
        await self.until_gone(pid)

    async def test_kill_after_grace(self) -> None:
        """A group that ignores TERM gets KILL after kill_grace."""
        pid = await self.start_with_grandchild(1, "trap '' TERM; sleep 1000 & echo $!; wait")
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        body = await self.inbox.exit(1)
        self.assertEqual((body["reason"], body["signal"]), ("cancelled", signal.SIGKILL))
        self.assertGreaterEqual(body["duration"], 0.5)
        await self.until_gone(pid)

    async def test_stragglers_swept(self) -> None:
        """A grandchild that ignores TERM and holds no output pipe does not outlive a
        cancelled command, even with a long grace."""
        self.runner = self.make_runner(kill_grace=60)
        pid = await self.start_with_grandchild(
            1, "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & echo $!; wait"
        )
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        self.assertEqual((await self.inbox.exit(1))["signal"], signal.SIGTERM)
        await self.until_gone(pid)

    async def test_cancelled_with_output_held_open(self) -> None:
        """
        The audit's case: a descendant that called setsid (so left the group) keeps
        the command's stdout open.  Cancel kills the group; linger seconds later the
        bridge closes the output, CMD_EXIT says it was held open, and the command's
        slot is free.  The descendant is not the bridge's to signal: it lives on.
        """
        self.runner = self.make_runner(kill_grace=0.5, linger=0.3)
        pid = await self.start_with_grandchild(1, "setsid sh -c 'echo $$; exec sleep 1000' & wait")
        self.addCleanup(os.kill, pid, signal.SIGKILL)
        self.runner.handle(Envelope(Kind.CMD_CANCEL, 1))
        body = await self.inbox.exit(1)
        self.assertEqual((body["reason"], body["signal"]), ("held-open", signal.SIGTERM))
        self.assertGreaterEqual(body["duration"], 0.3)
        self.assertEqual(self.runner.running, 0)
        self.assertTrue(processes.alive(pid))

    async def test_timeout_kills_group(self) -> None:
        """On timeout, the command and its grandchildren end and the reason says so."""
        pid = await self.start_with_grandchild(1, "sleep 1000 & echo $!; wait", timeout=0.3)
        body = await self.inbox.exit(1)
        self.assertEqual((body["reason"], body["signal"]), ("timeout", signal.SIGTERM))
        self.assertGreaterEqual(body["duration"], 0.3)
        await self.until_gone(pid)

    async def test_cancel_at_once(self) -> None:
        """A cancel in the same turn as the start, before the trampoline's setsid(), still
        TERMs the command rather than being lost until the KILL."""
        # Run the reactor, which installs its signal handlers, as in the bridge.
        await deferLater(self.reactor, 0)
        streams = range(1, 6)
        for n in streams:
            self.runner.handle(start(n, argv=["sleep", "1000"]))
        for n in streams:
            self.runner.handle(Envelope(Kind.CMD_CANCEL, n))
        for n in streams:
            body = await self.inbox.exit(n)
            self.assertEqual((body["reason"], body["signal"]), ("cancelled", signal.SIGTERM))

    async def test_stop_all(self) -> None:
        """stop_all ends every command, and fires after their CMD_EXITs."""
        for n in (1, 2, 3):
            self.runner.handle(start(n, argv=["sleep", "1000"]))
        await self.runner.stop_all()
        self.assertEqual(self.runner.running, 0)
        for n in (1, 2, 3):
            body = self.successResultOf(self.inbox.exit(n))
            self.assertEqual((body["reason"], body["signal"]), ("cancelled", signal.SIGTERM))
