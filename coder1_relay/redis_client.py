"""
The relay's Redis client: commands with a deadline, Lua scripts, pub/sub.

Built on txredisapi, which speaks RESP and reconnects by itself (backing off
up to 2 s between attempts), on the relay's own reactor.  What this adds:

- Every call has a deadline (C{RedisSettings.timeout}, on the injected
  clock): txredisapi's own calls wait as long as it takes to reconnect.  Past
  the deadline a call fails with L{StoreUnavailable}, and while the connection
  is known to be down it fails at once.
- L{Script}s run with EVALSHA, and with EVAL (which loads them) when Redis
  answers NOSCRIPT: each is sent whole once per Redis lifetime, not per call.
- L{Subscription}: pub/sub on a connection of its own, subscribed again after
  every reconnection, which it reports, so that the caller can treat the gap
  as possible loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import txredisapi
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_relay.redis_settings import REFUSAL_HINT, RedisSettings
from coder1_relay.store import StoreUnavailable

#: What a command takes: floats are sent with all their digits (txredisapi would round them).
Arg = str | bytes | int | float

#: Redis errors that say it cannot serve now (loading, a replica, a full disk or
#: memory, a long script), not that a command is wrong.
_BUSY = frozenset({"LOADING", "READONLY", "MISCONF", "OOM", "BUSY", "MASTERDOWN", "TRYAGAIN"})


@attrs.frozen
class Script:
    """A Lua script, known to Redis by its SHA-1."""

    source: str
    sha1: str = attrs.field(init=False)

    @sha1.default
    def _digest(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


def _encoded(arg: Arg) -> str | bytes | int:
    return repr(arg) if isinstance(arg, float) else arg


def client_endpoint(reactor: Any, settings: RedisSettings) -> IStreamClientEndpoint:
    """
    TCP to the store, with TLS for rediss://: the server's certificate must
    name the URL's host and chain to C{ca_file} (every certificate in it), or
    to the system's roots without one.
    """
    tcp = HostnameEndpoint(reactor, settings.host, settings.port, timeout=settings.timeout)
    if not settings.tls:
        return tcp
    trust = None
    if settings.ca_file is not None:
        certificates = x509.load_pem_x509_certificates(settings.ca_file.getContent())
        trust = trustRootFromCertificates(
            [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
        )
    return wrapClientTLS(optionsForClientTLS(settings.host, trustRoot=trust), tcp)


@implementer(IHandshakeListener)
class _Protocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol, which over TLS makes its connection (sends AUTH,
    takes commands) only once the handshake has checked the server's
    certificate: one that fails it never counts as up, then lost.
    """

    def connectionMade(self) -> None:
        if not ISSLTransport.providedBy(self.transport):
            super().connectionMade()

    def handshakeCompleted(self) -> None:
        super().connectionMade()


