"""
C{twistd coder1-bridge}: the same services as C{coder1-bridge start}.

Unless told otherwise (C{--pidfile}, C{--logfile}), twistd keeps its pid
file and log in the bridge's state directory, C{$XDG_STATE_HOME/coder1-bridge}
(C{~/.local/state/coder1-bridge}), not in the directory it was started from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService
from twisted.python import usage
from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig, StalePairingError, config_dir, refuse_root
from coder1_bridge.foreground import bridge_services
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.service import default_label
from coder1_wire.log_format import check_log_format, logging_as_chosen
from coder1_wire.secretfile import InsecureFileError
from coder1_wire.twistd_errors import OneLineUsageErrors

#: twistd's own defaults, which would put these files in the current directory.
TWISTD_PIDFILE = "twistd.pid"


def state_dir(environ: Mapping[str, str] = os.environ) -> FilePath[str]:
    """C{$XDG_STATE_HOME/coder1-bridge}, or C{~/.local/state/coder1-bridge}."""
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative value
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return FilePath(base).child("coder1-bridge")


class Options(OneLineUsageErrors):
    """Options for a bridge paired beforehand with C{coder1-bridge pair}."""

    command = "twistd coder1-bridge"
    synopsis = "[options]"
    longdesc = (
        "Connects out to the relay this machine is paired with and runs the IDE's commands "
        "as the current user. Pair first with: coder1-bridge pair CODE. "
        "CODER1_TELEMETRY=false turns telemetry off."
    )
    optParameters = [
        ["config-dir", "c", None, "Where the pairing is kept (default: XDG config dir)."],
        ["label", None, None, "Name shown in the IDE (default: host name)."],
        [
            "replay-buffer",
            None,
            ReplaySettings().capacity,
            "Bytes of output kept per command or terminal for a page that comes back.",
            int,
        ],
        [
            "send-window",
            None,
            ReplaySettings().window,
            "Bytes of one stream in flight to one browser tab.",
            int,
        ],
        [
            "grace-period",
            None,
            ReplaySettings().grace,
            "Seconds without any browser tab before processes are stopped (0: never).",
            float,
        ],
        ["log-format", None, "text", "twistd's log as text, or json: one JSON object a line."],
    ]

    def postOptions(self) -> None:
        refuse_root(os.geteuid())
        self._keep_files_in_state_dir()
        check_log_format(self)
        directory = FilePath(self["config-dir"]) if self["config-dir"] else config_dir()
        self["directory"] = directory
        try:
            config = BridgeConfig.load(directory)
        except (InsecureFileError, StalePairingError) as e:
            raise usage.UsageError(str(e)) from None
        if config is None:
            raise usage.UsageError("not paired yet; run: coder1-bridge pair CODE")
        self["config"] = config
        try:
            self["replay"] = ReplaySettings(
                self["replay-buffer"], self["send-window"], self["grace-period"]
            )
        except ValueError as e:
            raise usage.UsageError(f"bad replay option: {e}") from None

    def _keep_files_in_state_dir(self) -> None:
        """twistd's pid file and log go to the state directory, unless given."""
        twistd: Any = getattr(self, "parent", None)
        if twistd is None:
            return
        pid = twistd.get("pidfile") == TWISTD_PIDFILE
        log = not (twistd.get("logfile") or twistd.get("nodaemon") or twistd.get("syslog"))
        if not (pid or log):
            return
        directory = state_dir()
        try:
            directory.makedirs(ignoreExistingDirectory=True)
            directory.chmod(0o700)
        except OSError as e:
            raise usage.UsageError(
                f"cannot use {directory.path} for the pid file and log "
                f"({(e.strerror or str(e)).lower()}): set XDG_STATE_HOME to a directory you "
                "may write, or give --pidfile and --logfile"
            ) from None
        if pid:
            twistd["pidfile"] = directory.child("bridge.pid").path
        if log:
            twistd["logfile"] = directory.child("bridge.log").path


def makeService(options: Options) -> IService:
    """The bridge and its status socket for C{twistd coder1-bridge} (root refused already)."""
    from twisted.internet import reactor

    reactor_: Any = reactor
    config: BridgeConfig = options["config"]
    services, bridge = bridge_services(
        reactor_,
        options["directory"],
        config,
        options["label"] or config.label or default_label(),
        options["replay"],
        os.environ,
    )
    bridge.refused.addCallback(lambda _: reactor_.stop())
    return logging_as_chosen(options, services)
