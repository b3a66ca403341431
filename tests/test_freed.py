"""
A closed session's objects in the relay are freed by reference counting as
soon as its connections close, not left in reference cycles for the garbage
collector: a full collection walks every object of every session held (about
200 ms at 3,000 sessions, docs/performance.md), so the relay runs it rarely.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from coder1_relay.tap import GC_THRESHOLDS

from .loopback import (
    RelayAndPage,
    around_make_service,
    pair_bridge,
    reactor,
    settle,
    start_bridge,
    stop_all,
)


class FreedTests(RelayAndPage):
    """A real relay, a real bridge and a page's WebSocket, on loopback, with no cycle collector."""

    def setUp(self) -> Any:
        # Objects of earlier tests are no business of this one.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        return super().setUp()

    async def until_closed(self) -> None:
        """Wait (up to 10 s) until the relay holds no WebSocket, then a few reactor turns."""
        await self.relay.context.connections.when_idle().addTimeout(10, reactor)
        for _ in range(5):
            await deferLater(reactor, 0)

    async def test_closed_session_is_freed_without_the_collector(self) -> None:
        """
        Once the bridge and the page have gone, each relay-side WebSocket
        protocol, its TLS layer and its TCP connection are gone too, with the
        cycle collector off: nothing of theirs is in a reference cycle.
        """
        config = await pair_bridge(self.browser, self.config_dir, None)
        bridge = await start_bridge(config, telemetry=False)
        ide = await self.browser.connect_ide()
        held = []
        protocol: Any
        for protocol in list(self.relay.context.connections.live):
            tls = protocol.transport
            held += [protocol, tls, tls.transport]
        self.assertEqual(len(held), 6)  # the bridge's and the page's
        alive = [weakref.ref(each) for each in held]
        del held, protocol, tls
        await stop_all(bridge)
        assert ide.protocol is not None
        ide.protocol.sendClose()
        await self.until_closed()
        await settle()
        left = [type(ref()).__name__ for ref in alive if ref() is not None]
        self.assertEqual(left, [])


class ThresholdTests(TestCase):
    """The collector's thresholds C{twistd coder1-relay} sets."""

    def test_full_collections_rarer_in_the_relay(self) -> None:
        """
        Making the relay as C{twistd coder1-relay} does, in a process of its
        own, sets L{GC_THRESHOLDS}: full collections 10 times rarer than
        Python's default, young ones as often.
        """
        before, after = around_make_service(self.mktemp(), "gc.get_threshold()")
        self.assertEqual(before, "(700, 10, 10)")
        self.assertEqual(after, repr(GC_THRESHOLDS))
