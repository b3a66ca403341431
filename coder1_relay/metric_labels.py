"""
What the relay's metrics count, without prometheus_client: the label values
the rest of the relay names (L{Role}, L{PairingOutcome}) and L{PairingCounts},
what the API counts where it happens.

A relay without C{--metrics-listen} serves no metrics, so it keeps
L{NotCounted} and never loads prometheus_client (C{coder1_relay.metrics},
about 1 MiB of a process, and a timing wrapper around every store call).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol

import attrs


class Role(enum.Enum):
    """What a WebSocket connection is (the C{role} label)."""

    #: A browser tab (also when this process passes it on to another node).
    IDE = "ide"
    #: A paired bridge (likewise).
    BRIDGE = "bridge"
    #: A link from another relay node, carrying a tab or bridge of a session held here.
    NODE = "node"


class PairingOutcome(enum.Enum):
    """How a bridge's redemption of a code (C{POST /api/pair}) ended."""

    OK = "ok"
    #: Unknown, used or expired code.
    INVALID_CODE = "invalid_code"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_BRIDGES = "too_many_bridges"
    STORE_UNAVAILABLE = "store_unavailable"
    #: Not JSON, too large, a bad label.
    BAD_REQUEST = "bad_request"
    #: The relay failed (HTTP 500).
    ERROR = "error"


#: The API's error words (C{coder1_relay.web.HTTPError.error}) as pairing outcomes.
PAIRING_ERRORS: Mapping[str, PairingOutcome] = {
    "invalid-code": PairingOutcome.INVALID_CODE,
    "rate-limited": PairingOutcome.RATE_LIMITED,
    "too-many-bridges": PairingOutcome.TOO_MANY_BRIDGES,
    "store-unavailable": PairingOutcome.STORE_UNAVAILABLE,
    "bad-request": PairingOutcome.BAD_REQUEST,
    "bad-label": PairingOutcome.BAD_REQUEST,
    "bad-json": PairingOutcome.BAD_REQUEST,
    "too-large": PairingOutcome.BAD_REQUEST,
}


class PairingCounts(Protocol):
    """What the API counts as it happens (C{coder1_relay.metrics.RelayMetrics} does)."""

    def issued(self) -> None:
        """A pairing code was issued to a browser."""

    def paired(self, outcome: PairingOutcome) -> None:
        """A bridge's redemption of a code ended with C{outcome}."""


@attrs.frozen
class NotCounted:
    """The counts of a relay that serves no metrics: nothing."""

    def issued(self) -> None:
        pass

    def paired(self, outcome: PairingOutcome) -> None:
        pass
