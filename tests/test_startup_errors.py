"""
A relay (or bridge) that cannot start says why in one line and exits
non-zero, as a person running C{twistd} meets it: a listening endpoint it
cannot use (foreground and daemon), a file it cannot use, a bad option.
The real commands run as processes; a daemon a test starts is always
stopped at cleanup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from coder1_relay.service import RelayService, RelaySettings, home_relative
from coder1_relay.startup_errors import check_endpoint, socket_reason
from coder1_wire.twistd_errors import CannotStart

from .loopback import reactor

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SOURCE = FilePath(__file__).parent().parent().path
#: What must never reach a person starting the relay.
LEAKS = ("Traceback", "Error", "Exception", "CannotStart", "usage:", "Options:")


class _Output(ProcessProtocol):
    """A process's stdout and stderr, apart, and its exit status."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self.err += data
        else:
            self.out += data

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.ended.callback(code)


def _listening_socket() -> socket.socket:
    """A TCP port on loopback that something listens on already."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    return taken


def _ours(marker: str) -> list[int]:
    """The processes, other than this one, whose command line holds C{marker}."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read():
                found.append(int(pid))
    return found


def _stop_strays(marker: str) -> None:
    """TERM every process of ours whose command line holds C{marker} (a daemon left running)."""
    for pid in _ours(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


async def _gone(marker: str, within: float = 20.0) -> bool:
    """
    Whether every process whose command line holds C{marker} has ended
    within C{within} seconds.  A daemon's parent exits as soon as the
    daemon reports its failure, before the daemon writes it to its log.
    """
    for _ in range(int(within / 0.05)):
        if not _ours(marker):
            return True
        await deferLater(reactor, 0.05)
    return not _ours(marker)


class StartFailureTests(TestCase):
    """The real C{twistd coder1-relay} and C{twistd coder1-bridge}, started wrongly."""

    timeout = 60

    def setUp(self) -> None:
        self.home = FilePath(self.mktemp())
        self.home.makedirs()
        self.state = self.home.child("state")
        # Every process of a test has the state directory in its command line.
        self.addCleanup(_stop_strays, self.state.path)

    async def twistd(self, *argv: str, daemon: bool = False) -> _Output:
        """Run C{twistd [-n] argv} to its end; a daemon keeps its pid file and log in home."""
        mode = (
            [f"--pidfile={self.home.child('relay.pid').path}", "--logfile", self.log.path]
            if daemon
            else ["-n", "--pidfile="]
        )
        output = _Output()
        env = {**os.environ, "PYTHONPATH": SOURCE, "XDG_CONFIG_HOME": self.home.path}
        reactor.spawnProcess(output, TWISTD, [TWISTD, *mode, *argv], env=env, path=self.home.path)
        await output.ended
        return output

    @property
    def log(self) -> FilePath[str]:
        return self.home.child("relay.log")

    def assert_one_line(self, output: _Output, *said: str) -> str:
        """Exactly one line on stderr, holding each of C{said}; nothing a person should not see."""
        lines = output.err.decode().splitlines()
        self.assertEqual(len(lines), 1, output.err)
        for each in said:
            self.assertIn(each, lines[0])
        for leak in LEAKS:
            self.assertNotIn(leak, lines[0])
        return lines[0]

    async def relay(self, *argv: str, daemon: bool = False) -> _Output:
        return await self.twistd(
            "coder1-relay", "--state-dir", self.state.path, *argv, daemon=daemon
        )

    async def test_unusable_listen_endpoints(self) -> None:
        """
        An unknown endpoint type, a port that is not a number, a port in use and
        an address not on this machine: in the foreground and as a daemon, one
        line that names the endpoint and the reason, exit status 1, nothing
        left running, no pid file.
        """
        taken = _listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        cases = [
            ("bogus:1234", "“bogus” is not an endpoint type"),
            ("tcp:notaport", "the port is not a number"),
            (f"tcp:{port}:interface=127.0.0.1", f"port {port} is in use by another program"),
            ("tcp:0:interface=192.0.2.1", "this machine has no address 192.0.2.1"),
        ]
        for daemon in (False, True):
            for endpoint, reason in cases:
                output = await self.relay("--listen", endpoint, daemon=daemon)
                self.assertEqual(output.ended.result, 1, (daemon, endpoint, output.err))
                self.assert_one_line(output, f"Cannot listen on {endpoint} (--listen)", reason)
                self.assertFalse(self.home.child("relay.pid").exists())
        # The port of the in-use case is still the other program's.
        self.assertEqual(taken.getsockname()[1], port)

    async def test_node_listener_taken_after_start(self) -> None:
        """
        A node listener that fails once the relay has started (here: the same
        port as --listen, which the relay itself just took) stops it: one
        line in the foreground, exit status 1; as a daemon, exit status 1,
        the line in the daemon's log, no pid file and no daemon left.
        """
        free = _listening_socket()
        port = free.getsockname()[1]
        free.close()
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        argv = ["--listen", endpoint, "--node-listen", endpoint, "--store", "redis://127.0.0.1:1/0"]
        said = f"Cannot listen on {endpoint} (--node-listen): port {port} is in use"
        output = await self.relay(*argv)
        self.assertEqual(output.ended.result, 1, output.err)
        self.assert_one_line(output, said)
        output = await self.relay(*argv, daemon=True)
        self.assertEqual(output.ended.result, 1, output.err)
        self.assertTrue(await _gone(self.state.path), "the daemon is still running")
        self.assertIn(said, self.log.getContent().decode())
        self.assertNotIn(b"Traceback", self.log.getContent())
        self.assertFalse(self.home.child("relay.pid").exists())

    async def test_unusable_files(self) -> None:
        """
        A certificate that does not exist, one that is not PEM (/etc/passwd), and
        a state directory in a directory this user cannot write: one line each,
        naming the file and what is wrong, exit status 1.
        """
        if os.geteuid() == 0:
            raise self.skipTest("root may write anywhere; the tests run as an ordinary user")
        key = self.home.child("key.pem")
        key.setContent(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key.chmod(0o600)
        locked = self.home.child("locked")
        locked.makedirs()
        locked.chmod(0o500)
        self.addCleanup(locked.chmod, 0o700)
        missing = self.home.descendant(["nowhere", "cert.pem"]).path
        listen = ["--listen", "tcp:0:interface=127.0.0.1"]
        cases = [
            (
                [*listen, "--tls-cert", missing, "--tls-key", key.path],
                [f"the TLS certificate {home_relative(missing)} (--tls-cert)", "no such file"],
            ),
            (
                [*listen, "--tls-cert", "/etc/passwd", "--tls-key", key.path],
                ["/etc/passwd", "no valid PEM certificate"],
            ),
        ]
        for argv, said in cases:
            output = await self.relay(*argv)
            self.assertEqual(output.ended.result, 1, output.err)
            self.assert_one_line(output, *said)
        state = locked.child("state").path
        output = await self.twistd("coder1-relay", *listen, "--state-dir", state)
        self.assertEqual(output.ended.result, 1, output.err)
        self.assert_one_line(
            output, f"the state directory {home_relative(state)} (--state-dir)", "permission denied"
        )

    async def test_option_errors_come_first(self) -> None:
        """
        A bad option value or an unknown option is one line on stderr, the
        problem first and a pointer to --help, exit status 2, no usage screen;
        C{twistd coder1-bridge} unpaired says so the same way.
        """
        cases = [
            (["--idle-timeout", "5"], "twistd coder1-relay: --idle-timeout must be at least 30"),
            (
                ["--public-url", "relay.example.com"],
                "twistd coder1-relay: --public-url must be an https:// URL, such as "
                "https://relay.example.com",
            ),
            (["--no-such-option"], "twistd coder1-relay: option --no-such-option not recognized"),
        ]
        for argv, said in cases:
            output = await self.relay(*argv)
            self.assertEqual(output.ended.result, 2, output.err)
            line = self.assert_one_line(output, "(see twistd coder1-relay --help)")
            self.assertTrue(line.startswith(said), line)
            self.assertEqual(output.out, b"")
        output = await self.twistd("coder1-bridge")
        self.assertEqual(output.ended.result, 2, output.err)
        self.assert_one_line(
            output, "twistd coder1-bridge: not paired yet; run: coder1-bridge pair CODE"
        )

    async def test_bridge_daemon_without_a_state_directory(self) -> None:
        """
        C{twistd coder1-bridge} as a daemon, whose state directory (for its pid file
        and log) cannot be made: one line that says which and what to do, exit status 2.
        (With no pairing in its config directory, no daemon could start anyway.)
        """
        if os.geteuid() == 0:
            raise self.skipTest("root may write anywhere; the tests run as an ordinary user")
        locked = self.home.child("locked")
        locked.makedirs()
        locked.chmod(0o500)
        self.addCleanup(locked.chmod, 0o700)
        output = _Output()
        environ = {
            **os.environ,
            "PYTHONPATH": SOURCE,
            "XDG_CONFIG_HOME": self.home.path,
            "XDG_STATE_HOME": locked.path,
        }
        argv = [TWISTD, "coder1-bridge"]
        reactor.spawnProcess(output, TWISTD, argv, env=environ, path=self.home.path)
        self.assertEqual(await output.ended, 2, output.err)
        self.assert_one_line(
            output,
            f"cannot use {locked.child('coder1-bridge').path} for the pid file and log "
            "(permission denied): set XDG_STATE_HOME to a directory you may write",
        )


class ServiceStartTests(TestCase):
    """The relay service itself, when its port is taken between the check and the listen."""

    def test_start_raises_one_line(self) -> Deferred[None]:
        """
        C{startService} raises L{CannotStart} at once (twistd then exits
        non-zero) with the endpoint and the reason, rather than running on
        without a port.
        """
        taken = _listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        relay = RelayService(
            reactor, RelaySettings(state_dir=FilePath(self.mktemp()), listen=endpoint)
        )
        error = self.assertRaises(CannotStart, relay.startService)
        self.assertEqual(
            str(error),
            f"Cannot listen on {endpoint} (--listen): port {port} is in use by another program; "
            "stop it or choose another port.",
        )
        return relay.stopService()


class ReasonTests(SynchronousTestCase):
    """The words for each way a socket cannot be had."""

    def test_socket_reasons(self) -> None:
        """In use, privileged, not on this machine: what to do; anything else: the OS's words."""
        self.assertIn("in use", socket_reason(OSError(errno.EADDRINUSE, "x"), 443, ""))
        self.assertIn("socket activation", socket_reason(OSError(errno.EACCES, "x"), 443, ""))
        self.assertIn(
            "no address 10.0.0.9", socket_reason(OSError(errno.EADDRNOTAVAIL, "x"), 1, "10.0.0.9")
        )
        self.assertEqual(
            socket_reason(OSError(errno.EMFILE, "Too many open files"), 1, ""),
            "too many open files",
        )

    def test_systemd_without_sockets(self) -> None:
        """C{systemd:} with no socket passed says to start the relay through its .socket unit."""
        error = self.assertRaises(
            CannotStart, check_endpoint, reactor, "systemd:domain=INET6:index=0", "--listen"
        )
        self.assertIn("start the relay through its .socket unit", str(error))


@implementer(ILogObserver)
@attrs.define
class _Recorder:
    """Keeps the events it is given."""

    events: list[LogEvent]

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


class LaterFailureTests(SynchronousTestCase):
    """A listener that fails after C{startService} has returned (an endpoint that listens late)."""

    def test_stops_the_relay_with_one_line(self) -> None:
        """The relay logs the one line, critical, and stops its reactor: it does not run on."""
        clock = MemoryReactorClock()
        clock.running = True
        relay = RelayService(clock, RelaySettings(state_dir=FilePath(self.mktemp())))
        events: list[LogEvent] = []
        relay.log = Logger(observer=_Recorder(events))
        relay._failed_to_listen(Failure(CannotStart("Cannot listen on x (--listen): why.")))
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in events],
            [(LogLevel.critical, "Cannot listen on x (--listen): why.")],
        )
        self.assertTrue(clock.hasStopped)
