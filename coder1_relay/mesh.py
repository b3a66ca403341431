"""
Several relay processes, one deployment: which node holds each browser session.

Every connection of a browser session (its tabs and its bridges) is attached
to one node's hub, the session's I{owner}, exactly as on a single relay.  A
node that accepts a connection for a session another node owns checks it
(cookie or token, revocation) and then forwards it, message by message, over
a node link to the owner (C{coder1_relay.nodelink}).  So routing, flow
control, heartbeats, GONE and presence stay the single hub's, and no frame of
one session can reach another's: a node link carries one connection of one
session, named in a token only nodes can sign.

The directory says who owns a session.  Ownership is claimed by the first
node that needs it and lasts while the owner is alive (its node record is
renewed) and holds a connection of the session; a node whose record has
expired (it died, or lost its store) is passed over, and the next node to
need the session claims it.  docs/scaling.md has the whole design.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from coder1_relay.routing import Hub
from coder1_relay.store import BridgeRecord, StoreUnavailable
from coder1_wire import closecodes

if TYPE_CHECKING:
    from coder1_relay.nodelink import NodeLinks

#: What a node does with an event another node (or itself) published.
EventHandler = Callable[[dict[str, Any]], None]


@attrs.frozen
class Owner:
    """The node that holds a session's connections, and how other nodes reach it."""

    node: str
    #: C{host:port} of its node listener.
    address: str
    #: Claimed just now from a node that is gone: what that node had published
    #: about the session (presence) is stale.
    took_over: bool = False


class ISessionDirectory(Interface):
    """Session ownership and the events every node hears."""

    node = Attribute("This node's id (new at every start).")
    lost = Attribute(
        "Called with the sessions another node holds now, though this node held them "
        "(after its store lost this node's claims); this node lets them go."
    )

    def start(address: str) -> Deferred[None]:
        """Join: other nodes reach this one's node listener at C{address} (C{host:port})."""

    def stop() -> Deferred[None]:
        """Leave: the sessions this node owns are free for others to claim."""

    def locate(session: str) -> Deferred[Owner]:
        """
        The owner of C{session}; this node, claimed now, when it has none or
        its owner is gone.
        """

    def release(session: str) -> Deferred[None]:
        """This node holds no connection of C{session} any more: give it up, if it is ours."""

    def publish(event: dict[str, Any]) -> Deferred[None]:
        """Tell every node (this one too) C{event}: ids and numbers only, never content."""

    def subscribe(handler: EventHandler) -> None:
        """Call C{handler} with every event published (by any node)."""


@attrs.define
class SharedMemory:
    """
    The directory's state shared by relay services in one process: how the
    tests run several nodes without a store server.  C{alive} are the nodes
    whose records are current (a test removes one to play its death).
    """

    owners: dict[str, str] = attrs.field(factory=dict)
    alive: dict[str, str] = attrs.field(factory=dict)
    handlers: list[EventHandler] = attrs.field(factory=list)


@implementer(ISessionDirectory)
@attrs.define
class MemoryDirectory:
    """L{ISessionDirectory} over a L{SharedMemory}."""

    shared: SharedMemory
    node: str = attrs.field(factory=lambda: secrets.token_hex(8))
    address: str = ""
    lost: Callable[[list[str]], None] = lambda sessions: None

    def start(self, address: str) -> Deferred[None]:
        self.address = self.shared.alive[self.node] = address
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.leave()
        return succeed(None)

    def locate(self, session: str) -> Deferred[Owner]:
        owner = self.shared.owners.get(session)
        if owner is not None and owner in self.shared.alive:
            return succeed(Owner(owner, self.shared.alive[owner]))
        self.shared.owners[session] = self.node
        return succeed(Owner(self.node, self.address, took_over=owner is not None))

    def release(self, session: str) -> Deferred[None]:
        if self.shared.owners.get(session) == self.node:
            del self.shared.owners[session]
        return succeed(None)

    def publish(self, event: dict[str, Any]) -> Deferred[None]:
        for handler in list(self.shared.handlers):
            handler(event)
        return succeed(None)

    def subscribe(self, handler: EventHandler) -> None:
        self.shared.handlers.append(handler)

    def leave(self) -> None:
        """This node is gone (a test's stand-in for a node record that expired)."""
        self.shared.alive.pop(self.node, None)


