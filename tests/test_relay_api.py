"""Tests for L{coder1_bridge.relay_api} over a real relay on loopback: keep-alive."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.http import Request

from coder1_relay.web import RelayHTTPChannel, RelaySite
from tests.loopback import RelayAndPage, pair_bridge


class PairingConnectionTests(RelayAndPage):
    """C{coder1-bridge pair} makes its two requests on one connection, then closes it."""

    async def start(self) -> None:
        await super().start()
        self.channels: dict[bytes, list[Any]] = {}
        self.lost: list[Any] = []
        log, lost = RelaySite.log, RelayHTTPChannel.connectionLost

        def recording_log(site: RelaySite, request: Request) -> None:
            self.channels.setdefault(request.path, []).append(request.channel)
            log(site, request)

        def recording_lost(channel: RelayHTTPChannel, reason: Failure) -> None:
            self.lost.append(channel)
            lost(channel, reason)

        self.patch(RelaySite, "log", recording_log)
        self.patch(RelayHTTPChannel, "connectionLost", recording_lost)

    async def test_pair_requests_share_one_connection(self) -> None:
        """POST /api/pair and POST /api/pair/key arrive on the same TCP connection."""
        await pair_bridge(self.browser, self.config_dir, io.StringIO())
        [first] = self.channels[b"/api/pair"]
        [second] = self.channels[b"/api/pair/key"]
        self.assertIs(first, second)

    async def test_no_connection_left_open_after_pair(self) -> None:
        """Once C{pair} returns, the bridge has closed its connection to the relay."""
        await pair_bridge(self.browser, self.config_dir, io.StringIO())
        channel = self.channels[b"/api/pair/key"][0]
        # The relay's idle timeout is far longer than this wait: only the
        # bridge closing its side ends the connection here.
        for _ in range(200):
            if channel in self.lost:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertIn(channel, self.lost)
