"""
Tests for C{coder1-bridge telemetry}: the real program in a pseudo-terminal,
with telemetry on and off, with crash reports kept and with a bridge running.
"""

from __future__ import annotations

import secrets

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_bridge.crash_log import CRASH_LOG_NAME, CrashLog
from coder1_wire import __version__
from coder1_wire.crash import build_crash_report
from coder1_wire.e2e import Identity, b64u
from coder1_wire.envelope import Kind, control

from .loopback import settle
from .test_cli import BRIDGE_SCRIPT, Typist, _end, spawn_pty

#: What never reaches the person: a traceback, an exception's class, a repr, a log prefix.
LEAKS = ("Traceback", "Error:", "Exception", " object at 0x", "#info]", "[-]")


class TelemetryCommandTests(TestCase):
    """C{coder1-bridge telemetry}, run as a person runs it."""

    timeout = 60

    def setUp(self) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.home = FilePath(self.mktemp())
        self.home.makedirs()
        self.env = {
            "HOME": self.home.path,
            "XDG_CONFIG_HOME": self.home.child("config").path,
            "XDG_STATE_HOME": self.home.child("state").path,
            "TERM": "dumb",
        }
        self.config_dir = self.home.descendant(["config", "coder1-bridge"])

    def bridge(self, *argv: str, **env: str) -> Typist:
        """C{coder1-bridge argv} in a pseudo-terminal of its own, ended at cleanup."""
        typist = Typist()
        environ = {**self.env, **env}
        if "CODER1_TELEMETRY" not in env:
            environ["CODER1_TELEMETRY"] = ""  # as unset, whatever the environment of the tests
        process = spawn_pty(typist, [BRIDGE_SCRIPT, *argv], environ)
        self.addCleanup(lambda: _end(process, typist))
        return typist

    def assert_said_plainly(self, typist: Typist) -> None:
        for leak in LEAKS:
            self.assertNotIn(leak, typist.text)

    def keep_a_report(self, canary: str) -> bytes:
        """A crash report with C{canary} in its message, sent and kept as the bridge does."""
        try:
            raise ValueError(f"could not open /home/alice/{canary}")
        except ValueError as e:
            report = build_crash_report(e, version=__version__)
        payload = control(Kind.CRASH, dict(report)).payload
        clock = Clock()
        clock.advance(1_800_000_000)
        CrashLog(self.config_dir, clock).record(payload)
        return payload

    async def test_on_shows_what_is_sent_and_the_reports(self) -> None:
        """
        With C{CODER1_TELEMETRY} unset: telemetry is on, and why; what the relay keeps (the
        version header, connection times, crash reports); that nothing is queued; and the
        kept report exactly as sent, with its time, without the exception's message.
        Status 0, in plain sentences.
        """
        canary = "CANARY-" + secrets.token_hex(6)
        payload = self.keep_a_report(canary)
        typist = self.bridge("telemetry")
        self.assertEqual(await typist.ended, 0, typist.text)
        text = typist.text.replace("\r\n", "\n")
        self.assertIn("Telemetry is on: CODER1_TELEMETRY is not set.", text)
        self.assertIn("export CODER1_TELEMETRY=false", text)
        self.assertIn(
            f"this bridge's version ({__version__}), from the X-Coder1-Bridge-Version", text
        )
        self.assertIn("when each of its connections opened and closed", text)
        self.assertIn("Crash reports are never queued", text)
        path = self.config_dir.child(CRASH_LOG_NAME).path
        self.assertIn("The crash report this bridge sent, exactly as sent", text)
        self.assertIn(path, text)
        self.assertIn(f"Sent 2027-01-15 08:00:00 UTC:\n{payload.decode()}\n", text)
        self.assertNotIn(canary, text)
        self.assertNotIn("alice", text)
        self.assert_said_plainly(typist)

    async def test_off_says_so_and_names_the_variable(self) -> None:
        """
        With C{CODER1_TELEMETRY=off}: telemetry is off, naming the variable and its value;
        the bridge tells the relay so and makes no crash report; none was sent. One sent
        before, while telemetry was on, is shown as such.
        """
        typist = self.bridge("telemetry", CODER1_TELEMETRY="off")
        self.assertEqual(await typist.ended, 0, typist.text)
        text = typist.text.replace("\r\n", "\n")
        self.assertIn("Telemetry is off: CODER1_TELEMETRY=off is in effect in this shell.", text)
        self.assertIn("X-Coder1-Telemetry: off", text)
        self.assertIn("makes no crash report, so none is sent or kept", text)
        self.assertIn("This bridge has sent no crash report", text)
        self.assertNotIn("X-Coder1-Bridge-Version", text)
        self.assertFalse(self.config_dir.child(CRASH_LOG_NAME).exists())
        self.assert_said_plainly(typist)
        payload = self.keep_a_report("earlier")
        again = self.bridge("telemetry", CODER1_TELEMETRY="off")
        self.assertEqual(await again.ended, 0, again.text)
        self.assertIn("The crash report this bridge sent while telemetry was on", again.text)
        self.assertIn(payload.decode(), again.text)

    async def test_running_bridge_setting_differs(self) -> None:
        """
        A bridge started with telemetry on is running; C{telemetry} from a shell with
        C{CODER1_TELEMETRY=false} says this shell's setting is off, and that the running
        bridge (by its pid) still has it on until restarted.
        """
        BridgeConfig(
            RelayAddress("https://localhost:1"),
            "tok",
            1,
            b64u(Identity.generate().public_raw),
            Identity.generate(),
            "box",
        ).save(self.config_dir)
        running = self.bridge("start")
        await running.shown(r"retrying in")
        typist = self.bridge("telemetry", CODER1_TELEMETRY="false")
        self.assertEqual(await typist.ended, 0, typist.text)
        text = typist.text.replace("\r\n", " ").replace("\n", " ")
        self.assertIn("Telemetry is off: CODER1_TELEMETRY=false is in effect", text)
        self.assertRegex(
            text,
            r"The bridge running for this pairing \(pid \d+\) has telemetry on, as set where "
            r"it was started; restart it",
        )
        self.assert_said_plainly(typist)
        running.type("\x03")
        self.assertEqual(await running.ended, 0)
