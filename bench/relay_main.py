"""
Benchmark harness only: the relay service without its TLS layer.

The relay always speaks TLS 1.3 (C{twistd coder1-relay} offers no way out, on
purpose).  The forwarding benchmark also compares plain WebSockets, to separate what
the relay's own code costs per message from what TLS costs, so this entry point runs
the very same L{RelayService} (same site, hub, store, limits, from the same options as
C{twistd coder1-relay}) and only listens without wrapping the site in TLS (nor in
the per-address guard that goes with the TLS layer since 285d644).  Every other
benchmark runs the real C{twistd coder1-relay}.

    python -m bench.relay_main --plain [coder1-relay options]
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from coder1_relay.service import RelayService
from coder1_relay.tap import Options
from coder1_relay.web import make_site


class PlainRelay(RelayService):
    """The relay, listening for plain HTTP and WebSockets (benchmarks only)."""

    async def _listen(self) -> IListeningPort:
        endpoint = serverFromString(self.reactor, self.settings.listen)
        self.port = port = await endpoint.listen(make_site(self.context))
        if not self.context.public_url:
            self.context.public_url = f"https://localhost:{port.getHost().port}"
        sys.stdout.write(f"coder1 relay at {self.context.public_url} (no TLS: benchmark)\n")
        sys.stdout.flush()
        return port


async def _run(reactor: Any, options: Options) -> None:
    relay = PlainRelay(reactor, options.settings())
    reactor.addSystemEventTrigger("before", "shutdown", relay.stopService)
    relay.startService()
    await relay.listening
    await Deferred()


def main() -> None:
    if sys.argv[1:2] != ["--plain"]:
        raise SystemExit("usage: python -m bench.relay_main --plain [coder1-relay options]")
    options = Options()
    options.parseOptions(sys.argv[2:])
    warnings = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [warnings])],
        redirectStandardIO=False,
    )
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, options)))


if __name__ == "__main__":
    main()
