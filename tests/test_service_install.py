"""
Tests for L{coder1_bridge.service_install}: the systemd unit and launchd agent
it writes, C{coder1-bridge service install|status|uninstall} with a recording
C{systemctl}, and for real with the user's systemd where there is one.
"""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from coder1_bridge import cli, service_install
from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_bridge.output import Problem
from coder1_wire.e2e import Identity, b64u

from .loopback import reactor

BRIDGE = os.path.join(os.path.dirname(sys.executable), "coder1-bridge")
#: A systemctl that records its arguments, one call a line, and says the unit is active.
RECORDING_SYSTEMCTL = """#!/bin/sh
echo "$@" >> "$0.calls"
case "$*" in *is-active*) echo active ;; esac
"""


def paired(directory: FilePath[str]) -> BridgeConfig:
    """A saved pairing (with a relay that need not exist), as C{pair} leaves one."""
    browser = b64u(Identity.generate().public_raw)
    config = BridgeConfig(
        RelayAddress("https://relay.example.com"), "tok", 1, browser, Identity.generate(), "box"
    )
    config.save(directory)
    return config


class UnitContentTests(SynchronousTestCase):
    """What the service runs, and the files that say so."""

    def test_systemd_unit(self) -> None:
        """
        The unit runs C{coder1-bridge --config-dir DIR start --verbose} (absolute paths,
        quoted and escaped for systemd), with the installing shell's proxy and telemetry
        settings, restarts 10 s after a failure for as long as it takes, and is wanted by
        the user's default target (so it starts at login).
        """
        command = service_install.bridge_command(
            FilePath("/home/a b/100%/coder1-bridge"), "/opt/venv/bin/coder1-bridge"
        )
        unit = service_install.systemd_unit(
            command, {"HTTPS_PROXY": "http://proxy:3128", "CODER1_TELEMETRY": "false"}
        )
        self.assertEqual(
            unit,
            "[Unit]\n"
            "Description=coder1-bridge: runs the Coder1 IDE's terminals on this machine\n"
            "StartLimitIntervalSec=0\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            'ExecStart=/opt/venv/bin/coder1-bridge --config-dir "/home/a b/100%%/coder1-bridge"'
            " start --verbose\n"
            "Environment=CODER1_TELEMETRY=false\n"
            "Environment=HTTPS_PROXY=http://proxy:3128\n"
            "Restart=on-failure\n"
            "RestartSec=10\n"
            "\n"
            "[Install]\n"
            "WantedBy=default.target\n",
        )

    def test_launchd_agent(self) -> None:
        """The agent runs the same command at load, again after a failure, logging to a file."""
        command = service_install.bridge_command(FilePath("/Users/a/cfg"), "/usr/local/bin/c")
        agent = plistlib.loads(
            service_install.launchd_agent(command, {"NO_PROXY": "corp"}, "/Users/a/log")
        )
        self.assertEqual(
            agent,
            {
                "Label": "dev.coder1.bridge",
                "ProgramArguments": [
                    "/usr/local/bin/c",
                    "--config-dir",
                    "/Users/a/cfg",
                    "start",
                    "--verbose",
                ],
                "RunAtLoad": True,
                "KeepAlive": {"SuccessfulExit": False},
                "ThrottleInterval": 10,
                "StandardOutPath": "/Users/a/log",
                "StandardErrorPath": "/Users/a/log",
                "EnvironmentVariables": {"NO_PROXY": "corp"},
            },
        )

    def test_settings_passed_on(self) -> None:
        """Only the proxy and telemetry settings of the installing shell are passed on."""
        environ = {"HTTPS_PROXY": "http://p:1", "no_proxy": "x", "PATH": "/bin", "TOKEN": "s"}
        self.assertEqual(
            service_install.passed_on(environ), {"HTTPS_PROXY": "http://p:1", "no_proxy": "x"}
        )

    def test_platforms(self) -> None:
        """
        systemd's user units under XDG_CONFIG_HOME on Linux, logs in the journal; launchd's
        agents on macOS, logs in ~/Library/Logs; elsewhere a sentence saying what to do.
        """
        linux = service_install.platform({"XDG_CONFIG_HOME": "/cfg"}, "linux")
        self.assertEqual(linux.path.path, "/cfg/systemd/user/coder1-bridge.service")
        self.assertEqual(linux.logs, "journalctl --user -u coder1-bridge.service")
        mac = service_install.platform({}, "darwin")
        self.assertTrue(mac.path.path.endswith("/Library/LaunchAgents/dev.coder1.bridge.plist"))
        self.assertEqual(mac.enable[0][:2], ("launchctl", "bootstrap"))
        error = self.assertRaises(Problem, service_install.platform, {}, "win32")
        self.assertIn("coder1-bridge start", str(error))


