"""
The baseline's far end: what the bridge is to the relay, in a few lines of Autobahn.

Connects to side ``b`` of a room of L{bench.naive_relay} and either echoes every
message (``echo``), or (``pty``) on its first message runs a shell command on a
pseudo-terminal, as the bridge runs a terminal, writes every later message to it, and
sends each chunk it reads as one binary message.  Prints ``naive peer ready`` once
connected.

    python -m bench.naive_peer URL echo
    python -m bench.naive_peer URL pty 'head -c 1M /dev/zero | base64'
"""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import react


class Output(ProcessProtocol):
    def __init__(self, ws: WebSocketClientProtocol) -> None:
        self.ws = ws

    def outReceived(self, data: bytes) -> None:
        self.ws.sendMessage(data, isBinary=True)


class Peer(WebSocketClientProtocol):
    terminal: Any = None

    def onOpen(self) -> None:
        self.factory.ready.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.mode == "echo":
            self.sendMessage(payload, isBinary)
        elif self.terminal is None:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TERM": "xterm-256color"}
            argv = ["/bin/sh", "-c", self.factory.command]
            self.terminal = self.factory.reactor.spawnProcess(
                Output(self), argv[0], argv, env, usePTY=True
            )
        else:
            self.terminal.write(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.ready.called:
            self.factory.ready.errback(RuntimeError(reason))


async def _run(reactor: Any, url: str, mode: str, command: str, cert: str | None) -> None:
    factory = WebSocketClientFactory(url)
    factory.protocol = Peer
    factory.reactor, factory.mode, factory.command = reactor, mode, command
    factory.ready = Deferred()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if cert:
        from coder1_wire.tls import client_tls_options

        with open(cert, "rb") as f:
            endpoint = wrapClientTLS(client_tls_options("localhost", f.read()), endpoint)
    await endpoint.connect(factory)
    await factory.ready
    sys.stdout.write("naive peer ready\n")
    sys.stdout.flush()
    await Deferred()


def main() -> None:
    url, mode = sys.argv[1], sys.argv[2]
    command = sys.argv[3] if len(sys.argv) > 3 else ""
    cert = sys.argv[4] if len(sys.argv) > 4 else None
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, url, mode, command, cert)))


if __name__ == "__main__":
    main()
