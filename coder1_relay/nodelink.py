"""
Node links: how a relay node passes a connection on to the node that holds
its session (C{coder1_relay.mesh}).

The accepting node checks the connection as usual, then opens one WebSocket
over TLS 1.3 to the owner's node listener, with a node token (signed with the
deployment's shared key) that names the session and what the accepting node
learned.  The owner attaches that link to its hub as it would the connection
itself.  From then on every message is passed on as the very bytes that
arrived, both ways, and so are closes: the owner's close codes reach the
client; a link that drops closes the client with C{NODE_GONE}, which
reconnects (the end-to-end layer resumes what was in flight).

Flow control: each connection's transport holds the other's reading while it
is full (L{coder1_relay.reading.Backpressure}), so a slow reader on one node
holds up the writer on the other through TCP, and the accepting node keeps at
most a send buffer and a message in flight each way per connection.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger

from coder1_relay.context import Limits
from coder1_relay.mesh import Owner
from coder1_relay.reading import Backpressure, GatedReading, Reader, ReadGate
from coder1_relay.tokens import TokenAuthority
from coder1_wire import closecodes

#: Seconds to connect to another node and finish the link's handshakes.
LINK_TIMEOUT = 5.0
_log = Logger()


class LinkRefused(Exception):
    """The owner refused the link (C{status}, as HTTP), or could not be reached (0)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Carried(Reader, Protocol):
    """The client connection a link carries, as the link needs it."""

    def send(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class NodeLink(GatedReading, WebSocketClientProtocol):  # type: ignore[misc]  # autobahn's bases
    """The accepting node's end of a node link."""

    factory: NodeLinkFactory
    #: The connection this link carries, once it is open.
    client: Carried | None = None
    #: What the owner sent before that (its WELCOME), in order.
    _early: list[bytes]

    def connectionMade(self) -> None:
        super().connectionMade()
        self._early = []
        self._gate = ReadGate(self, self.factory.clock)
        tcp = getattr(self.transport, "transport", None)
        if isinstance(tcp, FileDescriptor):
            tcp.bufferSize = self.factory.send_buffer

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def carry(self, client: Carried) -> None:
        """Pass messages between this link and C{client} from now on."""
        self.client = client
        transport: Any = self.transport
        transport.registerProducer(Backpressure(client), True)
        early, self._early = self._early, []
        for frame in early:
            client.send(frame)

    def send(self, frame: bytes) -> None:
        if self.state == WebSocketClientProtocol.STATE_OPEN:
            self.sendMessage(frame, isBinary=True)

    def close(self, code: int, reason: str) -> None:
        if self.state == WebSocketClientProtocol.STATE_OPEN:
            self.sendClose(code, reason)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.client is None:
            self._early.append(payload)
        else:
            self.client.send(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gate.stop()
        if not self.factory.opened.called:
            self.factory.opened.errback(_refusal(reason))
            return
        client, self.client = self.client, None
        if client is None:
            return
        if wasClean and code is not None and (code in _PASSED_ON or code >= 4000):
            client.close(code, reason or "")
        else:
            client.close(closecodes.NODE_GONE, "the relay node holding this session went away")


#: Standard close codes that a link passes on to its client as they are.
_PASSED_ON = (closecodes.NORMAL, closecodes.GOING_AWAY)


def _refusal(reason: str | None) -> LinkRefused:
    """What Autobahn reports of a refused opening handshake: 'HTTP status 421 ...'."""
    text = reason or "could not reach the relay node holding this session"
    for word in text.replace("(", " ").split():
        if word.isdigit() and 400 <= int(word) < 600:
            return LinkRefused(int(word), "the relay node holding this session refused it")
    return LinkRefused(0, "the relay node holding this session is unreachable; try again")


class NodeLinkFactory(WebSocketClientFactory):
    """One node link's factory: its handshake headers, and a Deferred for its opening."""

    protocol = NodeLink  # type: ignore[assignment]  # Autobahn's annotation is Twisted's

    def __init__(
        self, url: str, token: str, clock: IReactorTime, limits: Limits, send_buffer: int
    ) -> None:
        super().__init__(url, headers={"Authorization": f"Bearer {token}"})
        self.clock = clock
        self.send_buffer = send_buffer
        self.opened: Deferred[NodeLink] = Deferred()
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            openHandshakeTimeout=LINK_TIMEOUT,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
            failByDrop=False,
            perMessageCompressionOffers=[],
        )


@attrs.frozen
class NodeLinks:
    """How this node opens links to the others."""

    reactor: Any
    tokens: TokenAuthority
    #: TLS towards the other nodes' node listeners (they present the relay's certificate).
    tls: IOpenSSLClientConnectionCreator
    #: The name their certificate is checked for (the public URL's host).
    hostname: str
    limits: Limits
    send_buffer: int

    async def open(
        self, owner: Owner, role: str, session: str, connection_id: str, attach: dict[str, Any]
    ) -> NodeLink:
        """A link to C{owner} carrying one C{role} connection of C{session}."""
        token = self.tokens.issue_node_token(session, role, connection_id, attach)
        host, _, port = owner.address.rpartition(":")
        factory = NodeLinkFactory(
            f"wss://{self.hostname}/ws/node/{role}",
            token,
            self.reactor,
            self.limits,
            self.send_buffer,
        )
        endpoint = wrapClientTLS(
            self.tls, HostnameEndpoint(self.reactor, host.strip("[]"), int(port), LINK_TIMEOUT)
        )
        try:
            await endpoint.connect(factory)
        except Exception:
            _log.info("could not reach relay node {node}", node=owner.node)
            raise LinkRefused(0, "the relay node holding this session is unreachable") from None
        # Bounded by Autobahn's opening handshake timeout (LINK_TIMEOUT, from the
        # TCP connection on, TLS included): past it, LinkRefused (_refusal).
        return await factory.opened