class InstallTests(TestCase):
    """C{coder1-bridge service ...} as a person runs it, with a systemctl that records calls."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("the recording systemctl stands for systemd, on Linux")
        self.home = FilePath(self.mktemp())
        self.config_dir = self.home.child("pairing")
        tools = self.home.child("bin")
        tools.makedirs()
        self.systemctl = tools.child("systemctl")
        self.systemctl.setContent(RECORDING_SYSTEMCTL.encode())
        self.systemctl.chmod(0o755)
        self.environ = {
            "PATH": f"{tools.path}:{os.environ['PATH']}",
            "XDG_CONFIG_HOME": self.home.child("config").path,
            "HTTPS_PROXY": "http://proxy:3128",
            "USER": "someone",
        }
        self.unit = self.home.descendant(["config", "systemd", "user", "coder1-bridge.service"])

    async def cli(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = await cli.run(
            ["--config-dir", self.config_dir.path, *argv],
            reactor=reactor,
            out=out,
            environ=self.environ,
        )
        return code, out.getvalue()

    def calls(self) -> list[str]:
        calls = self.systemctl.sibling("systemctl.calls")
        return calls.getContent().decode().splitlines() if calls.exists() else []

    async def test_install_status_uninstall(self) -> None:
        """
        C{install} refuses an unpaired machine; once paired it writes the unit, reloads
        systemd and enables and starts the unit, and says where its log is; C{status} says
        it runs; C{uninstall} disables and stops it, removes the unit and reloads systemd.
        """
        status, out = await self.cli("service", "install")
        self.assertEqual(status, 1)
        self.assertIn("Pair this machine first", out)
        self.assertFalse(self.unit.exists())

        paired(self.config_dir)
        status, out = await self.cli("service", "install")
        self.assertEqual(status, 0, out)
        unit = self.unit.getContent().decode()
        self.assertEqual(self.unit.getPermissions().shorthand(), "rw-r--r--")
        self.assertIn(f"--config-dir {self.config_dir.path} start --verbose\n", unit)
        self.assertIn("Environment=HTTPS_PROXY=http://proxy:3128\n", unit)
        self.assertEqual(
            self.calls(), ["--user daemon-reload", "--user enable --now coder1-bridge.service"]
        )
        self.assertIn("Its log: journalctl --user -u coder1-bridge.service", out)
        self.assertIn("loginctl enable-linger someone", out)

        status, out = await self.cli("service", "status")
        self.assertEqual(status, 0, out)
        self.assertIn(f"Installed as {self.unit.path}; running.", out)

        status, out = await self.cli("service", "uninstall")
        self.assertEqual(status, 0, out)
        self.assertFalse(os.path.exists(self.unit.path))
        self.assertEqual(
            self.calls()[-3:],
            [
                "--user is-active coder1-bridge.service",
                "--user disable --now coder1-bridge.service",
                "--user daemon-reload",
            ],
        )
        status, out = await self.cli("service", "status")
        self.assertEqual(status, 1)
        self.assertIn("not installed as a service", out)

    async def test_a_failing_systemctl_is_said(self) -> None:
        """When systemctl fails, install says which step and what it said, and how to retry."""
        paired(self.config_dir)
        self.systemctl.setContent(b"#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
        status, out = await self.cli("service", "install")
        self.assertEqual(status, 1)
        self.assertIn("`systemctl --user daemon-reload` failed (Failed to connect to bus).", out)
        self.assertIn("This login has no systemd user manager", out)
        self.assertIn(
            "The service file is written; fix that, then run `coder1-bridge service install` "
            "again.",
            out,
        )


class RealSystemdTests(TestCase):
    """The unit installed for real, where this user has a systemd user manager."""

    timeout = 60

    def setUp(self) -> None:
        systemctl = shutil.which("systemctl")
        if systemctl is None or not sys.platform.startswith("linux"):
            raise SkipTest("no systemctl on this machine")
        probe = subprocess.run(
            [systemctl, "--user", "is-system-running"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0 and probe.stdout.strip() not in ("degraded", "starting"):
            said = (probe.stdout + probe.stderr).strip()
            raise SkipTest(f"no systemd user manager for this user (is-system-running: {said})")

    async def test_installed_unit_runs(self) -> None:
        """
        C{service install} with the real systemd starts the bridge (active), C{status} says
        it runs, and C{uninstall} stops it and removes the unit.
        """
        directory = FilePath(self.mktemp())
        paired(directory)
        environ = dict(os.environ)
        run = ["--config-dir", directory.path, "service"]

        async def step(action: str) -> tuple[int, str]:
            out = io.StringIO()
            code = await cli.run([*run, action], reactor=reactor, out=out, environ=environ)
            return code, out.getvalue()

        self.addCleanup(lambda: Deferred.fromCoroutine(step("uninstall")))
        self.assertEqual((await step("install"))[0], 0)
        code, out = await step("status")
        self.assertEqual(code, 0, out)
        self.assertIn("running", out)
        code, out = await step("uninstall")
        self.assertEqual(code, 0, out)
        self.assertIn("no longer starts at login", out)
