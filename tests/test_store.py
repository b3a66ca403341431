"""Tests for L{coder1_relay.store}: group commit of the pairings file, on an injected clock."""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay import store as store_module
from coder1_relay.store import BridgeRecord, MemoryStore, write_in_place

KEY = "R" * 87


@attrs.define
class FakeWriter:
    """
    Records every write and leaves it under way until the test says it is on
    disk (L{finish}), which writes the file for real.
    """

    writes: list[tuple[FilePath[str], bytes]] = attrs.field(factory=list)
    pending: list[Deferred[None]] = attrs.field(factory=list)

    def __call__(self, path: FilePath[str], data: bytes) -> Deferred[None]:
        self.writes.append((path, data))
        done: Deferred[None] = Deferred()
        self.pending.append(done)
        return done

    def finish(self) -> None:
        """The oldest write under way reaches the disk."""
        path, data = self.writes[len(self.writes) - len(self.pending)]
        write_in_place(path, data)
        self.pending.pop(0).callback(None)

    def fail(self) -> None:
        """The oldest write under way fails (a full disk)."""
        self.pending.pop(0).errback(OSError(28, "No space left on device"))


def record(peer: int, jti: str, *, paired_at: float = 1e9, expires_at: float = 2e9) -> BridgeRecord:
    return BridgeRecord(peer, jti, f"host{peer}", paired_at, expires_at, KEY)