#: Seconds a node keeps a session it holds no connection of before giving it
#: up: a page that reloads, or a bridge that reconnects, comes back to it.
RELEASE_DELAY = 5.0


@attrs.define
class Mesh:
    """
    This node's part in a deployment of several: it owns sessions through the
    directory, gives them up once it holds none of their connections, and
    passes what happens to a session on one node (a bridge paired, revoked)
    to the node that holds the session's connections.
    """

    directory: ISessionDirectory
    hub: Hub
    clock: IReactorTime
    links: NodeLinks
    _releasing: dict[str, IDelayedCall] = attrs.field(factory=dict)
    log: Logger = attrs.field(factory=Logger, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.hub.on_empty = self._empty
        self.directory.subscribe(self._heard)
        self.directory.lost = self.lost

    @property
    def node(self) -> str:
        return str(self.directory.node)

    def locate(self, session: str) -> Deferred[Owner]:
        """Who holds C{session}: this node (C{owner.node == self.node}) or another."""
        pending = self._releasing.pop(session, None)
        if pending is not None and pending.active():
            pending.cancel()
        return self.directory.locate(session).addCallback(self._located, session)

    def _located(self, owner: Owner, session: str) -> Owner:
        if owner.took_over and owner.node == self.node:
            # The last owner is gone, and so are its connections: what it said
            # of them is stale.  (Sent before this connection's own presence.)
            self.hub.store.clear_all_presence(session).addErrback(
                lambda f: f.trap(StoreUnavailable)
            )
        return owner

    def _empty(self, session: str) -> None:
        if session not in self._releasing:
            self._releasing[session] = self.clock.callLater(RELEASE_DELAY, self._release, session)

    def _release(self, session: str) -> None:
        del self._releasing[session]
        if not self.hub.holds(session):
            self.directory.release(session).addErrback(lambda _: None)

    def lost(self, sessions: list[str]) -> None:
        """Another node owns these sessions now: their connections here must go there."""
        for session in sessions:
            self.hub.close_session(
                session, closecodes.NODE_GONE, "this session moved to another relay node"
            )

    def paired(self, session: str, record: BridgeRecord) -> Deferred[None]:
        """A bridge of C{session} presented its key (wherever its tabs are)."""
        event = {"event": "paired", "session": session, "record": attrs.asdict(record)}
        # Unheard, the tabs learn of it from the bridge list when the bridge connects.
        return self._publish(event, "a pairing")

    def disconnect_bridge(self, session: str, peer: int, code: int, reason: str) -> Deferred[None]:
        """Close bridge C{peer} of C{session} on whichever node holds it (it was revoked)."""
        event = {"event": "disconnect", "session": session, "peer": peer, "code": code}
        # Unheard, the node holding it closes it when it resubscribes (a resync).
        return self._publish({**event, "reason": reason}, "a revocation")

    def _publish(self, event: dict[str, Any], what: str) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            self.log.warn("could not tell the other relay nodes of {what}", what=what)

        return self.directory.publish(event).addErrback(failed)

    def _heard(self, event: dict[str, Any]) -> None:
        if event.get("event") == "resync":
            Deferred.fromCoroutine(self._resync())
            return
        session = event.get("session")
        if not isinstance(session, str) or not self.hub.holds(session):
            return
        if event.get("event") == "paired":
            self.hub.paired(session, BridgeRecord(**event["record"]))
        elif event.get("event") == "disconnect":
            self.hub.disconnect_bridge(
                session, int(event["peer"]), int(event["code"]), str(event["reason"])
            )

    async def _resync(self) -> None:
        """
        Events may have been lost (the subscription was down): a bridge revoked
        meanwhile must not stay connected here.
        """
        now = self.clock.seconds()
        for endpoint in self.hub.endpoints():
            if not endpoint.is_bridge:
                continue
            try:
                paired = await self.hub.store.bridges(endpoint.session, now)
            except StoreUnavailable:
                return
            if all(record.peer != endpoint.peer for record in paired):
                self.hub.disconnect_bridge(
                    endpoint.session, endpoint.peer, closecodes.REVOKED, "this bridge was revoked"
                )

    def stop(self) -> None:
        """Cancel what is scheduled (the node is stopping)."""
        for call in self._releasing.values():
            if call.active():
                call.cancel()
        self._releasing.clear()
