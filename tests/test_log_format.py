"""
Tests for C{--log-format json} (L{coder1_wire.log_format}): the line an event
becomes, the options, and a real C{twistd coder1-relay} logging in JSON while a
bridge pairs and runs a command, with no content on any line.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_relay.certs import DEV_CERT_NAME
from coder1_relay.tap import Options
from coder1_wire.e2e import Identity, b64u
from coder1_wire.envelope import Kind
from coder1_wire.log_format import event_as_json

from .loopback import (
    SOURCE,
    Browser,
    Child,
    ChildRelay,
    _Context,
    _Keys,
    _Port,
    pair_bridge,
    reactor,
    settle,
    start_bridge,
    stop_all,
)
from .test_cli import TWISTD, _read, _stop_daemon

#: The keys every JSON line has.
REQUIRED = {"time", "level", "namespace", "system", "text"}


def logged(emit: Any) -> LogEvent:
    """The event C{emit(log)} logs through a L{Logger}."""
    events: list[LogEvent] = []
    emit(Logger(namespace="coder1_relay.test", observer=cast(ILogObserver, events.append)))
    [event] = events
    return event


class EventAsJsonTests(SynchronousTestCase):
    """An event becomes one line of JSON with what the text log shows, nothing more."""

    def test_required_keys(self) -> None:
        """A line has the time (ISO 8601, UTC), level, namespace, system and formatted text."""
        event = logged(lambda log: log.warn("refusing {n} connections", n=3))
        line = event_as_json(event)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        parsed = json.loads(line)
        self.assertEqual(set(parsed), REQUIRED)
        self.assertEqual(parsed["text"], "refusing 3 connections")
        self.assertEqual(parsed["level"], "warn")
        self.assertEqual(parsed["namespace"], "coder1_relay.test")
        self.assertEqual(parsed["system"], "-")
        self.assertTrue(parsed["time"].endswith("Z"), parsed["time"])
        when = datetime.fromisoformat(parsed["time"].replace("Z", "+00:00"))
        self.assertLess(abs(when.timestamp() - event["log_time"]), 0.001)

    def test_fields_the_text_does_not_print_are_left_out(self) -> None:
        """
        Fields of the event that its message does not print (a label, a session
        id) are not on the line; an allowed count is, as a number.
        """
        event = logged(
            lambda log: log.info(
                "a bridge connected ({count} open)",
                count=2,
                label="LABEL-secret",
                session="SESSION-secret",
                running=["CMD-secret"],
            )
        )
        line = event_as_json(event)
        for secret in ("LABEL-secret", "SESSION-secret", "CMD-secret"):
            self.assertNotIn(secret, line)
        parsed = json.loads(line)
        self.assertEqual(parsed["count"], 2)
        self.assertNotIn("running", parsed)

    def test_allowed_field_with_text_is_left_out(self) -> None:
        """An allowed field that holds a string, not a number, is left out."""
        event = logged(lambda log: log.info("hello", count="COUNT-secret", seconds=True))
        line = event_as_json(event)
        self.assertNotIn("COUNT-secret", line)
        self.assertEqual(set(json.loads(line)), REQUIRED)

    def test_failure_has_its_traceback(self) -> None:
        """A failure logs its message as text and its traceback under C{traceback}."""

        def fail(log: Logger) -> None:
            try:
                1 / 0  # noqa: B018
            except ZeroDivisionError:
                log.failure("routing a frame failed")

        parsed = json.loads(event_as_json(logged(fail)))
        self.assertEqual(parsed["text"], "routing a frame failed")
        self.assertEqual(parsed["level"], "critical")
        self.assertIn("ZeroDivisionError", parsed["traceback"])


class OptionTests(SynchronousTestCase):
    """C{--log-format} takes text or json, and json only where twistd can write it."""

    def parse(self, *argv: str) -> ServerOptions:
        options = ServerOptions()
        options.parseOptions(list(argv))
        return options

    def test_default_is_text(self) -> None:
        """Without the option the relay logs as before, in text."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["log-format"], "text")

    def test_unknown_format_refused(self) -> None:
        """A format other than text or json is refused with one line naming both."""
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--log-format", "xml"])
        self.assertEqual(str(error), "--log-format must be text or json, not 'xml'")

    def refused(self, *argv: str) -> str:
        """What twistd says, on stderr, when it refuses C{argv} (one line, exit status 2)."""
        said = io.StringIO()
        self.patch(sys, "stderr", said)
        error = self.assertRaises(SystemExit, self.parse, *argv)
        self.assertEqual(error.code, 2)
        self.assertEqual(said.getvalue().count("\n"), 1)
        return said.getvalue()

    def test_json_refused_with_syslog_or_logger(self) -> None:
        """JSON goes to twistd's log file or standard output, not to syslog or a --logger."""
        for twistd in (["--syslog"], ["--logger", "twisted.logger.textFileLogObserver"]):
            said = self.refused(*twistd, "coder1-relay", "--log-format", "json")
            self.assertIn("--log-format json writes to twistd's --logfile", said)

    def test_json_daemon_to_stdout_refused(self) -> None:
        """A daemon cannot log to standard output, as twistd itself says."""
        said = self.refused("--logfile=-", "coder1-relay", "--log-format=json")
        self.assertIn("give --logfile or -n", said)


def spawn_twistd(*argv: str, env: dict[str, str] | None = None) -> Child:
    """C{twistd ARGV} with this repository on its path."""
    child = Child()
    env = {**os.environ, "PYTHONPATH": SOURCE, **(env or {})}
    reactor.spawnProcess(child, TWISTD, [TWISTD, *argv], env=env, path=os.getcwd())
    return child


