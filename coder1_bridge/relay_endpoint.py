"""
How the bridge reaches its relay: TCP (or a tunnel through HTTPS_PROXY when set)
with TLS 1.3 on top, the relay's certificate checked.  Kept apart from the relay's
JSON API (L{coder1_bridge.relay_api}), whose HTTP client a running bridge does not
import: it costs the bridge about 1 MiB of memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from coder1_bridge.config import RelayAddress
from coder1_bridge.output import Problem
from coder1_bridge.proxy import ProxySetting, TunnelEndpoint, proxy_for
from coder1_bridge.relay_errors import WitnessedTLS
from coder1_wire.tls import client_tls_options


def relay_tls(relay: RelayAddress) -> WitnessedTLS:
    """TLS 1.3 settings for C{relay}, trusting its C{--ca-cert} or the system's CAs."""
    ca = relay.ca_cert_pem.encode() if relay.ca_cert_pem else None
    try:
        return WitnessedTLS(client_tls_options(relay.host, ca))
    except ValueError:
        raise Problem(
            "The relay certificate given (--ca-cert) holds no PEM certificate: give the "
            "relay's certificate file, such as ~/.local/state/coder1-relay/dev-cert.pem."
        ) from None


def relay_proxy(relay: RelayAddress, environ: Mapping[str, str]) -> ProxySetting | None:
    """The proxy on the way to C{relay}, if any."""
    try:
        return proxy_for(relay.host, relay.port, environ)
    except ValueError as e:
        raise Problem(f"{e}. Fix it, or unset it to connect directly.") from None


def relay_endpoint(
    reactor: Any, relay: RelayAddress, tls: WitnessedTLS, environ: Mapping[str, str]
) -> IStreamClientEndpoint:
    """TCP to the relay (or a tunnel through the proxy), with TLS on top."""
    proxy = relay_proxy(relay, environ)
    if proxy is None:
        tcp: IStreamClientEndpoint = HostnameEndpoint(reactor, relay.host, relay.port)
    else:
        to_proxy = HostnameEndpoint(reactor, proxy.host, proxy.port)
        tcp = TunnelEndpoint(reactor, to_proxy, proxy, relay.host, relay.port)
    return wrapClientTLS(tls, tcp)
