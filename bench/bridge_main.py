"""
Benchmark harness only: run the bridge service from a saved pairing, as root too.

``coder1-bridge start`` refuses to run as root (the bridge runs the IDE's commands with
its user's rights).  The benchmarks run wherever they are started, root included, so
this entry point starts the very same L{BridgeService} from a pairing directory the
benchmark wrote, with telemetry off, and prints ``bench-bridge ready`` once it is
connected to the relay.  It is not a way to run a bridge for real.

    python -m bench.bridge_main CONFIG_DIR
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig
from coder1_bridge.service import BridgeService


async def _run(reactor: Any, config_dir: str) -> None:
    config = BridgeConfig.load(FilePath(config_dir))
    if config is None:
        raise SystemExit(f"no pairing in {config_dir}")
    bridge = BridgeService(reactor, config, telemetry=False, label="bench")
    reactor.addSystemEventTrigger("before", "shutdown", bridge.stopService)
    bridge.startService()
    await bridge.when_connected()
    sys.stdout.write("bench-bridge ready\n")
    sys.stdout.flush()
    await Deferred()  # until SIGTERM stops the reactor


def main() -> None:
    warnings = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [warnings])],
        redirectStandardIO=False,
    )
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, sys.argv[1])))


if __name__ == "__main__":
    main()
