"""
C{coder1-bridge service install|uninstall|status}: the bridge as a service
that starts at login, a systemd user unit on Linux and a launchd agent on
macOS, logging where the platform keeps logs.

The service runs C{coder1-bridge --config-dir DIR start --verbose} for the
pairing of this machine, with the proxy and telemetry settings of the shell
that installed it (a user service does not inherit them), and is restarted
10 s after it fails (a relay that refused its token included: a new
pairing is picked up that way).
"""

from __future__ import annotations

import os
import plistlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import attrs
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig
from coder1_bridge.output import EXIT_FAILED, EXIT_OK, Problem

UNIT = "coder1-bridge.service"
AGENT = "dev.coder1.bridge"
#: Settings of the installing shell the service gets too.
PASSED_ON = (
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "CODER1_TELEMETRY",
)
RESTART_SECONDS = 10


def bridge_command(directory: FilePath[str], executable: str | None = None) -> list[str]:
    """The command the service runs, with absolute paths."""
    program = executable or _this_program()
    return [program, "--config-dir", directory.path, "start", "--verbose"]


def _this_program() -> str:
    given = os.path.abspath(sys.argv[0])
    if os.path.basename(given) == "coder1-bridge" and os.access(given, os.X_OK):
        return given
    found = shutil.which("coder1-bridge")
    if found is None:
        raise Problem(
            "Cannot find the coder1-bridge program to run as a service: install it (see the "
            "README), then run this again."
        )
    return os.path.abspath(found)


def passed_on(environ: Mapping[str, str]) -> dict[str, str]:
    """The installing shell's settings that the service needs too."""
    return {name: environ[name] for name in PASSED_ON if environ.get(name)}


def _systemd_word(word: str) -> str:
    """One word of a systemd command line or setting, quoted if need be, % and $ escaped."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\n\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def systemd_unit(command: Sequence[str], environment: Mapping[str, str]) -> str:
    """A systemd user unit that runs C{command} at login and restarts it when it fails."""
    lines = [
        "[Unit]",
        "Description=coder1-bridge: runs the Coder1 IDE's terminals on this machine",
        # Keep retrying (every RestartSec) however often it fails: a relay may be down for long.
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_word(w) for w in command),
        *(f"Environment={_systemd_word(f'{k}={v}')}" for k, v in sorted(environment.items())),
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launchd_agent(command: Sequence[str], environment: Mapping[str, str], log: str) -> bytes:
    """A launchd agent (plist) that runs C{command} at login and again when it fails."""
    agent: dict[str, Any] = {
        "Label": AGENT,
        "ProgramArguments": list(command),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_SECONDS,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    if environment:
        agent["EnvironmentVariables"] = dict(environment)
    return plistlib.dumps(agent)


@attrs.frozen
class Platform:
    """Where this machine keeps user services, and the commands that manage them."""

    name: str
    path: FilePath[str]
    logs: str
    enable: tuple[tuple[str, ...], ...]
    disable: tuple[tuple[str, ...], ...]
    query: tuple[str, ...]

    def content(self, command: Sequence[str], environment: Mapping[str, str]) -> bytes:
        if self.name == "systemd":
            return systemd_unit(command, environment).encode()
        return launchd_agent(command, environment, self.logs)


def platform(environ: Mapping[str, str], system: str = sys.platform) -> Platform:
    """The service manager of this machine: systemd (Linux) or launchd (macOS)."""
    home = FilePath(os.path.expanduser("~"))
    if system.startswith("linux"):
        base = environ.get("XDG_CONFIG_HOME", "")
        config = FilePath(base) if os.path.isabs(base) else home.child(".config")
        systemctl = ("systemctl", "--user")
        return Platform(
            "systemd",
            config.descendant(["systemd", "user", UNIT]),
            f"journalctl --user -u {UNIT}",
            ((*systemctl, "daemon-reload"), (*systemctl, "enable", "--now", UNIT)),
            ((*systemctl, "disable", "--now", UNIT), (*systemctl, "daemon-reload")),
            (*systemctl, "is-active", UNIT),
        )
    if system == "darwin":
        domain = f"gui/{os.getuid()}"
        path = home.descendant(["Library", "LaunchAgents", f"{AGENT}.plist"])
        return Platform(
            "launchd",
            path,
            home.descendant(["Library", "Logs", "coder1-bridge.log"]).path,
            (("launchctl", "bootstrap", domain, path.path),),
            (("launchctl", "bootout", f"{domain}/{AGENT}"),),
            ("launchctl", "print", f"{domain}/{AGENT}"),
        )
    raise Problem(
        "Running at login is supported with systemd (Linux) and launchd (macOS); on this "
        "system, start the bridge with your own service manager: coder1-bridge start."
    )


async def _run(reactor: Any, argv: Sequence[str], environ: Mapping[str, str]) -> tuple[int, str]:
    program = shutil.which(argv[0], path=environ.get("PATH"))
    if program is None:
        return 127, f"{argv[0]} was not found"
    out, err, code = await getProcessOutputAndValue(
        program, list(argv[1:]), env=dict(environ), reactor=reactor
    )
    return code, (err or out).decode(errors="replace").strip()


async def install(
    reactor: Any,
    directory: FilePath[str],
    out: TextIO,
    environ: Mapping[str, str],
    where: Platform,
) -> int:
    """Write the service's file and enable it now and at every login."""
    if BridgeConfig.saved_token(directory) is None:
        raise Problem("Pair this machine first: coder1-bridge pair CODE; then install the service.")
    content = where.content(bridge_command(directory), passed_on(environ))
    where.path.parent().makedirs(ignoreExistingDirectory=True)
    _write(where.path, content)
    out.write(f"Wrote {where.path.path}.\n")
    for step in where.enable:
        code, said = await _run(reactor, step, environ)
        if code != 0:
            raise Problem(
                f"`{' '.join(step)}` failed ({said or f'exit status {code}'}).{_hint(said)} The "
                "service file is written; fix that, then run `coder1-bridge service install` "
                "again."
            )
    out.write(
        f"The bridge now runs as a service, and starts at every login. Its log: {where.logs}\n"
    )
    if where.name == "systemd":
        out.write(
            "To keep it running while you are logged out: loginctl enable-linger "
            f"{environ.get('USER', '$USER')}\n"
        )
    return EXIT_OK


