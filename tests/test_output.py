"""
Tests for what the bridge says to a person: L{coder1_bridge.output}'s
observers, L{coder1_bridge.reconnect}'s retry lines and backoff, and where
the status socket goes.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from coder1_bridge.config import RelayAddress
from coder1_bridge.output import INTERNAL, ForegroundObserver, detailed_observer
from coder1_bridge.reconnect import PROMPT_WINDOW, Reconnect
from coder1_bridge.relay_errors import Where, WitnessedTLS
from coder1_bridge.status_socket import MAX_SOCKET_PATH, socket_path
from coder1_wire import closecodes
from coder1_wire.tls import client_tls_options


def logged(observer: object) -> Logger:
    publisher = LogPublisher(observer)  # type: ignore[arg-type]
    return Logger(namespace="coder1_bridge.test", observer=publisher)


class ForegroundTests(SynchronousTestCase):
    """The foreground shows the sentences meant for people, and nothing else."""

    def test_person_lines_only(self) -> None:
        """An event with a sentence for the person shows it, formatted; others show nothing."""
        out = io.StringIO()
        log = logged(ForegroundObserver(out))
        log.info("Starting factory {factory!r}", factory=object())
        log.info("connected", host="relay.example.com", person="Connected to {host}")
        log.warn("ignored a malformed frame")
        self.assertEqual(out.getvalue(), "Connected to relay.example.com\n")

    def test_failures_said_once(self) -> None:
        """A failure shows one sentence (never its traceback), once however many follow."""
        out = io.StringIO()
        log = logged(ForegroundObserver(out))
        for _ in range(3):
            try:
                1 / 0  # noqa: B018
            except ZeroDivisionError:
                log.failure("handling a frame failed")
        self.assertEqual(out.getvalue(), INTERNAL + "\n")
        self.assertNotIn("ZeroDivision", out.getvalue())

    def test_verbose(self) -> None:
        """--verbose shows every event with a timestamp; into the journal, without one."""
        out = io.StringIO()
        logged(detailed_observer(out, {})).info("detail {n}", n=1)
        self.assertRegex(out.getvalue(), r"^\d{4}-\d\d-\d\dT\S+ \[coder1_bridge\.test#info\] ")
        out = io.StringIO()
        logged(detailed_observer(out, {"JOURNAL_STREAM": "8:1"})).info("detail {n}", n=1)
        self.assertEqual(out.getvalue(), "[coder1_bridge.test] detail 1\n")


class ReconnectTests(SynchronousTestCase):
    """The bridge's retry policy: its backoff and its words."""

    def reconnect(self, out: io.StringIO) -> Reconnect:
        where = Where(RelayAddress("https://relay.example.com:8443"))
        policy = Reconnect(Clock(), where, WitnessedTLS(client_tls_options("x", None)))
        policy.log = logged(ForegroundObserver(out))
        return policy

    def test_backoff_counts_until_a_websocket_opens(self) -> None:
        """
        The delay grows with each failure whatever ClientService counts (it starts again at
        1 for every TCP connection, which a relay refusing TLS makes every time), up to 30 s
        plus jitter, and starts over once a WebSocket has opened.
        """
        policy = self.reconnect(io.StringIO())
        delays = []
        for _ in range(12):
            policy.failed(Failure(ConnectionRefusedError()))
            delays.append(policy.delay(1))
        self.assertLess(delays[0], 2)
        self.assertGreater(delays[8], 10)
        self.assertTrue(all(30 <= d <= 31 for d in delays[10:]), delays)
        policy.opened()
        self.assertLess(policy.delay(1), 2)

    def test_what_is_said(self) -> None:
        """
        A failure is explained once, in full, then said in short while it stays the same;
        a connection lost after it had opened is said as such.
        """
        out = io.StringIO()
        policy = self.reconnect(out)
        for _ in range(2):
            policy.failed(Failure(ConnectionRefusedError()))
            policy.delay(1)
        policy.opened()
        policy.delay(1)
        said = out.getvalue().splitlines()
        self.assertRegex(
            said[0],
            r"^Nothing accepts connections at relay\.example\.com:8443: is the relay running, "
            r"and is the port in --relay right\? Retrying in \d+ s\.$",
        )
        self.assertRegex(said[1], r"^Relay still unreachable, retrying in \d+ s\.$")
        self.assertRegex(said[2], r"^Lost the connection to the relay\. Retrying in \d+ s\.$")

    def test_going_away_reconnects_at_once(self) -> None:
        """
        After a 1001 close (the relay is stopping) attempts come 0.1 to 1 s
        apart, however many fail, said once; once the window has passed, the
        usual backoff starts from its first step.  Other closes get the backoff.
        """
        out = io.StringIO()
        policy = self.reconnect(out)
        policy.initial_delay = 60.0
        policy.max_delay = 600.0
        clock = policy.clock
        for draw, expected in ((0.0, 0.1), (1.0, 1.0)):
            policy.uniform = itertools.repeat(draw).__next__
            policy.opened()
            policy.closed(closecodes.GOING_AWAY)
            self.assertAlmostEqual(policy.delay(1), expected)
        policy.uniform = itertools.repeat(0.5).__next__
        delays = []
        while clock.seconds() < PROMPT_WINDOW:
            policy.failed(Failure(ConnectionRefusedError()))
            delays.append(policy.delay(1))
            clock.advance(delays[-1])
        self.assertEqual(set(delays), {0.55})
        policy.failed(Failure(ConnectionRefusedError()))
        self.assertTrue(90 <= policy.delay(1) <= 91)
        self.assertEqual(out.getvalue().count("The relay is restarting; reconnecting."), 2)
        for code in (closecodes.NORMAL, closecodes.HEARTBEAT_TIMEOUT, None):
            policy.opened()
            policy.closed(code)
            self.assertGreaterEqual(policy.delay(1), 90)

    def test_node_gone_reconnects_at_once(self) -> None:
        """A 4012 close (the relay node holding the session went away) is prompt too."""
        policy = self.reconnect(io.StringIO())
        policy.initial_delay = 60.0
        policy.opened()
        policy.closed(closecodes.NODE_GONE)
        self.assertLessEqual(policy.delay(1), 1.0)


class SocketPathTests(SynchronousTestCase):
    """Where the running bridge's status socket is."""

    def test_in_the_pairing_directory(self) -> None:
        """Next to the pairing, when the path fits a socket address."""
        directory = FilePath("/home/someone/.config/coder1-bridge")
        self.assertEqual(socket_path(directory), directory.child("bridge.sock"))

    def test_long_paths(self) -> None:
        """
        A pairing directory too deep for a socket address gets one named after it in a
        private directory of the user's (mode 0700), the same every time.
        """
        directory = FilePath("/" + "d" * MAX_SOCKET_PATH)
        path = socket_path(directory)
        self.assertEqual(path, socket_path(directory))
        self.assertLessEqual(len(path.path), MAX_SOCKET_PATH)
        parent = path.parent()
        self.assertEqual(parent.parent().path, tempfile.gettempdir())
        self.assertEqual(parent.basename(), f"coder1-bridge-{os.getuid()}")
        self.assertEqual(parent.getPermissions().shorthand(), "rwx------")
        self.assertNotEqual(path, socket_path(FilePath("/" + "e" * MAX_SOCKET_PATH)))
