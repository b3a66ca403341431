"""
Benchmark harness only: what an idle paired session costs in Redis.

Writes C{--sessions} sessions into the Redis at C{--store} through the real
L{RedisStore}, each as a pairing leaves it (its bridge counter, its bridge's
record and key; the code used up, the rate windows gone as they are a minute
later), under the key prefix C{coder1-bench:}, then gives each bridge a
presence entry (connected).  Prints Redis's C{used_memory} growth per session
(INFO memory: what the host pays, allocator and key tables included) and the
sum of C{MEMORY USAGE} of the session's keys, then deletes every key it wrote.

    python -m bench.redis_memory --store redis://127.0.0.1:6379/15 [--sessions 1000]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from coder1_relay.redis_client import RedisClient
from coder1_relay.redis_settings import RedisSettings
from coder1_relay.redis_store import RedisStore
from coder1_relay.store import BridgeRecord, PendingCode, Presence

PREFIX = "coder1-bench:"
#: A base64url Ed25519 public key is 43 characters; the page's P-256 keys are 87.
KEY = "K" * 87
NOW = 1_765_000_000.123456
TOKEN_LIFETIME = 30 * 86400.0


async def used_memory(client: RedisClient) -> int:
    info: str = await client.call("INFO", "memory")
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name == "used_memory":
            return int(value)
    raise LookupError("used_memory")


async def key_memory(client: RedisClient) -> int:
    total = 0
    for key in await client.call("KEYS", PREFIX + "*"):
        total += await client.call("MEMORY", "USAGE", key, "SAMPLES", "0")
    return total


async def pair(store: RedisStore, session: str) -> None:
    """What one pairing leaves in the store, once its code and rate windows are gone."""
    await store.add_code("123456", PendingCode(session, KEY, NOW + 300), NOW)
    await store.take_code("123456", NOW)
    peer = await store.next_peer(session)
    jti = session[:22]  # secrets.token_urlsafe(16): 22 characters
    record = BridgeRecord(peer, jti, "laptop.example", NOW, NOW + TOKEN_LIFETIME, code="123456")
    await store.add_bridge(session, record)
    await store.set_bridge_key(session, peer, KEY)


async def measure(reactor: Any, url: str, sessions: int, out: TextIO) -> dict[str, float]:
    """Write, measure, delete; the bytes per session (also printed as a table to C{out})."""
    import attrs

    client = RedisClient(reactor, attrs.evolve(RedisSettings.from_url(url), prefix=PREFIX))
    client.startService()
    store = RedisStore(client)
    try:
        await client.when_ready()
        start = await used_memory(client)
        # session ids are secrets.token_urlsafe(18): 24 characters.
        names = [f"{i:024d}" for i in range(sessions)]
        for session in names:
            await pair(store, session)
        paired, paired_keys = await used_memory(client), await key_memory(client)
        for session in names:
            await store.set_presence(session, Presence(1, "laptop.example", "1.2.3", NOW, KEY))
        connected, connected_keys = await used_memory(client), await key_memory(client)
        results = {
            "paired, used_memory": (paired - start) / sessions,
            "paired, MEMORY USAGE": paired_keys / sessions,
            "connected, used_memory": (connected - start) / sessions,
            "connected, MEMORY USAGE": connected_keys / sessions,
        }
        out.write(f"| {sessions} idle sessions | bytes per session |\n|---|---|\n")
        for name, value in results.items():
            out.write(f"| {name} | {value:.0f} |\n")
        return results
    finally:
        for key in await client.call("KEYS", PREFIX + "*"):
            await client.call("DEL", key)
        await client.stopService()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.redis_memory", description=__doc__)
    p.add_argument("--store", required=True, help="redis://HOST:PORT/DB (a scratch database)")
    p.add_argument("--sessions", type=int, default=1000)
    options = p.parse_args(argv)
    react(
        lambda reactor: Deferred.fromCoroutine(
            measure(reactor, options.store, options.sessions, sys.stdout)
        ).addCallback(lambda _: None)
    )


if __name__ == "__main__":
    main()
