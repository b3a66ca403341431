"""
Tests for L{coder1_bridge.terminals}.

L{FakeReactorTests} drive the manager with a fake reactor and a fake kill, so
clock times and signals are exact; the pseudo-terminals they open are real, so
window sizes can be read back.  L{RealTerminalTests} run real programs on real
pseudo-terminals on the real reactor.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import termios
import time
from typing import Any, cast
from unittest import mock

import attrs
import hypothesis
from hypothesis import strategies as st
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher

from coder1_bridge.terminals import TerminalManager, TerminalReactor, TerminalSettings
from coder1_wire.envelope import Envelope, Kind
from tests import processes

HOME = os.path.expanduser("~")


def open_frame(
    stream: int, peer: int = 7, cols: int = 80, rows: int = 24, **body: object
) -> Envelope:
    """A PTY_OPEN frame with C{body}, and the size, as its JSON payload."""
    payload = json.dumps({"cols": cols, "rows": rows, **body}).encode()
    return Envelope(Kind.PTY_OPEN, stream, 0, peer, payload)


def resize_frame(stream: int, cols: object, rows: object) -> Envelope:
    """A PTY_RESIZE frame."""
    return Envelope(
        Kind.PTY_RESIZE, stream, 0, 7, json.dumps({"cols": cols, "rows": rows}).encode()
    )


def window_size(fd: int) -> tuple[int, int]:
    """The (cols, rows) of the pseudo-terminal C{fd} belongs to."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


def open_fds() -> set[str]:
    """This process's open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


@attrs.define(kw_only=True)
class FakeProcess(processes.RecordingProcess):
    """What the fake reactor's spawnProcess returns: records input and signals."""

    pid: int | None
    hung_up: bool = False

    def loseConnection(self) -> None:
        self.hung_up = True


@attrs.define(kw_only=True)
class Spawned(processes.SpawnedProcess[FakeProcess]):
    """One recorded spawnProcess call.  Owns the master side, as Twisted would."""

    master: int
    ttyname: str
    #: The window size when spawnProcess was called, before the program could run.
    size: tuple[int, int]
    closed: bool = False

    def reap(self, code: int | None = 0, sig: int | None = None) -> None:
        """The program has ended and been reaped: deliver processExited."""
        self.process.reaped = True
        self.protocol.processExited(processes.exit_reason(code, sig))

    def close(self, code: int | None = 0, sig: int | None = None) -> None:
        """The terminal read EIO (or was hung up): close the master, deliver processEnded."""
        os.close(self.master)
        self.closed = True
        self.protocol.processEnded(processes.exit_reason(code, sig))

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        """The program ended and was the terminal's last user, as usual."""
        self.reap(code, sig)
        self.close(code, sig)


class FakeReactor(processes.SpawningClock[FakeProcess, Spawned]):
    """A clock that records spawnProcess calls instead of running anything."""

    def __init__(self) -> None:
        super().__init__()
        #: Reap the program inside spawnProcess, as Twisted does for one that
        #: died at once.
        self.die_at_once = False

    def record(self, call: processes.SpawnCall) -> Spawned:
        assert isinstance(call.usePTY, tuple), "terminals run on a pseudo-terminal"
        master, slave, name = call.usePTY
        size = window_size(slave)
        os.close(slave)
        process = FakeProcess(pid=self.next_pid)
        spawned = Spawned.of(call, master=master, ttyname=name, size=size, process=process)
        call.protocol.makeConnection(process)
        if self.die_at_once:
            spawned.reap(0)
            process.pid = None
        return spawned

    def end_all(self) -> None:
        """End every terminal still open, so that no descriptor is left open."""
        for spawned in self.spawned:
            if not spawned.closed:
                if not spawned.process.reaped:
                    spawned.reap(None, signal.SIGKILL)
                spawned.close(None, signal.SIGKILL)