class _WatchedFactory(txredisapi.RedisFactory):
    """txredisapi's factory (one connection), telling its owner when it is up, down or refused."""

    initialDelay = 0.1
    maxDelay = 2.0
    protocol = _Protocol

    def __init__(
        self,
        settings: RedisSettings,
        *,
        dbid: int | None,
        charset: str | None,
        reply_timeout: float | None,
        on_up: Callable[[Any], None],
        on_down: Callable[[], None],
        on_refused: Callable[[str], None],
    ) -> None:
        super().__init__(
            settings.address,
            dbid,
            1,
            isLazy=True,
            charset=charset,
            password=settings.password,
            replyTimeout=reply_timeout,
            convertNumbers=False,
            username=settings.username,
        )
        self.on_up, self.on_down, self.on_refused = on_up, on_down, on_refused
        # A refusal is reported through on_refused; nobody waits on this.
        self.deferred.addErrback(lambda _: None)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.on_up(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if not self.size and not self.disconnectCalled:
            self.on_down()

    def connectionError(self, why: str) -> None:
        # Redis refused the password or the database: txredisapi stops trying.
        super().connectionError(why)
        self.on_refused(why)


class RedisClient(Service):
    """
    One connection to the store's Redis, for commands (pipelined), started
    and stopped as a service.  Calls made before the first connection wait
    for it, up to the deadline.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, settings: RedisSettings, clock: IReactorTime | None = None
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        #: Times the deadlines (the reactor, or a test's Clock).
        self.clock: IReactorTime = clock or reactor
        self.endpoint = client_endpoint(reactor, settings)
        self._factory = _WatchedFactory(
            settings,
            dbid=settings.db or None,
            charset="utf-8",
            # A connection that leaves a command unanswered this long is dropped
            # and made again (a Redis host gone without closing it).
            reply_timeout=settings.timeout,
            on_up=self._up,
            on_down=self._down,
            on_refused=self._refused,
        )
        #: False from a lost connection (or a deadline missed with none) to the next one.
        self._available = True
        self._refusal: str | None = None
        self._connections = 0
        self._waiting: list[Deferred[None]] = []
        self._subscriptions: set[Subscription] = set()

    @property
    def refusal(self) -> str | None:
        """Why Redis refused the relay (for good: the client stopped trying), or None."""
        return self._refusal

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return bool(self._factory.size)

    def startService(self) -> None:
        super().startService()
        self._factory.startConnecting(self.endpoint)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._fail_waiting(StoreUnavailable("the relay is stopping"))
        stops = [s.stop() for s in list(self._subscriptions)]
        stops.append(self._factory.disconnect())
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    def when_ready(self) -> Deferred[None]:
        """
        Fires once connected (at once when it is); fails with
        L{StoreUnavailable} when Redis refused the password or the database.
        """
        if self._refusal is not None:
            return fail(StoreUnavailable(self._refusal))
        if self.connected:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def call(self, *args: Arg) -> Deferred[Any]:
        """
        Run any command (C{"SET", key, value, "NX", "PX", 300000}) and fire
        with Redis's answer: a str (bulk strings are UTF-8 text here, numbers
        are not converted), an int, None or a list of them.

        @raise StoreUnavailable: no answer within the deadline, no connection,
            or Redis cannot serve now (loading, read-only, out of memory...).
        @raise txredisapi.ResponseError: Redis refused the command itself.
        """
        return self._deadline(self._send(*args))

    def eval(self, script: Script, keys: Sequence[str], args: Sequence[Arg] = ()) -> Deferred[Any]:
        """Run C{script} on C{keys} and C{args} (EVALSHA, else EVAL), as L{call} runs a command."""
        head = (len(keys), *keys, *args)

        def load(failure: Failure) -> Any:
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self._send("EVAL", script.source, *head)

        return self._deadline(self._send("EVALSHA", script.sha1, *head).addErrback(load))

    def subscription(
        self, on_message: Callable[[str, bytes], object], on_reconnect: Callable[[], object]
    ) -> Subscription:
        """A new pub/sub connection, connecting now; see L{Subscription}."""
        subscription = Subscription(self, on_message, on_reconnect)
        self._subscriptions.add(subscription)
        return subscription

    def _send(self, *args: Arg) -> Deferred[Any]:
        if self._refusal is not None:
            return fail(StoreUnavailable(self._refusal))
        if not self._available and not self.connected:
            return fail(StoreUnavailable(f"no connection to Redis at {self.settings.address}"))
        handler: Any = self._factory.handler
        return maybeDeferred(handler.execute_command, *map(_encoded, args))

    def _deadline(self, answer: Deferred[Any]) -> Deferred[Any]:
        answer.addTimeout(self.settings.timeout, self.clock)
        return answer.addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> Failure:
        address = self.settings.address
        if failure.check(defer.TimeoutError):
            if not self.connected:
                self._available = False
            seconds = f"{self.settings.timeout:g}"
            raise StoreUnavailable(f"Redis at {address} did not answer within {seconds} s")
        if failure.check(txredisapi.ConnectionError):
            raise StoreUnavailable(f"lost the connection to Redis at {address}")
        if failure.check(txredisapi.ResponseError):
            word = str(failure.value).split(" ", 1)[0]
            if word == "NOAUTH":  # the relay was given no password
                if self._refusal is None:
                    self._refused("it wants a password (NOAUTH)")
                raise StoreUnavailable(self.refusal)
            if word in _BUSY:
                raise StoreUnavailable(f"Redis at {address} cannot serve now ({word})")
        return failure

    def _up(self, connection: Any) -> None:
        self._available = True
        self._connections += 1
        again = "re" if self._connections > 1 else ""
        self.log.info(
            "{again}connected to Redis at {address}", again=again, address=self.settings.address
        )
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(None)

    def _down(self) -> None:
        self._available = False
        self.log.warn(
            "lost the connection to Redis at {address}: store calls fail (HTTP 503) until it "
            "is back",
            address=self.settings.address,
        )

    def _refused(self, why: str) -> None:
        self._refusal = f"Redis at {self.settings.address} refused the relay: {why}"
        self.log.error("{refusal}; {hint}", refusal=self._refusal, hint=REFUSAL_HINT)
        self._fail_waiting(StoreUnavailable(self._refusal))

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.errback(error)


class _SubscriberProtocol(_Protocol, txredisapi.SubscriberProtocol):
    factory: Any

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self.factory.subscription.received(channel, message)


async def _subscribe(connection: Any, command: str, channels: Sequence[str]) -> None:
    # One channel per command: each gets exactly one confirmation to wait for.
    for channel in channels:
        await maybeDeferred(connection.execute_command, command, channel, apply_timeout=False)


class Subscription:
    """
    Pub/sub on a connection of its own: C{on_message(channel, message)} for
    every message on the channels subscribed (as bytes, whatever they hold).

    The connection is made again whenever it is lost, and subscribed again to
    every channel; then C{on_reconnect()} is called: messages published
    meanwhile are lost.  A channel whose L{subscribe} failed stays wanted and
    is subscribed as soon as Redis answers.  Channel names are the caller's
    (the store's prefix is not added).
    """

    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        on_message: Callable[[str, bytes], object],
        on_reconnect: Callable[[], object],
    ) -> None:
        self.client = client
        self.on_message, self.on_reconnect = on_message, on_reconnect
        self.channels: set[str] = set()
        self._connection: Any = None
        self._connections = 0
        self._waiting: list[Deferred[None]] = []
        self._factory = _WatchedFactory(
            client.settings,
            dbid=None,
            charset=None,
            reply_timeout=None,
            on_up=self._up,
            on_down=self._down,
            on_refused=self._refused,
        )
        self._factory.protocol = _SubscriberProtocol
        self._factory.subscription = self
        self._factory.startConnecting(client.endpoint)

    @property
    def connected(self) -> bool:
        """Whether the connection is up and subscribed to every channel."""
        return self._connection is not None

    def subscribe(self, *channels: str) -> Deferred[None]:
        """Fires once Redis has confirmed the subscription (or with L{StoreUnavailable})."""
        self.channels.update(channels)
        if self._connection is not None:
            done = Deferred.fromCoroutine(_subscribe(self._connection, "SUBSCRIBE", channels))
        else:
            done = Deferred[None]()
            self._waiting.append(done)
        return self._deadline(done)

    def unsubscribe(self, *channels: str) -> Deferred[None]:
        """No more messages from C{channels}."""
        self.channels.difference_update(channels)
        if self._connection is None:
            return succeed(None)
        return self._deadline(
            Deferred.fromCoroutine(_subscribe(self._connection, "UNSUBSCRIBE", channels))
        )

    def stop(self) -> Deferred[None]:
        """Close the connection for good."""
        self.client._subscriptions.discard(self)
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.errback(StoreUnavailable("the subscription was stopped"))
        self._connection = None
        stopped: Deferred[None] = self._factory.disconnect()
        return stopped

    def received(self, channel: bytes, message: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        if name not in self.channels:  # unsubscribed while reconnecting
            return
        try:
            self.on_message(name, message)
        except Exception:
            self.log.failure("a pub/sub message handler failed")

    def _deadline(self, done: Deferred[None]) -> Deferred[None]:
        def unavailable(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError, txredisapi.ConnectionError):
                raise StoreUnavailable(
                    f"Redis at {self.client.settings.address} did not confirm the subscription"
                )
            return failure

        done.addTimeout(self.client.settings.timeout, self.client.clock)
        return done.addErrback(unavailable)

    def _up(self, connection: Any) -> None:
        subscribed = Deferred.fromCoroutine(self._subscribe_all(connection))
        # Lost again before it was subscribed: the next connection subscribes.
        subscribed.addCallbacks(lambda _: self._subscribed(connection), lambda _: None)

    async def _subscribe_all(self, connection: Any) -> None:
        """Every channel wanted, those asked for meanwhile included."""
        done: set[str] = set()
        while missing := sorted(self.channels - done):
            await _subscribe(connection, "SUBSCRIBE", missing)
            done.update(missing)

    def _subscribed(self, connection: Any) -> None:
        if not connection.connected:
            return
        self._connection = connection
        self._connections += 1
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(None)
        if self._connections > 1:
            try:
                self.on_reconnect()
            except Exception:
                self.log.failure("a pub/sub reconnection handler failed")

    def _down(self) -> None:
        self._connection = None

    def _refused(self, why: str) -> None:
        self.log.error(
            "Redis at {address} refused the pub/sub connection: {why}",
            address=self.client.settings.address,
            why=why,
        )