def relay_in(child: Child, found: re.Match[bytes], state: FilePath[str]) -> ChildRelay:
    """The relay C{child} runs, from its "coder1 relay at" line and its state directory."""
    return ChildRelay(
        child,
        _Context(found.group(1).decode()),
        _Keys(state.child(DEV_CERT_NAME).getContent()),
        _Port(int(found.group(2))),
    )


async def until(condition: Callable[[], bool], log: FilePath[str]) -> None:
    """Wait for C{condition}; fail with the daemon's log if it has not come in 60 s."""
    for _ in range(1200):
        if condition():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(_read(log).decode(errors="replace"))


def json_lines(output: bytes) -> list[dict[str, Any]]:
    """Each line of C{output} as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in output.decode().splitlines()]


class TwistdJsonTests(TestCase):
    """A real C{twistd coder1-relay --log-format json}, used as a person uses it."""

    timeout = 120

    async def test_relay_logs_json_without_content(self) -> None:
        """
        A relay under twistd with C{--log-format json}: a browser pairs a bridge, which
        runs a command printing a canary; the relay stops. Every line it wrote, from
        twistd's "starting up" to "Server Shut Down.", is JSON with the required keys,
        and no line holds the canary, the command, the bridge's label or token, or the
        browser session's cookie.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        state = FilePath(self.mktemp())
        relay = spawn_twistd(
            "-n",
            "--pidfile=",
            "coder1-relay",
            "--log-format=json",
            "--listen=tcp:0:interface=127.0.0.1",
            "--node-listen=tcp:0:interface=127.0.0.1",
            f"--state-dir={state.path}",
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.stop()))
        found = await relay.wait_for(rb"coder1 relay at (https://localhost:(\d+))")
        browser = Browser(relay_in(relay, found, state).as_service())
        await browser.open_page()
        label = "LABEL-" + secrets.token_hex(6)
        config = await pair_bridge(browser, FilePath(self.mktemp()), io.StringIO(), label)
        bridge = await start_bridge(config, label=label)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = await browser.connect_ide()
        self.addCleanup(ide.close)
        await ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
        canary = "CANARY-" + secrets.token_hex(8)
        command = f"echo {canary}; echo {canary} >&2"
        result = await ide.run(1, {"shell": command})
        self.assertIn(canary.encode(), result.stdout)

        await stop_all(bridge)
        await ide.close()
        await relay.stop()
        lines = json_lines(relay.output)
        texts = [line["text"] for line in lines]
        self.assertIn("Server Shut Down.", texts)
        self.assertTrue(any(text.startswith("twistd ") for text in texts), texts)
        self.assertTrue(any("POST /api/pairing-codes" in text for text in texts), texts)
        for line in lines:
            self.assertLessEqual(REQUIRED, set(line), line)
        secrets_ = [canary, command, label, config.token, *(c.value for c in browser.cookies)]
        for secret in secrets_:
            assert secret is not None
            self.assertNotIn(secret.encode(), relay.output)

    async def test_daemon_logs_json_to_its_logfile(self) -> None:
        """
        Daemonized with C{--logfile}, the relay writes JSON lines to that file, and
        nothing to standard output; TERM stops it, and its last line is twistd's.
        """
        state = FilePath(self.mktemp())
        state.makedirs()
        log, pidfile = state.child("relay.log"), state.child("relay.pid")
        daemon = spawn_twistd(
            f"--logfile={log.path}",
            f"--pidfile={pidfile.path}",
            "coder1-relay",
            "--log-format",
            "json",
            "--listen=tcp:0:interface=127.0.0.1",
            "--node-listen=tcp:0:interface=127.0.0.1",
            f"--state-dir={state.path}",
        )
        self.addCleanup(_stop_daemon, pidfile)
        await daemon.ended
        self.assertEqual(daemon.output, b"")
        await until(lambda: os.path.exists(pidfile.path) and b"coder1 relay at" in _read(log), log)
        # A page load answered: the reactor runs, so twistd's TERM handler is in place.
        found = re.search(rb"coder1 relay at (https://localhost:(\d+))", log.getContent())
        assert found is not None
        await Browser(relay_in(daemon, found, state).as_service()).open_page()
        os.kill(int(pidfile.getContent()), signal.SIGTERM)
        await until(lambda: not os.path.exists(pidfile.path), log)
        lines = json_lines(log.getContent())
        self.assertEqual(lines[-1]["text"], "Server Shut Down.")
        for line in lines:
            self.assertLessEqual(REQUIRED, set(line), line)

    async def test_bridge_logs_json(self) -> None:
        """
        C{twistd -n coder1-bridge --log-format json} with its relay unreachable logs
        JSON lines, among them why it retries; its token is on no line.
        """
        home = FilePath(self.mktemp())
        label = "LABEL-" + secrets.token_hex(6)
        config = BridgeConfig(
            RelayAddress("https://localhost:1"),
            "TOKEN-" + secrets.token_hex(6),
            1,
            b64u(Identity.generate().public_raw),
            Identity.generate(),
            label,
        )
        config.save(home.descendant(["config", "coder1-bridge"]))
        bridge = spawn_twistd(
            "-n",
            "--pidfile=",
            "coder1-bridge",
            "--log-format=json",
            env={"HOME": home.path, "XDG_CONFIG_HOME": home.child("config").path},
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(bridge.stop()))
        await bridge.wait_for(rb"retrying in")
        await bridge.stop()
        lines = json_lines(bridge.output)
        self.assertEqual(lines[-1]["text"], "Server Shut Down.")
        self.assertTrue(any("Nothing accepts connections" in line["text"] for line in lines))
        for line in lines:
            self.assertLessEqual(REQUIRED, set(line), line)
        self.assertNotIn(config.token.encode(), bridge.output)