class FakeReactorTests(processes.FakeSpawnerTestCase[FakeReactor]):
    """The manager against a fake reactor: what it spawns, sends and signals."""

    error_kind = Kind.PTY_ERROR

    def setUp(self) -> None:
        super().setUp()
        self.reactor = FakeReactor()
        self.manager = self.make_manager()
        fds = open_fds()
        self.addCleanup(lambda: self.assertEqual(open_fds(), fds))
        self.addCleanup(self.reactor.end_all)

    def make_manager(self, **settings: Any) -> TerminalManager:
        settings.setdefault("shell", "/bin/sh")
        return TerminalManager(
            self.reactor, self.sent.append, TerminalSettings(**settings), kill=self.kill
        )

    def test_open(self) -> None:
        """By default the user's login shell runs, as [shell, -l], in the home directory,
        with TERM and COLORTERM set, on a pseudo-terminal already of the asked size;
        PTY_OPENED answers with the pid and size."""
        self.manager.handle(open_frame(1, peer=3, cols=123, rows=37))
        [spawned] = self.reactor.spawned
        self.assertEqual((spawned.executable, spawned.args), ("/bin/sh", ["/bin/sh", "-l"]))
        self.assertEqual(spawned.path, HOME)
        self.assertEqual(
            spawned.env, {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        )
        self.assertEqual(spawned.size, (123, 37))
        self.assertTrue(spawned.ttyname.startswith("/dev/pts/"))
        [frame] = self.sent
        self.assertEqual(
            (frame.kind, frame.stream, frame.seq, frame.peer), (Kind.PTY_OPENED, 1, 0, 3)
        )
        self.assertEqual(frame.json(), {"pid": 4000, "cols": 123, "rows": 37})
        self.assertEqual(self.manager.running, 1)

    def test_default_shell(self) -> None:
        """The default shell is $SHELL, else /bin/sh, read when settings are made."""
        settings = self.assert_default_shell(TerminalSettings)
        self.assertEqual(
            (settings.max_terminals, settings.kill_grace, settings.term),
            (32, 2.0, "xterm-256color"),
        )

    def test_argv_cwd_env(self) -> None:
        """argv runs as given; cwd is used (relative ones from home); env is added to the
        bridge's own, and TERM is the configured one whatever the request says."""
        self.manager = self.make_manager(term="vt100")
        self.manager.handle(
            open_frame(1, argv=["ls", "-l", "a b"], cwd="/", env={"COLOR": "blue", "TERM": "x"})
        )
        self.manager.handle(open_frame(2, argv=["ls"], cwd="."))
        first, second = self.reactor.spawned
        self.assertEqual((first.executable, first.args), ("ls", ["ls", "-l", "a b"]))
        self.assertEqual(first.path, "/")
        self.assertEqual(
            first.env, {**os.environ, "COLOR": "blue", "TERM": "vt100", "COLORTERM": "truecolor"}
        )
        self.assertEqual(second.path, os.path.join(HOME, "."))

    def test_invalid_requests(self) -> None:
        """Malformed PTY_OPEN payloads get one bad-request PTY_ERROR and run nothing."""
        good = {"cols": 80, "rows": 24}
        payloads = [
            b"not json",
            b"\xff\xfe",
            b"",
            b"[]",
            b"{}",
            *(
                json.dumps(body).encode()
                for body in [
                    {"cols": 80},
                    {"rows": 24},
                    {"cols": 0, "rows": 24},
                    {"cols": 80, "rows": 0},
                    {"cols": 1001, "rows": 24},
                    {"cols": 80, "rows": 1001},
                    {"cols": -1, "rows": 24},
                    {"cols": 80.0, "rows": 24},
                    {"cols": "80", "rows": 24},
                    {"cols": True, "rows": 24},
                    {**good, "argv": []},
                    {**good, "argv": "ls"},
                    {**good, "argv": ["ls", 1]},
                    {**good, "argv": ["l\0s"]},
                    {**good, "argv": ["\ud800"]},
                    {**good, "cwd": 3},
                    {**good, "env": ["A=1"]},
                    {**good, "env": {"A": 1}},
                    {**good, "env": {"A=B": "1"}},
                    {**good, "env": {"": "1"}},
                ]
            ),
        ]
        self.assert_bad_requests(self.manager.handle, Kind.PTY_OPEN, payloads)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.manager.running, 0)

    def test_size_limits(self) -> None:
        """1 and 1000 columns or rows are accepted."""
        self.manager.handle(open_frame(1, cols=1, rows=1000))
        self.manager.handle(open_frame(2, cols=1000, rows=1))
        self.assertEqual([s.size for s in self.reactor.spawned], [(1, 1000), (1000, 1)])

    def test_null_is_absent(self) -> None:
        """A JSON null counts as a missing key."""
        self.manager.handle(open_frame(1, argv=None, cwd=None, env=None))
        [spawned] = self.reactor.spawned
        self.assertEqual((spawned.args, spawned.path), (["/bin/sh", "-l"], HOME))

    def test_duplicate_stream(self) -> None:
        """An open on a live stream is refused; the terminal open there goes on."""
        self.manager.handle(open_frame(1))
        self.manager.handle(open_frame(1))
        self.reactor.spawned[0].protocol.outReceived(b"x")
        self.assertEqual(
            [f.kind for f in self.sent],
            [Kind.PTY_OPENED, Kind.PTY_ERROR, Kind.PTY_OUTPUT],
        )
        self.assertEqual(self.sent[1].json()["error"], "stream-in-use")
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_too_many(self) -> None:
        """Past max_terminals, opens are refused until a terminal ends."""
        self.manager = self.make_manager(max_terminals=2)
        for stream in (1, 2, 3):
            self.manager.handle(open_frame(stream))
        self.assertEqual(self.sent[2].json()["error"], "too-many")
        self.reactor.spawned[0].exit()
        self.manager.handle(open_frame(4))
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.manager.running, 2)

    def test_missing_cwd(self) -> None:
        """A cwd that is not a directory is refused."""
        self.manager.handle(open_frame(1, cwd="/no/such/dir"))
        self.assertEqual(self.only_error()["error"], "bad-cwd")
        self.assertEqual(self.reactor.spawned, [])

    def test_not_found(self) -> None:
        """Programs that exec would not find, on the merged PATH, are refused before
        spawning; so is a missing login shell."""
        plain = self.make_plain_file()
        self.manager.handle(open_frame(1, argv=["no-such-command-c0der1"]))
        self.manager.handle(open_frame(2, argv=[plain]))
        self.manager.handle(open_frame(3, argv=["ls"], env={"PATH": "/nonexistent"}))
        self.manager = self.make_manager(shell="/no/such/shell")
        self.manager.handle(open_frame(4))
        self.assertEqual([f.json()["error"] for f in self.sent], ["not-found"] * 4)
        self.assertEqual(self.reactor.spawned, [])

    def test_found_by_request_path_and_cwd(self) -> None:
        """The request's PATH is searched, and relative paths are taken from cwd."""
        bin_dir = self.make_tool()
        self.manager.handle(open_frame(1, argv=["tool"], env={"PATH": bin_dir}))
        self.manager.handle(open_frame(2, argv=["./tool"], cwd=bin_dir))
        self.assertEqual([s.args for s in self.reactor.spawned], [["tool"], ["./tool"]])
        self.assertEqual([f.kind for f in self.sent], [Kind.PTY_OPENED] * 2)

    def test_spawn_failure(self) -> None:
        """An OSError from spawnProcess becomes spawn-failed, with nothing left running
        and no descriptor left open (checked on cleanup)."""
        self.reactor.spawn_error = OSError(11, "Resource temporarily unavailable")
        self.manager.handle(open_frame(1))
        self.assertEqual(self.only_error()["error"], "spawn-failed")
        self.assertEqual(self.manager.running, 0)

    def test_no_pty(self) -> None:
        """When no pseudo-terminal can be had, the open is refused with no-pty."""
        with mock.patch.object(os, "openpty", side_effect=OSError(5, "no ptys")):
            self.manager.handle(open_frame(1))
        self.assertEqual(self.only_error()["error"], "no-pty")
        self.assertEqual(self.reactor.spawned, [])

    def test_seq_and_output(self) -> None:
        """Output goes out raw, per stream, with seq 0, 1, 2... per stream after
        PTY_OPENED, and the peer and stream of the request; PTY_EXIT comes last."""
        self.manager.handle(open_frame(1, peer=3))
        self.manager.handle(open_frame(2, peer=4))
        one, two = self.reactor.spawned
        one.protocol.outReceived(b"\xff\x00")
        two.protocol.outReceived(b"\x1b[31mred")
        one.protocol.outReceived(b"more")
        two.exit(None, signal.SIGHUP)
        one.exit(7)
        self.assertEqual(
            [(f.stream, f.peer, f.kind) for f in self.sent],
            [
                (1, 3, Kind.PTY_OPENED),
                (2, 4, Kind.PTY_OPENED),
                (1, 3, Kind.PTY_OUTPUT),
                (2, 4, Kind.PTY_OUTPUT),
                (1, 3, Kind.PTY_OUTPUT),
                (2, 4, Kind.PTY_EXIT),
                (1, 3, Kind.PTY_EXIT),
            ],
        )
        self.assertEqual(
            [f.payload for f in self.sent[2:5]], [b"\xff\x00", b"\x1b[31mred", b"more"]
        )
        self.assertEqual(self.sent[5].json(), {"exit_code": None, "signal": 1})
        self.assertEqual(self.sent[6].json(), {"exit_code": 7, "signal": None})
        self.assertEqual(self.manager.running, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_exit_waits_for_the_terminal(self) -> None:
        """PTY_EXIT comes from processEnded, after the last output, not when the program
        is reaped."""
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        spawned.reap(0)
        spawned.protocol.outReceived(b"last")
        self.assertEqual([f.kind for f in self.sent], [Kind.PTY_OPENED, Kind.PTY_OUTPUT])
        spawned.close(0)
        self.assertEqual(self.sent[-1].kind, Kind.PTY_EXIT)
        self.assertFalse(spawned.process.hung_up)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stream_reuse(self) -> None:
        """A stream id may be used again once its terminal has ended."""
        self.manager.handle(open_frame(1))
        self.reactor.spawned[0].exit()
        self.manager.handle(open_frame(1))
        self.assertEqual(
            [f.kind for f in self.sent], [Kind.PTY_OPENED, Kind.PTY_EXIT, Kind.PTY_OPENED]
        )

    def test_input(self) -> None:
        """PTY_INPUT bytes are written raw, one write per frame; empty ones are dropped,
        and so is input once the program has ended."""
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        for data in (b"a\x00", b"\xff", b"", b"\x03"):
            self.manager.handle(Envelope(Kind.PTY_INPUT, 1, 0, 7, data))
        spawned.reap(0)
        self.manager.handle(Envelope(Kind.PTY_INPUT, 1, 0, 7, b"late"))
        self.assertEqual(spawned.process.written, [b"a\x00", b"\xff", b"\x03"])
        self.assertEqual(self.sent[1:], [])

    def test_resize(self) -> None:
        """PTY_RESIZE sets the terminal's window size, which PTY_LIST then shows."""
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        self.manager.handle(resize_frame(1, 200, 50))
        self.assertEqual(window_size(spawned.master), (200, 50))
        self.manager.handle(Envelope(Kind.PTY_LIST, 1, 0, 7))
        [entry] = self.sent[-1].json()["terminals"]
        self.assertEqual((entry["cols"], entry["rows"]), (200, 50))
        self.assertEqual(len(self.sent), 2)

    def test_bad_resize(self) -> None:
        """A resize with a bad size is ignored with a log line: no reply, no change."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.manager.handle(open_frame(1, cols=80, rows=24))
        [spawned] = self.reactor.spawned
        bad = [(0, 24), (80, 1001), ("80", 24), (80.5, 24), (None, 24), (True, 24)]
        for cols, rows in bad:
            self.manager.handle(resize_frame(1, cols, rows))
        self.manager.handle(Envelope(Kind.PTY_RESIZE, 1, 0, 7, b"not json"))
        self.assertEqual(window_size(spawned.master), (80, 24))
        self.assertEqual([f.kind for f in self.sent], [Kind.PTY_OPENED])
        warnings = [e for e in events if "bad resize" in formatEvent(e)]
        self.assertEqual(len(warnings), len(bad) + 1)

    def test_resize_after_the_terminal_closed(self) -> None:
        """Resizing works on the manager's own descriptor, which stays valid however
        the program treats its terminal, until PTY_EXIT."""
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        os.close(spawned.master)
        spawned.master = os.open(os.devnull, os.O_RDONLY)  # what Twisted's fd may become
        self.manager.handle(resize_frame(1, 100, 30))
        self.manager.handle(Envelope(Kind.PTY_LIST, 2, 0, 7))
        self.assertEqual(self.sent[-1].json()["terminals"][0]["cols"], 100)

    def test_close(self) -> None:
        """PTY_CLOSE HUPs the group at once and KILLs it kill_grace later; a second close
        changes nothing; PTY_EXIT still follows."""
        self.manager = self.make_manager(kill_grace=2.0)
        self.manager.handle(open_frame(1))
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.assertEqual(self.kills, [(4000, signal.SIGHUP)])
        self.reactor.advance(1.5)
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.assertEqual(self.kills, [(4000, signal.SIGHUP)])
        self.reactor.advance(0.5)
        self.assertEqual(self.kills, [(4000, signal.SIGHUP), (4000, signal.SIGKILL)])
        self.reactor.spawned[0].exit(None, signal.SIGKILL)
        self.assertEqual(self.sent[-1].kind, Kind.PTY_EXIT)
        self.assertEqual(self.sent[-1].json(), {"exit_code": None, "signal": 9})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_close_sweeps_group_on_exit(self) -> None:
        """When a closed terminal's program ends within the grace, the rest of its group
        gets KILL at once, and no timer is left."""
        self.manager.handle(open_frame(1))
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.reactor.spawned[0].exit(None, signal.SIGHUP)
        self.assertEqual(self.kills, [(4000, signal.SIGHUP), (4000, signal.SIGKILL)])
        self.assertEqual(self.sent[-1].json(), {"exit_code": None, "signal": 1})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_group_yet(self) -> None:
        """With no process group yet (the child has not called setsid), the signal goes
        to the process itself."""
        close = Envelope(Kind.PTY_CLOSE, 1)
        process = self.stop_without_group(self.manager, open_frame(1), close, 2, reaped=False)
        self.assertEqual(process.signals, [1, 9])

    def test_group_gone(self) -> None:
        """With the group gone and the process reaped, signals are quietly dropped."""
        close = Envelope(Kind.PTY_CLOSE, 1)
        process = self.stop_without_group(self.manager, open_frame(1), close, 2, reaped=True)
        self.assertEqual((process.signals, self.manager.running), ([], 1))

    def test_linger(self) -> None:
        """When something outside the program still holds the terminal after the program
        ended, the terminal is hung up linger seconds later, and PTY_EXIT follows."""
        self.manager = self.make_manager(linger=1.0)
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        spawned.reap(3)
        self.reactor.advance(0.9)
        spawned.protocol.outReceived(b"from a straggler")
        self.assertFalse(spawned.process.hung_up)
        self.reactor.advance(0.1)
        self.assertTrue(spawned.process.hung_up)
        self.assertEqual(self.manager.running, 1)
        spawned.close(3)
        self.assertEqual(
            [f.kind for f in self.sent], [Kind.PTY_OPENED, Kind.PTY_OUTPUT, Kind.PTY_EXIT]
        )
        self.assertEqual(self.sent[-1].json(), {"exit_code": 3, "signal": None})
        self.assertEqual((self.kills, self.reactor.getDelayedCalls()), ([], []))

    def test_close_after_exit(self) -> None:
        """Closing a terminal whose program has ended KILLs what is left of the group and
        hangs up at once, instead of leaving it to linger."""
        self.manager.handle(open_frame(1))
        [spawned] = self.reactor.spawned
        spawned.reap(0)
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.assertEqual(self.kills, [(4000, signal.SIGKILL)])
        self.assertTrue(spawned.process.hung_up)
        spawned.close(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_died_inside_spawn(self) -> None:
        """A program Twisted reaps inside spawnProcess still opens and gets its pid, and
        its terminal is on its way to close."""
        self.reactor.die_at_once = True
        self.manager.handle(open_frame(1))
        self.assertEqual(self.sent[0].json()["pid"], 4000)
        [spawned] = self.reactor.spawned
        self.reactor.advance(1.0)
        self.assertTrue(spawned.process.hung_up)
        spawned.close(0)
        self.assertEqual(self.sent[-1].kind, Kind.PTY_EXIT)

    def test_list(self) -> None:
        """PTY_LIST, on any stream, lists every open terminal with its stream, peer, size,
        start time and pid; ended terminals are gone from it.  On a terminal's stream the
        reply takes that stream's next seq, elsewhere seq 0."""
        self.manager.handle(open_frame(1, peer=3, cols=100, rows=30))
        self.reactor.advance(2.5)
        self.manager.handle(open_frame(2, peer=3, cols=90, rows=20))
        self.manager.handle(Envelope(Kind.PTY_LIST, 9, 0, 3))
        listing = self.sent[-1]
        self.assertEqual(
            (listing.kind, listing.stream, listing.seq, listing.peer), (Kind.PTY_LISTING, 9, 0, 3)
        )
        self.assertEqual(
            listing.json(),
            {
                "terminals": [
                    {"stream": 1, "peer": 3, "cols": 100, "rows": 30, "started": 0.0, "pid": 4000},
                    {"stream": 2, "peer": 3, "cols": 90, "rows": 20, "started": 2.5, "pid": 4001},
                ]
            },
        )
        self.manager.handle(Envelope(Kind.PTY_LIST, 2, 0, 3))
        self.assertEqual((self.sent[-1].stream, self.sent[-1].seq), (2, 0))
        self.reactor.spawned[0].exit()
        self.manager.handle(Envelope(Kind.PTY_LIST, 9, 0, 3))
        self.assertEqual([t["stream"] for t in self.sent[-1].json()["terminals"]], [2])
        self.reactor.spawned[1].exit()
        self.manager.handle(Envelope(Kind.PTY_LIST, 9, 0, 3))
        self.assertEqual(self.sent[-1].json(), {"terminals": []})

    def test_unknown_stream(self) -> None:
        """PTY_INPUT, PTY_RESIZE and PTY_CLOSE for a stream with no terminal, and frames of
        other kinds, are ignored without a reply."""
        self.manager.handle(open_frame(1))
        del self.sent[:]
        self.manager.handle(Envelope(Kind.PTY_INPUT, 2, 0, 7, b"data"))
        self.manager.handle(resize_frame(2, 100, 30))
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 2))
        self.manager.handle(Envelope(Kind.CMD_START, 1, 0, 7, b"{}"))
        self.assertEqual((self.sent, self.kills), ([], []))
        self.assertEqual(self.reactor.spawned[0].process.written, [])
        self.assertEqual(window_size(self.reactor.spawned[0].master), (80, 24))

    def test_stop_all(self) -> None:
        """stop_all HUPs every terminal and fires once the last one has ended."""
        self.manager.handle(open_frame(1))
        self.manager.handle(open_frame(2))
        self.assert_stop_all(self.manager, signal.SIGHUP)
        self.assertEqual([f.kind for f in self.sent[-2:]], [Kind.PTY_EXIT] * 2)
        self.assertEqual(self.manager.running, 0)

    def test_stop_all_idle(self) -> None:
        """stop_all with nothing open fires at once."""
        self.assertIsNone(self.successResultOf(self.manager.stop_all()))

    def test_logs_keep_secrets(self) -> None:
        """Logs never carry a terminal's argv, cwd, env, input or output."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        secret = "s3cr3t"
        cwd = os.path.abspath(self.mktemp() + secret)
        os.mkdir(cwd)
        self.manager.handle(open_frame(1, argv=["ls", secret], cwd=cwd, env={secret: secret}))
        self.manager.handle(open_frame(2, argv=[secret]))
        self.manager.handle(open_frame(3, cwd=cwd + "/gone"))
        self.manager.handle(Envelope(Kind.PTY_INPUT, 1, 0, 7, secret.encode()))
        self.manager.handle(Envelope(Kind.PTY_RESIZE, 1, 0, 7, secret.encode()))
        self.reactor.spawned[0].protocol.outReceived(secret.encode())
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.reactor.spawned[0].exit(None, 1)
        self.assert_not_logged(secret, events, at_least=5)

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(
        processes.request_payloads(
            ["cols", "rows", "argv", "cwd", "env", "x"],
            st.none()
            | st.booleans()
            | st.integers(-2, 1002)
            | st.floats()
            | st.text()
            | st.just(["sh"]),
        )
    )
    def test_any_open(self, payload: bytes) -> None:
        """Any PTY_OPEN payload either opens a terminal, answered by one PTY_OPENED, or
        gets exactly one PTY_ERROR and opens nothing."""
        reactor = FakeReactor()
        sent: list[Envelope] = []
        TerminalManager(reactor, sent.append).handle(Envelope(Kind.PTY_OPEN, 5, 0, 0, payload))
        try:
            [frame] = sent
            if reactor.spawned:
                self.assertEqual(frame.kind, Kind.PTY_OPENED)
            else:
                self.assertEqual(frame.kind, Kind.PTY_ERROR)
                self.assertEqual(set(frame.json()), {"error", "message"})
        finally:
            reactor.end_all()


class RealTerminalTests(processes.RealProcessTestCase):
    """Real programs on real pseudo-terminals on the real reactor."""

    patience = 5.0

    def setUp(self) -> None:
        super().setUp()
        self.manager = self.make_manager()

    def make_manager(self, **settings: Any) -> TerminalManager:
        settings.setdefault("kill_grace", 0.5)
        settings.setdefault("linger", 0.3)
        # The reactor is typed as zope interfaces, which match a Protocol only
        # under the mypy-zope plugin.
        reactor = cast(TerminalReactor, self.reactor)
        manager = TerminalManager(
            reactor, self.inbox.send, TerminalSettings(shell="/bin/sh", **settings)
        )
        self.addCleanup(manager.stop_all)
        return manager

    def type(self, stream: int, data: bytes) -> None:
        """Send keystrokes to a terminal."""
        self.manager.handle(Envelope(Kind.PTY_INPUT, stream, 0, 7, data))

    async def run_terminal(self, argv: list[str], stream: int = 1, **body: Any) -> Any:
        """Open a terminal running C{argv} and wait for its PTY_EXIT body."""
        self.manager.handle(open_frame(stream, argv=argv, **body))
        return await self.inbox.exit(stream)

    async def output_shows(self, stream: int, marker: bytes) -> None:
        """Wait until C{marker} is in a terminal's output."""
        await self.eventually(lambda: marker in self.inbox.output(stream), repr(marker))

    def assert_well_formed(self, stream: int) -> None:
        """The stream got PTY_OPENED, output, then one PTY_EXIT."""
        frames = self.inbox.stream(stream)
        kinds = [f.kind for f in frames]
        self.assertEqual(kinds[0], Kind.PTY_OPENED)
        self.assertEqual(kinds[-1], Kind.PTY_EXIT)
        self.assertEqual(set(kinds[1:-1]) - {Kind.PTY_OUTPUT}, set())

    async def test_initial_size(self) -> None:
        """The program starts with the window size asked for already set."""
        body = await self.run_terminal(["sh", "-c", "stty size"], cols=123, rows=37)
        self.assertEqual(body, {"exit_code": 0, "signal": None})
        self.assertEqual(self.inbox.output(1), b"37 123\r\n")
        opened = self.inbox.stream(1)[0].json()
        self.assertEqual((opened["cols"], opened["rows"]), (123, 37))
        self.assertIsInstance(opened["pid"], int)
        self.assert_well_formed(1)

    async def test_resize(self) -> None:
        """After PTY_RESIZE, programs in the terminal see the new size."""
        self.manager.handle(open_frame(1, argv=["sh"]))
        self.manager.handle(resize_frame(1, 200, 50))
        self.type(1, b"stty size\n")
        await self.output_shows(1, b"50 200")
        self.type(1, b"exit\n")
        self.assertEqual((await self.inbox.exit(1))["exit_code"], 0)

    async def test_sigwinch(self) -> None:
        """A resize sends SIGWINCH to the program in the terminal."""
        line = 'trap "echo WINCH" WINCH; echo ready; while :; do sleep 0.05; done'
        self.manager.handle(open_frame(1, argv=["sh", "-c", line]))
        await self.output_shows(1, b"ready")
        self.manager.handle(resize_frame(1, 100, 40))
        await self.output_shows(1, b"WINCH")

    async def test_echo_round_trip(self) -> None:
        """Typed bytes are echoed by the line discipline and read by the program; Ctrl-D
        at the start of a line is end of file."""
        self.manager.handle(open_frame(1, argv=["cat"]))
        self.type(1, b"hel")
        self.type(1, b"lo\n")
        await self.output_shows(1, b"hello\r\nhello\r\n")
        self.type(1, b"\x04")
        self.assertEqual(await self.inbox.exit(1), {"exit_code": 0, "signal": None})
        self.assertEqual(self.inbox.output(1), b"hello\r\nhello\r\n")

    async def test_ctrl_c(self) -> None:
        """Ctrl-C interrupts the program in the foreground, with SIGINT."""
        self.manager.handle(open_frame(1, argv=["sh", "-c", "echo ready; exec sleep 100"]))
        await self.output_shows(1, b"ready")
        self.type(1, b"\x03")
        self.assertEqual(await self.inbox.exit(1), {"exit_code": None, "signal": signal.SIGINT})
        self.assertIn(b"^C", self.inbox.output(1))

    async def test_exit_status(self) -> None:
        """PTY_EXIT reports an exit status, or the signal that killed the program."""
        self.assertEqual(
            await self.run_terminal(["sh", "-c", "exit 7"], 1), {"exit_code": 7, "signal": None}
        )
        self.assertEqual(
            await self.run_terminal(["sh", "-c", "kill -KILL $$"], 2),
            {"exit_code": None, "signal": signal.SIGKILL},
        )

    async def test_no_output_lost(self) -> None:
        """All output written before the program ends arrives, then one PTY_EXIT."""
        line = "yes 0123456789abcdef | head -n 20000"
        for stream in (1, 2, 3):
            self.manager.handle(open_frame(stream, argv=["sh", "-c", line]))
        for stream in (1, 2, 3):
            self.assertEqual((await self.inbox.exit(stream))["exit_code"], 0)
            self.assertEqual(self.inbox.output(stream), b"0123456789abcdef\r\n" * 20000)
            self.assert_well_formed(stream)

    async def test_colour_passes_through(self) -> None:
        """Escape sequences and other bytes reach the browser untouched."""
        await self.run_terminal(["sh", "-c", r"printf '\033[31mred\033[0m\377'"])
        self.assertEqual(self.inbox.output(1), b"\x1b[31mred\x1b[0m\xff")

    async def test_environment(self) -> None:
        """The program sees TERM, COLORTERM, the request's env, and runs in cwd."""
        cwd = os.path.abspath(self.mktemp())
        os.mkdir(cwd)
        line = 'printf "%s|%s|%s|" "$TERM" "$COLORTERM" "$COLOR"; pwd -P'
        await self.run_terminal(["sh", "-c", line], env={"COLOR": "blue"}, cwd=cwd)
        expected = f"xterm-256color|truecolor|blue|{os.path.realpath(cwd)}\r\n"
        self.assertEqual(self.inbox.output(1), expected.encode())

    async def start_with_grandchild(self, stream: int, line: str) -> int:
        """Open a terminal running a shell line that prints a background child's pid;
        that pid."""
        self.manager.handle(open_frame(stream, argv=["sh", "-c", line]))
        return await self.printed_pid(stream, b"\r\n")

    async def test_close_kills_group(self) -> None:
        """PTY_CLOSE ends the program and its background children with SIGHUP."""
        pid = await self.start_with_grandchild(1, "sleep 1000 & echo $!; wait")
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.assertEqual(await self.inbox.exit(1), {"exit_code": None, "signal": signal.SIGHUP})
        await self.until_gone(pid)
        self.assertEqual(self.manager.running, 0)

    async def test_kill_after_grace(self) -> None:
        """A group that ignores SIGHUP gets SIGKILL after kill_grace."""
        pid = await self.start_with_grandchild(1, "trap '' HUP; sleep 1000 & echo $!; wait")
        began = time.monotonic()
        self.manager.handle(Envelope(Kind.PTY_CLOSE, 1))
        self.assertEqual(await self.inbox.exit(1), {"exit_code": None, "signal": signal.SIGKILL})
        self.assertGreaterEqual(time.monotonic() - began, 0.5)
        await self.until_gone(pid)

    async def test_straggler_hung_up(self) -> None:
        """A process of another session that holds the terminal after the program exited
        does not keep it open past linger; it is left running, as a terminal emulator
        would leave it."""
        pid = await self.start_with_grandchild(
            1, "setsid sh -c 'echo $$; exec sleep 1000' & read line"
        )
        self.addCleanup(os.kill, pid, signal.SIGKILL)
        self.type(1, b"\n")
        began = time.monotonic()
        self.assertEqual(await self.inbox.exit(1), {"exit_code": 0, "signal": None})
        self.assertGreaterEqual(time.monotonic() - began, 0.3)
        self.assertTrue(processes.alive(pid))

    async def test_many(self) -> None:
        """Twenty terminals work at once, each output on its own stream; one more is
        refused while they are open."""
        self.manager = self.make_manager(max_terminals=20)
        streams = range(1, 21)
        for n in streams:
            self.manager.handle(
                open_frame(n, argv=["sh", "-c", 'read x; echo "marker-$0"', str(n)])
            )
        self.manager.handle(open_frame(21, argv=["sh"]))
        [refused] = self.inbox.stream(21)
        self.assertEqual(refused.json()["error"], "too-many")
        self.assertEqual(self.manager.running, 20)
        for n in streams:
            self.type(n, b"go\n")
        for n in streams:
            self.assertEqual((await self.inbox.exit(n))["exit_code"], 0)
            self.assertEqual(self.inbox.output(n), f"go\r\nmarker-{n}\r\n".encode())
            self.assert_well_formed(n)
        self.assertEqual(self.manager.running, 0)

    async def test_list(self) -> None:
        """PTY_LIST shows the open terminals with their sizes, and not ended ones."""
        self.manager.handle(open_frame(1, argv=["sh", "-c", "read x"], cols=100, rows=30))
        self.manager.handle(open_frame(2, argv=["sh", "-c", "read x"], cols=90, rows=20))
        self.manager.handle(resize_frame(2, 91, 21))
        self.manager.handle(Envelope(Kind.PTY_LIST, 9, 0, 7))
        listing = self.inbox.stream(9)[-1].json()["terminals"]
        pids = {f.stream: f.json()["pid"] for f in self.inbox.frames if f.kind == Kind.PTY_OPENED}
        self.assertEqual(
            [(t["stream"], t["peer"], t["cols"], t["rows"], t["pid"]) for t in listing],
            [(1, 7, 100, 30, pids[1]), (2, 7, 91, 21, pids[2])],
        )
        for t in listing:
            self.assertLess(abs(t["started"] - self.reactor.seconds()), 5)
        self.type(1, b"\n")
        await self.inbox.exit(1)
        self.manager.handle(Envelope(Kind.PTY_LIST, 9, 0, 7))
        self.assertEqual([t["stream"] for t in self.inbox.stream(9)[-1].json()["terminals"]], [2])

    async def test_stop_all(self) -> None:
        """stop_all ends every terminal, even one that ignores SIGHUP, and fires after
        their PTY_EXITs."""
        self.manager.handle(open_frame(1, argv=["sleep", "1000"]))
        self.manager.handle(open_frame(2, argv=["sh"]))
        self.manager.handle(open_frame(3, argv=["sh", "-c", "trap '' HUP; echo ready; sleep 1000"]))
        await self.output_shows(3, b"ready")
        await self.manager.stop_all()
        self.assertEqual(self.manager.running, 0)
        signals = [self.successResultOf(self.inbox.exit(n))["signal"] for n in (1, 2, 3)]
        self.assertEqual(signals, [signal.SIGHUP, signal.SIGHUP, signal.SIGKILL])