def _write(path: FilePath[str], content: bytes) -> None:
    """Write a service file, readable and not executable (systemd warns about the bit)."""
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    os.chmod(path.path, 0o644)


def _hint(said: str) -> str:
    """What a service manager's failure usually means."""
    if "Failed to connect to bus" in said:
        return (
            " This login has no systemd user manager (as over su, or ssh without a login "
            "session): log in again with a full session, or have root run "
            "`loginctl enable-linger` for your user."
        )
    return ""


async def uninstall(reactor: Any, out: TextIO, environ: Mapping[str, str], where: Platform) -> int:
    """Stop the service, disable it and remove its file."""
    if not where.path.exists():
        out.write("The bridge is not installed as a service.\n")
        return EXIT_OK
    code, said = await _run(reactor, where.disable[0], environ)
    where.path.remove()
    for step in where.disable[1:]:
        await _run(reactor, step, environ)
    if code != 0:
        out.write(f"Stopping it said: {said or f'exit status {code}'}.\n")
    out.write(f"Removed the service ({where.path.path}); it no longer starts at login.\n")
    return EXIT_OK


async def service_status(
    reactor: Any, out: TextIO, environ: Mapping[str, str], where: Platform
) -> int:
    """Whether the service is installed, and whether it runs."""
    if not where.path.exists():
        out.write("The bridge is not installed as a service: coder1-bridge service install\n")
        return EXIT_FAILED
    code, said = await _run(reactor, where.query, environ)
    state = "running" if code == 0 else f"not running ({said or f'exit status {code}'})"
    out.write(f"Installed as {where.path.path}; {state}. Its log: {where.logs}\n")
    return EXIT_OK if code == 0 else EXIT_FAILED