class GroupCommitTests(SynchronousTestCase):
    """Changes made together share one write; each caller hears only once it is on disk."""

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.file = directory.child("pairings.json")
        self.clock = Clock()
        self.writer = FakeWriter()
        self.store = MemoryStore(path=self.file, clock=self.clock, writer=self.writer)

    def saved(self) -> Any:
        return json.loads(self.file.getContent())

    def test_concurrent_changes_share_one_write(self) -> None:
        """
        Twenty pairings and a revocation in one reactor turn are one write,
        made on the next turn, holding all of them.
        """
        changes = [self.store.add_bridge(f"s{i}", record(1, f"jti-{i}")) for i in range(20)]
        changes.append(self.store.revoke("jti-0", 2e9, 1e9))
        self.assertEqual(self.writer.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.writer.writes), 1)
        self.writer.finish()
        saved = self.saved()
        self.assertEqual(saved["revoked"], {"jti-0": 2e9})
        self.assertEqual(len(saved["bridges"]), 20)
        for change in changes:
            self.assertIsNone(self.successResultOf(change))
        self.assertEqual(len(self.writer.writes), 1)

    def test_answered_only_once_durable(self) -> None:
        """
        A revocation's Deferred fires only after its write is done (the API
        answers then), though reads see it at once.
        """
        revoked = self.store.revoke("jti-1", 2e9, 1e9)
        self.assertTrue(self.successResultOf(self.store.is_revoked("jti-1", 1e9)))
        self.assertNoResult(revoked)
        self.clock.advance(0)
        self.assertNoResult(revoked)
        self.assertFalse(self.file.exists())
        self.writer.finish()
        self.successResultOf(revoked)
        self.assertEqual(self.saved()["revoked"], {"jti-1": 2e9})
        self.assertEqual(self.file.getPermissions().shorthand(), "rw-------")

    def test_changes_during_a_write_share_the_next(self) -> None:
        """
        Changes made while a write is under way wait for it, then share one
        more write: never two writes at once, and no change is answered by a
        write that does not hold it.
        """
        first = self.store.add_bridge("s", record(1, "a"))
        self.clock.advance(0)
        later = [self.store.add_bridge("s", record(p, f"j{p}")) for p in (2, 3, 4)]
        self.clock.advance(0)
        self.assertEqual(len(self.writer.writes), 1)
        self.writer.finish()
        self.successResultOf(first)
        for change in later:
            self.assertNoResult(change)
        self.clock.advance(0)
        self.assertEqual(len(self.writer.writes), 2)
        self.writer.finish()
        for change in later:
            self.successResultOf(change)
        bridges = self.saved()["bridges"]
        self.assertEqual([r["peer"] for r in bridges["s"]], [1, 2, 3, 4])

    def test_failed_write_fails_its_callers(self) -> None:
        """
        When the write fails every caller of that write gets the error, and
        the next change writes everything again.
        """
        changes = [self.store.revoke(f"j{i}", 2e9, 1e9) for i in range(3)]
        self.clock.advance(0)
        self.writer.fail()
        for change in changes:
            self.failureResultOf(change, OSError)
        self.flushLoggedErrors(OSError)
        again = self.store.revoke("j3", 2e9, 1e9)
        self.clock.advance(0)
        self.writer.finish()
        self.successResultOf(again)
        self.assertEqual(sorted(self.saved()["revoked"]), ["j0", "j1", "j2", "j3"])

    def test_key_and_pruning_reach_the_file(self) -> None:
        """
        A bridge's key replaces its record in the file (its session's cached
        part is rebuilt), and expired records leave it.
        """
        self.store.add_bridge("s", record(1, "old", paired_at=10.0, expires_at=100.0))
        self.store.add_bridge("t", record(1, "keep", paired_at=10.0))
        self.clock.advance(0)
        self.writer.finish()
        fresh = attrs.evolve(record(2, "new", paired_at=200.0), bridge_key="", code="123456")
        self.store.add_bridge("t", fresh)
        keyed = self.store.set_bridge_key("t", 2, KEY)
        self.clock.advance(0)
        self.assertNoResult(keyed)
        self.writer.finish()
        self.assertEqual(self.successResultOf(keyed), attrs.evolve(fresh, bridge_key=KEY))
        bridges = self.saved()["bridges"]
        self.assertNotIn("s", bridges)
        self.assertEqual(
            [(r["jti"], r["bridge_key"], r["code"]) for r in bridges["t"]],
            [("keep", KEY, ""), ("new", KEY, "")],
        )
        restarted = MemoryStore(path=self.file)
        self.assertEqual(
            [r.jti for r in self.successResultOf(restarted.bridges("t", 300.0))], ["keep", "new"]
        )

    def test_only_changed_sessions_encoded(self) -> None:
        """
        A write encodes again only the sessions that changed since the last
        one; the file still holds every session's bridges and numbers.
        """
        for i in range(20):
            self.successResultOf(self.store.next_peer(f"s{i}"))
            self.store.add_bridge(f"s{i}", record(1, f"jti-{i}"))
        self.clock.advance(0)
        self.writer.finish()
        encoded: list[BridgeRecord] = []
        real = attrs.asdict

        def counting(record: Any) -> dict[str, Any]:
            encoded.append(record)
            return real(record)

        self.patch(store_module.attrs, "asdict", counting)
        self.successResultOf(self.store.next_peer("s3"))
        self.successResultOf(self.store.next_peer("lone"))
        self.store.add_bridge("s3", record(2, "jti-3b"))
        self.clock.advance(0)
        self.writer.finish()
        self.assertEqual([r.jti for r in encoded], ["jti-3", "jti-3b"])
        saved = self.saved()
        self.assertEqual(len(saved["bridges"]), 20)
        self.assertEqual(saved["peers"]["s3"], 2)
        self.assertEqual(saved["peers"]["lone"], 1)
        restarted = MemoryStore(path=self.file)
        self.assertEqual(self.successResultOf(restarted.next_peer("s0")), 2)
        self.assertEqual(len(self.successResultOf(restarted.bridges("s3", 1e9))), 2)

    def test_flushed(self) -> None:
        """C{flushed} fires once every change so far is on disk: at once when there is none."""
        self.successResultOf(self.store.flushed())
        self.store.revoke("j", 2e9, 1e9)
        flushed = self.store.flushed()
        self.clock.advance(0)
        self.assertNoResult(flushed)
        self.writer.finish()
        self.successResultOf(flushed)
        self.assertEqual(len(self.writer.writes), 1)


class WithoutClockTests(SynchronousTestCase):
    """Without a clock every change is written before its method returns."""

    def test_written_at_once(self) -> None:
        """Each change is one write, done when its Deferred is returned."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("pairings.json")
        writes: list[bytes] = []

        def writer(target: FilePath[str], data: bytes) -> Deferred[None]:
            writes.append(data)
            return succeed(None)

        store = MemoryStore(path=path, writer=writer)
        self.successResultOf(store.revoke("a", 2e9, 1e9))
        self.successResultOf(store.revoke("b", 2e9, 1e9))
        self.assertEqual(len(writes), 2)
        self.assertEqual(json.loads(writes[1])["revoked"], {"a": 2e9, "b": 2e9})
