"""C{twistd coder1-bridge}: the same service as C{coder1-bridge start}."""

from __future__ import annotations

import os
from typing import Any

from twisted.python import usage
from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig, StalePairingError, config_dir, refuse_root
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.service import BridgeService, default_label
from coder1_wire.crash import telemetry_enabled
from coder1_wire.secretfile import InsecureFileError


class Options(usage.Options):
    """Options for a bridge paired beforehand with C{coder1-bridge pair}."""

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
    ]

    def postOptions(self) -> None:
        refuse_root(os.geteuid())
        directory = FilePath(self["config-dir"]) if self["config-dir"] else config_dir()
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


def makeService(options: Options) -> BridgeService:
    """The bridge service for C{twistd coder1-bridge} (Options refused root already)."""
    from twisted.internet import reactor

    reactor_: Any = reactor
    service = BridgeService(
        reactor_,
        options["config"],
        telemetry=telemetry_enabled(os.environ),
        label=options["label"] or default_label(),
        replay=options["replay"],
    )
    service.refused.addCallback(lambda _: reactor_.stop())
    return service
