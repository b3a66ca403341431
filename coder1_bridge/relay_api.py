"""
The relay's JSON API, over the endpoint of L{coder1_bridge.relay_endpoint}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from io import BytesIO
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from coder1_bridge.config import RelayAddress
from coder1_bridge.output import Problem
from coder1_bridge.relay_endpoint import relay_endpoint, relay_tls
from coder1_bridge.relay_errors import Where, explain


@attrs.frozen
class RelayAnswer:
    """One answer of the relay's API."""

    status: int
    body: dict[str, Any]
    headers: Headers

    @property
    def message(self) -> str:
        """The relay's own words for a refusal."""
        message = self.body.get("message")
        return message if isinstance(message, str) else f"HTTP {self.status}"

    def date(self) -> float | None:
        """The relay's clock (its C{Date} header), in seconds since the epoch."""
        values = self.headers.getRawHeaders(b"date")
        if not values:
            return None
        try:
            return parsedate_to_datetime(values[0].decode("latin-1")).timestamp()
        except (ValueError, TypeError):
            return None


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _Endpoints:
    endpoint: IStreamClientEndpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


@attrs.define
class RelayAPI:
    """The relay's JSON API, over the same TLS and proxy as the bridge's WebSocket."""

    reactor: Any
    relay: RelayAddress
    environ: Mapping[str, str]
    #: What the person can do about the relay's certificate, for the explanations.
    ca_hint: str = "pass the relay's certificate with --ca-cert FILE"
    #: Keep-alive for requests in a row (a pairing's two): one TLS handshake,
    #: not one per request.  Whoever makes a C{RelayAPI} calls C{close} when done.
    pool: HTTPConnectionPool = attrs.field()

    @pool.default
    def _pool(self) -> HTTPConnectionPool:
        return HTTPConnectionPool(self.reactor, persistent=True)

    def close(self) -> Deferred[None]:
        """Close the connection kept for the next request, if any."""
        return self.pool.closeCachedConnections()

    async def __aenter__(self) -> RelayAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        method: bytes,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> RelayAnswer:
        """
        One request; its answer, whatever its status.

        @raise Problem: the relay could not be reached (said why, and what to try).
        """
        tls = relay_tls(self.relay)
        endpoint = relay_endpoint(self.reactor, self.relay, tls, self.environ)
        agent = Agent.usingEndpointFactory(self.reactor, _Endpoints(endpoint), pool=self.pool)
        headers = Headers({b"User-Agent": [b"coder1-bridge"]})
        if token is not None:
            headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
        url = (self.relay.url + path).encode()
        try:
            response = await agent.request(method, url, headers, producer)
            raw = await readBody(response)
        except Exception as e:
            where = Where(self.relay, self.ca_hint)
            raise Problem(explain(e, where, self.reactor.seconds(), tls.presented())) from None
        try:
            decoded = json.loads(raw)
        except (ValueError, RecursionError):
            decoded = {}
        return RelayAnswer(
            response.code, decoded if isinstance(decoded, dict) else {}, response.headers
        )
