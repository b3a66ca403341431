"""WebSocket close codes the relay and the bridge use (4000-4999 are ours)."""

from __future__ import annotations

NORMAL = 1000
#: The relay process is stopping (RFC 6455 "going away"); reconnect at once,
#: to another relay process or to this one restarted.
GOING_AWAY = 1001
#: A frame whose envelope is malformed, of an unknown kind, or in the wrong direction.
PROTOCOL_ERROR = 4000
#: The token was revoked while the connection was open.
REVOKED = 4003
#: The token expired while the connection was open; the bridge must pair again.
EXPIRED = 4004
#: The same bridge connected again; this older connection is replaced.
REPLACED = 4010
#: The relay node that held this session went away, or the session moved to
#: another node (several relay processes); reconnect at once.
NODE_GONE = 4012
#: Nothing heard from the other end within the heartbeat timeout.
HEARTBEAT_TIMEOUT = 4011
#: The connection sent messages faster than the relay's limit (C{Limits.messages_per_second}).
RATE_LIMITED = 4029


#: Closes after which a client reconnects at once rather than after its backoff:
#: the relay (or the node holding the session) went away, not the client's fault.
RECONNECT_AT_ONCE = frozenset({GOING_AWAY, NODE_GONE})
