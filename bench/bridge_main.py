"""
Benchmark harness only: run the bridge service from a saved pairing, as root too.

``coder1-bridge start`` refuses to run as root (the bridge runs the IDE's commands with
its user's rights).  The benchmarks run wherever they are started, root included, so
this entry point starts the very same L{BridgeService} from a pairing directory the
benchmark wrote, with telemetry off, and prints ``bench-bridge ready`` once it is
connected to the relay.  It is not a way to run a bridge for real.

    python -m bench.bridge_main CONFIG_DIR

With C{CODER1_BENCH_STAGES=FILE} in its environment (the keystroke benchmark's
C{--stages} pass, never its timed rounds), it also wraps the bridge's functions on a
keystroke's way with C{time.perf_counter()} stamps (L{Stages}) and writes them to FILE
as JSON when the terminal is closed.  The product's code is not changed: the wrappers
are put on the classes here, and the same names are looked for in an older tree.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
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

#: What each stamp of a keystroke's record means, in the order they are taken.
STAMPS = {
    "sock_in": "the relay's bytes handed to the TLS layer (after the socket read)",
    "message": "the WebSocket message handed to the bridge (onMessage)",
    "decoded": "its envelope decoded",
    "opened": "its payload opened (AES-GCM)",
    "pty_write": "the keystroke handed to the terminal's transport",
    "pty_written": "the keystroke about to be written to the terminal (os.write)",
    "pty_read": "the echo read from the terminal",
    "sealed": "the echo sealed",
    "send": "the frame handed to the WebSocket (sendMessage)",
    "sent": "sendMessage returned",
    "sock_out": "the frame's bytes about to be written to the socket (send)",
}


class Stages:
    """
    Per keystroke (a PTY_INPUT frame and the first output after it), the time of each
    of L{STAMPS}, and the reactor turns between the terminal read and the socket write.

    Writes are stamped before the system call: one that wakes the process at the other
    end often lets it run at once, in place of the writer, and that wait belongs to
    the next stage.
    """

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self.sock_in = 0.0
        self.message = 0.0
        self.turns = 0
        self._install(reactor)

    def stamp(self, name: str) -> None:
        record = self.current
        if record is not None and name not in record:
            record[name] = time.perf_counter()

    def _wrap(
        self,
        owner: Any,
        name: str,
        before: Callable[..., None] | None = None,
        after: Callable[..., None] | None = None,
    ) -> None:
        """Wrap C{owner.name} (a class's method or a module's function), if it exists."""
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(*args)
            result = original(*args, **kwargs)
            if after is not None:
                after(result, *args)
            return result

        setattr(owner, name, wrapper)

    def _install(self, reactor: Any) -> None:
        from twisted.internet import tcp
        from twisted.internet.process import PTYProcess
        from twisted.protocols import tls

        from coder1_bridge import connection, terminals
        from coder1_wire import e2e

        def sock_in(*args: Any) -> None:
            self.sock_in = time.perf_counter()

        def message(*args: Any) -> None:
            self.message = time.perf_counter()

        def decoded(envelope: Any, *args: Any) -> None:
            if getattr(envelope, "kind", None) == 0x21 and self.current is None:  # PTY_INPUT
                self.current = {"sock_in": self.sock_in, "message": self.message}
                self.stamp("decoded")

        def pty_written(*args: Any) -> None:
            if self.current is not None and "pty_write" in self.current:
                self.stamp("pty_written")

        def pty_read(*args: Any) -> None:
            if self.current is not None and "pty_written" in self.current:
                if "pty_read" not in self.current:
                    self.turns = 0
                self.stamp("pty_read")

        def sealed(envelope: Any, *args: Any) -> None:
            if self.current is not None and "pty_read" in self.current:
                self.stamp("sealed")

        def sock_out(*args: Any) -> None:
            # Within sendMessage when the bridge writes at once, on a later turn if not.
            record = self.current
            if record is not None and "send" in record and "sock_out" not in record:
                self.stamp("sock_out")
                record["turns"] = self.turns
                finish()

        def sent(*args: Any) -> None:
            self.stamp("sent")
            finish()

        def finish() -> None:
            record = self.current
            if record is not None and "sent" in record and "sock_out" in record:
                self.records.append(record)
                self.current = None

        def handled(result: Any, manager: Any, envelope: Any) -> None:
            if envelope.kind == 0x23:  # PTY_CLOSE: the pass is over
                self._write()
            elif envelope.kind == 0x20:  # PTY_OPEN
                self.records.clear()

        self._wrap(tls.TLSMemoryBIOProtocol, "dataReceived", before=sock_in)
        self._wrap(connection.BridgeClientProtocol, "onMessage", before=message)
        self._wrap(connection, "decode", after=decoded)
        self._wrap(e2e.SecureChannel, "open", after=lambda *a: self.stamp("opened"))
        self._wrap(PTYProcess, "write", before=lambda *a: self.stamp("pty_write"))
        self._wrap(terminals, "write_now", before=lambda *a: self.stamp("pty_write"))
        self._wrap(PTYProcess, "writeSomeData", before=pty_written)
        # Whichever the tree has: Twisted's read of the terminal, or a read of its own.
        self._wrap(terminals._TerminalProtocol, "childDataReceived", before=pty_read)
        self._wrap(terminals._TerminalProtocol, "outReceived", before=pty_read)
        self._wrap(e2e.SecureChannel, "seal", after=sealed)
        self._wrap(e2e.SecureChannel, "seal_frame", after=sealed)
        self._wrap(connection.BridgeClientProtocol, "send", before=lambda *a: self.stamp("send"))
        self._wrap(connection.BridgeClientProtocol, "send", after=sent)
        self._wrap(tcp.Connection, "writeSomeData", before=sock_out)
        self._wrap(terminals.TerminalManager, "handle", after=handled)
        iterate = reactor.doIteration

        def turn(delay: float | None) -> None:
            self.turns += 1
            iterate(delay)

        reactor.doIteration = turn

    def _write(self) -> None:
        partial = f"{self.path}.part"
        with open(partial, "w") as f:
            json.dump(self.records, f)
        os.replace(partial, self.path)
        self.records.clear()


async def _run(reactor: Any, config_dir: str) -> None:
    config = BridgeConfig.load(FilePath(config_dir))
    if config is None:
        raise SystemExit(f"no pairing in {config_dir}")
    stages = os.environ.get("CODER1_BENCH_STAGES")
    if stages:
        Stages(stages, reactor)
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
