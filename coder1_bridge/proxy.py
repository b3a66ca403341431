"""
HTTPS_PROXY and NO_PROXY, as every command-line tool reads them: the relay
is reached through an HTTP proxy's C{CONNECT} tunnel, and TLS runs inside it
end to end, so the proxy sees only the relay's name and port.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from coder1_bridge.relay_errors import ProxyRefused, ProxyUnreachable

#: Seconds the proxy may take to answer CONNECT once connected.
CONNECT_TIMEOUT = 30.0
#: The most a proxy's answer to CONNECT may hold before its end.
MAX_ANSWER = 16 * 1024


@attrs.frozen
class ProxySetting:
    """An HTTP proxy to tunnel through, and where the setting came from."""

    host: str
    port: int
    source: str
    authorization: bytes | None = attrs.field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The proxy as people write it, without its credentials."""
        return f"http://{self.host}:{self.port}"


def proxy_for(host: str, port: int, environ: Mapping[str, str]) -> ProxySetting | None:
    """
    The proxy to reach C{host}:C{port} through, from C{https_proxy} (or
    C{HTTPS_PROXY}, C{all_proxy}, C{ALL_PROXY}), unless C{no_proxy} (or
    C{NO_PROXY}) names the host; None for a direct connection.

    @raise ValueError: the proxy setting is not an C{http://} URL.
    """
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        value = environ.get(name, "").strip()
        if value:
            break
    else:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if bypassed(host, port, no_proxy):
        return None
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            f"{name} must be an http:// proxy URL, like http://proxy.example.com:3128, "
            f"not {parts.scheme}://"
        )
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(credentials.encode())
    try:
        proxy_port = parts.port or 80
    except ValueError:
        raise ValueError(f"{name} has a port that is not a number") from None
    return ProxySetting(parts.hostname, proxy_port, name, authorization)


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """
    Whether C{no_proxy} names C{host}:C{port}, as curl reads it: C{*} for
    every host; else, separated by commas, host names (C{example.com} and
    C{.example.com} cover its subdomains too), IP addresses or CIDR ranges,
    each with an optional C{:port}.
    """
    host = host.lower().strip("[]")
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        name, only_port = entry, None
        if entry.count(":") == 1:  # name:port (an IPv6 address has more colons)
            name, _, given = entry.partition(":")
            only_port = int(given) if given.isdigit() else -1
        name = name.strip("[]").removeprefix("*").lstrip(".")
        if not name or (only_port is not None and only_port != port):
            continue
        if host == name or host.endswith("." + name) or _in_range(host, name):
            return True
    return False


def _in_range(host: str, entry: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


@implementer(IStreamClientEndpoint)
@attrs.frozen
class TunnelEndpoint:
    """
    Connects to C{host}:C{port} through the HTTP proxy C{proxy}, reached with
    C{to_proxy}: the protocol is given the connection once the proxy has
    answered C{CONNECT} with 200.
    """

    clock: IReactorTime
    to_proxy: IStreamClientEndpoint
    proxy: ProxySetting
    host: str
    port: int

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        tunnel = _Tunnel(self, protocolFactory)
        connecting = self.to_proxy.connect(_TunnelFactory(tunnel))

        def unreachable(failure: Failure) -> None:
            tunnel.fail(ProxyUnreachable(self.proxy.url, _cause(failure)))

        connecting.addErrback(unreachable)
        tunnel.connecting = connecting
        return tunnel.established

    def request(self) -> bytes:
        """The CONNECT request."""
        target = f"{self.host}:{self.port}".encode("idna")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        if self.proxy.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.proxy.authorization)
        return b"\r\n".join([*lines, b"", b""])


class _Tunnel(Protocol):
    """Asks the proxy for the tunnel, then hands the connection to the real protocol."""

    def __init__(self, endpoint: TunnelEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.established: Deferred[IProtocol] = Deferred(lambda _: self.cancel())
        self.connecting: Deferred[IProtocol] | None = None
        self.answer = b""
        self.inner: IProtocol | None = None
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.timer = self.endpoint.clock.callLater(CONNECT_TIMEOUT, self._timed_out)
        self.transport.write(self.endpoint.request())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.answer += data
        head, found, rest = self.answer.partition(b"\r\n\r\n")
        if not found:
            if len(self.answer) > MAX_ANSWER:
                self._refused(0, "answer too long")
            return
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, status_reason = status_line.partition(" ")
        status, _, reason = status_reason.partition(" ")
        if not version.startswith("HTTP/") or not status.isdigit():
            self._refused(0, "not an HTTP answer")
        elif status != "200":
            self._refused(int(status), reason.strip())
        else:
            self._open(rest)

    def _open(self, rest: bytes) -> None:
        self._stop_timer()
        address: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        inner = self.factory.buildProtocol(address)
        if inner is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.fail(ConnectionDone("the protocol factory made no protocol"))
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        self.established.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _refused(self, status: int, reason: str) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.fail(ProxyRefused(self.endpoint.proxy.url, status, reason))

    def _timed_out(self) -> None:
        self.timer = None
        self.transport.abortConnection()  # type: ignore[union-attr]
        self.fail(ProxyUnreachable(self.endpoint.proxy.url, TimeoutError()))

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def fail(self, reason: BaseException) -> None:
        self._stop_timer()
        if not self.established.called:
            self.established.errback(Failure(reason))

    def cancel(self) -> None:
        """The connection attempt is called off (the bridge is stopping)."""
        self._stop_timer()
        if self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()
        elif self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
            return
        self.fail(ProxyUnreachable(self.endpoint.proxy.url, _cause(reason)))


class _TunnelFactory(Factory):
    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr: IAddress | None) -> _Tunnel:
        return self.tunnel


def _cause(failure: Failure) -> BaseException:
    return failure.value if failure.value is not None else ConnectionDone()
