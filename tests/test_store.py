"""
Tests for L{coder1_relay.store}: the contract every store keeps (L{StoreContract},
run against L{MemoryStore} here and against C{RedisStore} in test_redis_store),
group commit of the pairings file, on an injected clock, and its journal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from coder1_relay import store as store_module
from coder1_relay.store import (
    BridgeRecord,
    FileWrite,
    IRelayStore,
    MemoryStore,
    PendingCode,
    Presence,
    write_in_place,
)
from coder1_wire.secretfile import write_secret

KEY = "R" * 87


def record(peer: int, jti: str, *, paired_at: float = 1e9, expires_at: float = 2e9) -> BridgeRecord:
    return BridgeRecord(peer, jti, f"host{peer}", paired_at, expires_at, KEY)


OTHER_KEY = "Q" * 87
#: Times with all their digits, as the reactor gives them.
NOW = 1_765_000_000.123456


class StoreContract:
    """
    What every L{IRelayStore} promises, for a store (C{self.store}) and a
    second one sharing its state (C{self.other}: another relay process's, or
    the same store where there is only one process).  Mixed into a
    C{TestCase} whose C{setUp} sets both.
    """

    store: IRelayStore
    other: IRelayStore

    # For mypy: what the TestCase mixed with this provides.
    assertEqual: Any
    assertAlmostEqual: Any
    assertIsNone: Any
    assertTrue: Any
    assertFalse: Any

    def test_interface(self) -> None:
        """The store provides the whole interface."""
        self.assertTrue(verifyObject(IRelayStore, self.store))

    async def test_code_taken_once(self) -> None:
        """
        A code is taken once, on either store, with the session and browser
        key it was made for; then, like an unknown code, it is None.
        """
        pending = PendingCode("session-1", KEY, NOW + 300)
        self.assertTrue(await self.store.add_code("123456", pending, NOW))
        self.assertEqual(await self.other.take_code("123456", NOW + 1), pending)
        self.assertIsNone(await self.store.take_code("123456", NOW + 2))
        self.assertIsNone(await self.other.take_code("123456", NOW + 2))
        self.assertIsNone(await self.store.take_code("654321", NOW))

    async def test_live_code_not_made_twice(self) -> None:
        """Making a code that is live already fails and leaves the first one as it was."""
        first = PendingCode("session-1", KEY, NOW + 300)
        self.assertTrue(await self.store.add_code("111111", first, NOW))
        second = PendingCode("session-2", OTHER_KEY, NOW + 310)
        self.assertFalse(await self.other.add_code("111111", second, NOW + 10))
        self.assertEqual(await self.store.take_code("111111", NOW + 20), first)

    async def test_expired_code_refused(self) -> None:
        """A code is refused from its expiry on, and used up by the attempt."""
        pending = PendingCode("session-1", KEY, NOW + 300)
        await self.store.add_code("222222", pending, NOW)
        self.assertIsNone(await self.other.take_code("222222", NOW + 300))
        self.assertIsNone(await self.store.take_code("222222", NOW + 1))

    async def test_concurrent_takes_one_wins(self) -> None:
        """Of forty takes of one code in flight at once on both stores, exactly one gets it."""
        pending = PendingCode("session-1", KEY, NOW + 300)
        await self.store.add_code("333333", pending, NOW)
        takes = [
            s.take_code("333333", NOW + 1) for _ in range(20) for s in (self.store, self.other)
        ]
        results = await gatherResults(takes)
        self.assertEqual([r for r in results if r is not None], [pending])

    async def test_window_counts_up_to_limit(self) -> None:
        """
        Events are counted up to the limit; past it nothing is counted and
        the answer is when the oldest event that matters leaves the window.
        """
        for i in range(3):
            self.assertIsNone(await self.store.hit("k", NOW + i, 60.0, 3))
        self.assertEqual(await self.other.count("k", NOW + 2, 60.0), 3)
        wait = await self.other.hit("k", NOW + 10, 60.0, 3)
        self.assertEqual(wait, (NOW + 0) + 60.0 - (NOW + 10))
        self.assertEqual(await self.store.count("k", NOW + 10, 60.0), 3)
        # The oldest event leaves at exactly 60 s: room for one more.
        self.assertEqual(await self.store.count("k", NOW + 60, 60.0), 2)
        self.assertIsNone(await self.other.hit("k", NOW + 60, 60.0, 3))
        self.assertAlmostEqual(await self.store.hit("k", NOW + 60.5, 60.0, 3), 0.5)
        self.assertEqual(await self.store.count("k", NOW + 200, 60.0), 0)

    async def test_windows_apart(self) -> None:
        """Each key has a window of its own."""
        await self.store.hit("a", NOW, 60.0, 1)
        self.assertIsNone(await self.store.hit("b", NOW, 60.0, 1))
        self.assertEqual(await self.store.count("c", NOW, 60.0), 0)

    async def test_concurrent_hits_counted_once_each(self) -> None:
        """Forty hits in flight at once on both stores, limit 5: exactly five are counted."""
        hits = [s.hit("k", NOW, 3600.0, 5) for _ in range(20) for s in (self.store, self.other)]
        results = await gatherResults(hits)
        self.assertEqual(sum(r is None for r in results), 5)
        self.assertEqual(await self.store.count("k", NOW, 3600.0), 5)
        self.assertEqual(await self.other.count("k", NOW, 3600.0), 5)

    async def test_release(self) -> None:
        """
        C{release} takes back one event at that time, from either store;
        with none there it does nothing.
        """
        for at in (NOW, NOW, NOW + 1):
            await self.store.hit("k", at, 60.0, 5)
        await self.other.release("k", NOW)
        self.assertEqual(await self.store.count("k", NOW + 1, 60.0), 2)
        await self.other.release("k", NOW + 0.5)
        await self.other.release("nothing", NOW)
        self.assertEqual(await self.store.count("k", NOW + 1, 60.0), 2)
        await self.store.release("k", NOW + 1)
        await self.store.release("k", NOW)
        self.assertEqual(await self.other.count("k", NOW + 1, 60.0), 0)

    async def test_revocation_seen_everywhere_until_expiry(self) -> None:
        """A revocation on one store is seen on the other, until the token's own expiry."""
        await self.store.revoke("jti-1", NOW + 100, NOW)
        self.assertTrue(await self.other.is_revoked("jti-1", NOW + 99))
        self.assertFalse(await self.other.is_revoked("jti-2", NOW))
        self.assertFalse(await self.store.is_revoked("jti-1", NOW + 100))

    async def test_peer_numbers_never_reused(self) -> None:
        """Bridge numbers count up per session, across stores, even when asked for at once."""
        self.assertEqual(await self.store.next_peer("s"), 1)
        self.assertEqual(await self.other.next_peer("s"), 2)
        self.assertEqual(await self.other.next_peer("t"), 1)
        numbers = await gatherResults(
            [s.next_peer("s") for _ in range(10) for s in (self.store, self.other)]
        )
        self.assertEqual(sorted(numbers), list(range(3, 23)))

    async def test_bridges_listed(self) -> None:
        """
        Paired bridges are listed, from either store, by number, exactly as
        they were added; expired and revoked ones are not.
        """
        live = record(2, "jti-2", paired_at=NOW, expires_at=NOW + 1000)
        await self.store.add_bridge("s", live)
        await self.store.add_bridge("s", record(1, "jti-1", paired_at=NOW, expires_at=NOW + 1000))
        await self.other.add_bridge("s", record(3, "jti-3", paired_at=NOW, expires_at=NOW + 10))
        await self.other.add_bridge("s", attrs.evolve(live, peer=4, jti="jti-4", bridge_key=""))
        await self.store.revoke("jti-1", NOW + 1000, NOW)
        listed = await self.other.bridges("s", NOW + 10)
        self.assertEqual([r.peer for r in listed], [2, 4])
        self.assertEqual(listed[0], live)
        self.assertEqual(await self.store.bridges("s", NOW + 10), listed)
        self.assertEqual(await self.store.bridges("elsewhere", NOW), [])

    async def test_bridge_key_set_once(self) -> None:
        """
        A bridge's key is set once, from either store: the answer is its
        record with the key (and the code it redeemed), which is forgotten in
        the store.  A second key, or a key for no bridge, gets None.
        """
        fresh = record(1, "jti-1", paired_at=NOW, expires_at=NOW + 1000)
        fresh = attrs.evolve(fresh, bridge_key="", code="123456")
        await self.store.add_bridge("s", fresh)
        updated = await self.other.set_bridge_key("s", 1, KEY)
        self.assertEqual(updated, attrs.evolve(fresh, bridge_key=KEY))
        self.assertIsNone(await self.store.set_bridge_key("s", 1, OTHER_KEY))
        self.assertIsNone(await self.store.set_bridge_key("s", 2, KEY))
        self.assertIsNone(await self.store.set_bridge_key("nobody", 1, KEY))
        self.assertEqual(
            await self.store.bridges("s", NOW), [attrs.evolve(fresh, bridge_key=KEY, code="")]
        )

    async def test_concurrent_bridge_keys_one_wins(self) -> None:
        """Of twenty keys presented at once for one bridge on both stores, exactly one is set."""
        fresh = attrs.evolve(
            record(1, "jti-1", paired_at=NOW, expires_at=NOW + 1000), bridge_key=""
        )
        await self.store.add_bridge("s", fresh)
        keys = [f"{i:02d}" + "K" * 85 for i in range(20)]
        stores = [self.store, self.other] * 10
        results = await gatherResults(
            [s.set_bridge_key("s", 1, k) for s, k in zip(stores, keys, strict=True)]
        )
        won = [r for r in results if r is not None]
        self.assertEqual(len(won), 1)
        self.assertEqual(await self.other.bridges("s", NOW), won)

    async def test_presence(self) -> None:
        """
        Connected bridges are listed by number from either store; cleared one
        by one, or all of a session's at once.
        """
        laptop = Presence(2, "laptop", "1.0", NOW, KEY)
        await self.store.set_presence("s", laptop)
        await self.other.set_presence("s", Presence(1, "desk", "1.1", NOW + 1, OTHER_KEY))
        await self.other.set_presence("t", Presence(1, "other", "1.1", NOW, KEY))
        listed = await self.other.presence("s")
        self.assertEqual([p.peer for p in listed], [1, 2])
        self.assertEqual(listed[1], laptop)
        await self.store.clear_presence("s", 1)
        await self.store.clear_presence("s", 9)
        self.assertEqual(await self.other.presence("s"), [laptop])
        await self.other.clear_all_presence("s")
        self.assertEqual(await self.store.presence("s"), [])
        self.assertEqual(len(await self.store.presence("t")), 1)


class MemoryStoreContractTests(StoreContract, TestCase):
    """The contract, for the in-memory store (one process: both stores are the same)."""

    def setUp(self) -> None:
        self.store = self.other = MemoryStore()


def on_disk(path: FilePath[str]) -> dict[str, Any]:
    """
    The state in C{path} and its journal, read as docs/security.md describes
    them: the snapshot, then each whole line of the journal of its generation
    over it.  Bridges as C{{session: [records by peer]}}.
    """
    snapshot = json.loads(path.getContent())
    revoked, peers = snapshot["revoked"], snapshot["peers"]
    bridges = {s: {r["peer"]: r for r in rs} for s, rs in snapshot["bridges"].items()}
    journal = path.siblingExtension(".journal")
    lines = journal.getContent().split(b"\n")[:-1] if journal.exists() else []
    if lines and json.loads(lines[0]) == {"generation": snapshot.get("generation")}:
        for line in lines[1:]:
            change = json.loads(line)
            revoked.update(change["revoked"])
            peers.update(change["peers"])
            for session, records in change["bridges"].items():
                bridges.setdefault(session, {}).update({r["peer"]: r for r in records})
    listed = {s: [rs[p] for p in sorted(rs)] for s, rs in bridges.items()}
    return {"revoked": revoked, "peers": peers, "bridges": listed}


@attrs.define
class FakeWriter:
    """
    Records every write and leaves it under way until the test says it is on
    disk (L{finish}), which writes the files for real.
    """

    writes: list[Sequence[FileWrite]] = attrs.field(factory=list)
    pending: list[Deferred[None]] = attrs.field(factory=list)

    def __call__(self, writes: Sequence[FileWrite]) -> Deferred[None]:
        self.writes.append(writes)
        done: Deferred[None] = Deferred()
        self.pending.append(done)
        return done

    def finish(self) -> None:
        """The oldest write under way reaches the disk."""
        write_in_place(self.writes[len(self.writes) - len(self.pending)])
        self.pending.pop(0).callback(None)

    def fail(self) -> None:
        """The oldest write under way fails (a full disk)."""
        self.pending.pop(0).errback(OSError(28, "No space left on device"))

    def compactions(self) -> int:
        """How many of the writes made were a new snapshot (not an append)."""
        return sum(1 for each in self.writes if not each[0].append)


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
        return on_disk(self.file)

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
        answers then), though reads see it at once; so for one appended to
        the journal.
        """
        revoked = self.store.revoke("jti-1", 2e9, 1e9)
        self.assertTrue(self.successResultOf(self.store.is_revoked("jti-1", 1e9)))
        self.assertNoResult(revoked)
        self.clock.advance(0)
        self.assertNoResult(revoked)
        self.assertFalse(self.file.exists())
        self.writer.finish()
        self.successResultOf(revoked)
        appended = self.store.revoke("jti-2", 2e9, 1e9)
        self.clock.advance(0)
        self.assertNoResult(appended)
        self.assertTrue(self.writer.writes[-1][0].append)
        self.writer.finish()
        self.successResultOf(appended)
        self.assertEqual(self.saved()["revoked"], {"jti-1": 2e9, "jti-2": 2e9})
        for each in (self.file, self.store.journal):
            assert each is not None
            self.assertEqual(each.getPermissions().shorthand(), "rw-------")

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
        the next change writes everything again (a new snapshot: the
        journal's end is unknown).
        """
        self.store.revoke("j", 2e9, 1e9)
        self.clock.advance(0)
        self.writer.finish()
        changes = [self.store.revoke(f"j{i}", 2e9, 1e9) for i in range(3)]
        self.clock.advance(0)
        self.writer.fail()
        for change in changes:
            self.failureResultOf(change, OSError)
        self.flushLoggedErrors(OSError)
        again = self.store.revoke("j3", 2e9, 1e9)
        self.clock.advance(0)
        self.assertEqual(self.writer.compactions(), 2)
        self.writer.finish()
        self.successResultOf(again)
        self.assertEqual(sorted(self.saved()["revoked"]), ["j", "j0", "j1", "j2", "j3"])

    def test_key_and_pruning_reach_the_file(self) -> None:
        """
        A bridge's key replaces its record on disk, and expired records are
        gone from the files once a new snapshot is written.
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
        self.assertEqual(
            [(r["jti"], r["bridge_key"], r["code"]) for r in bridges["t"]],
            [("keep", KEY, ""), ("new", KEY, "")],
        )
        restarted = MemoryStore(path=self.file)
        self.assertEqual(
            [r.jti for r in self.successResultOf(restarted.bridges("t", 300.0))], ["keep", "new"]
        )
        compacting = MemoryStore(path=self.file, compact_at=0, compact_factor=0)
        self.successResultOf(compacting.revoke("x", 2e9, 300.0))
        self.assertNotIn(b'"old"', self.file.getContent())
        self.assertIn(b'"keep"', self.file.getContent())

    def test_only_changed_records_encoded(self) -> None:
        """
        A write encodes only the records that changed since the last one;
        the files still hold every session's bridges and numbers.
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
        self.assertEqual([r.jti for r in encoded], ["jti-3b"])
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


def pair(store: MemoryStore, session: str, jti: str) -> list[Deferred[Any]]:
    """What one pairing changes in the store: a number, a record, then its key."""
    peer = store.next_peer(session)
    fresh = attrs.evolve(record(1, jti), bridge_key="", code="123456")
    return [peer, store.add_bridge(session, fresh), store.set_bridge_key(session, 1, KEY)]


class JournalTests(SynchronousTestCase):
    """
    The pairings file as a snapshot and a journal of the changes since: what
    a restart recovers, what a crash leaves, and what a change costs to write.
    """

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.file = directory.child("pairings.json")
        self.journal = self.file.siblingExtension(".journal")
        self.writer = FakeWriter()

    def store(self, **settings: Any) -> MemoryStore:
        """A store on the test's files, writing each change as it is made."""
        store = MemoryStore(path=self.file, writer=self.writer, **settings)
        self.writer.pending.clear()
        return store

    def written(self, store: MemoryStore, change: Deferred[Any]) -> Any:
        """Finish the writes under way, then the change's result."""
        while self.writer.pending:
            self.writer.finish()
        return self.successResultOf(change)

    def test_restart_recovers_every_change(self) -> None:
        """
        Pairings, keys, revocations and bridge numbers appended to the
        journal (no new snapshot since the first write) are all there after
        a restart; a bridge that never presented its key is not.
        """
        store = self.store()
        self.written(store, store.revoke("first", 2e9, 1e9))
        for i in range(5):
            for change in pair(store, f"s{i}", f"jti-{i}"):
                self.written(store, change)
        unkeyed = attrs.evolve(record(2, "unkeyed"), bridge_key="")
        self.written(store, store.add_bridge("s0", unkeyed))
        self.written(store, store.revoke("jti-1", 2e9, 1e9))
        self.assertEqual(self.writer.compactions(), 1)
        self.assertEqual(len(self.journal.getContent().splitlines()), 1 + 12)
        restarted = MemoryStore(path=self.file)
        for i in range(5):
            listed = self.successResultOf(restarted.bridges(f"s{i}", 1e9))
            self.assertEqual(
                [(r.jti, r.bridge_key) for r in listed], [] if i == 1 else [(f"jti-{i}", KEY)]
            )
            self.assertEqual(self.successResultOf(restarted.next_peer(f"s{i}")), 2)
        self.assertTrue(self.successResultOf(restarted.is_revoked("first", 1e9)))
        self.assertTrue(self.successResultOf(restarted.is_revoked("jti-1", 1e9)))

    def test_torn_last_line_ignored(self) -> None:
        """
        A last line cut short by a crash (its write was never answered) is
        ignored, whole or in part; the next write is a new snapshot, not an
        append after it, and loses nothing.
        """
        store = self.store()
        for change in pair(store, "s", "jti-s"):
            self.written(store, change)
        whole = self.journal.getContent()
        torn = store.revoke("jti-s", 2e9, 1e9)
        self.writer.finish()
        self.successResultOf(torn)
        line = self.journal.getContent()[len(whole) :]
        for cut in (line[:-1], line[: len(line) // 2], b"\0" * len(line)):
            write_secret(self.journal, whole + cut)
            restarted = self.store()
            self.assertFalse(self.successResultOf(restarted.is_revoked("jti-s", 1e9)))
            self.written(restarted, restarted.revoke("other", 2e9, 1e9))
            self.assertFalse(self.writer.writes[-1][0].append)
            again = MemoryStore(path=self.file)
            self.assertTrue(self.successResultOf(again.is_revoked("other", 1e9)))
            self.assertEqual(
                [r.jti for r in self.successResultOf(again.bridges("s", 1e9))], ["jti-s"]
            )

    def test_damaged_line_before_the_last_refused(self) -> None:
        """
        A line that cannot be read followed by others was synced whole
        before them: damage since, which the relay refuses to start on
        rather than forget pairings silently.
        """
        store = self.store()
        for change in pair(store, "s", "jti-s"):
            self.written(store, change)
        header, *changes = self.journal.getContent().splitlines(keepends=True)
        write_secret(self.journal, header + b"{garbage\n" + b"".join(changes))
        self.assertRaises(ValueError, MemoryStore, path=self.file)

    def test_journal_of_another_snapshot_ignored(self) -> None:
        """
        After a crash between the new snapshot's rename and its journal's,
        the old journal is ignored: replayed over the new snapshot it would
        give a bridge number again.
        """
        store = self.store(compact_at=0, compact_factor=1e9)
        self.written(store, store.revoke("x", 2e9, 1e9))
        self.written(store, store.next_peer("s"))
        self.written(store, store.add_bridge("s", record(1, "a")))
        old = self.journal.getContent()
        self.written(store, store.next_peer("s"))
        self.written(store, store.add_bridge("s", record(2, "b")))
        self.assertEqual(json.loads(old.splitlines()[-1])["peers"], {"s": 1})
        store.compact_factor = 0
        self.written(store, store.revoke("y", 2e9, 1e9))
        write_secret(self.journal, old)
        restarted = MemoryStore(path=self.file)
        self.assertEqual(self.successResultOf(restarted.next_peer("s")), 3)

    def test_file_of_the_previous_version(self) -> None:
        """
        A pairings file written before the journal (no generation, no
        journal) loads as it did; the first write makes a snapshot and its
        journal, and appends follow.
        """
        old = {
            "revoked": {"gone": 2e9},
            "peers": {"s": 2},
            "bridges": {"s": [attrs.asdict(record(2, "kept"))]},
        }
        write_secret(self.file, json.dumps(old).encode())
        store = self.store()
        self.assertTrue(self.successResultOf(store.is_revoked("gone", 1e9)))
        self.written(store, store.revoke("new", 2e9, 1e9))
        self.written(store, store.revoke("newer", 2e9, 1e9))
        self.assertEqual([each[0].append for each in self.writer.writes], [False, True])
        restarted = MemoryStore(path=self.file)
        self.assertEqual(self.successResultOf(restarted.next_peer("s")), 3)
        self.assertEqual(
            [r.jti for r in self.successResultOf(restarted.bridges("s", 1e9))], ["kept"]
        )
        for jti in ("gone", "new", "newer"):
            self.assertTrue(self.successResultOf(restarted.is_revoked(jti, 1e9)))

    def test_compaction(self) -> None:
        """
        Once the journal outgrows the snapshot by the factor, the next write
        is a new snapshot holding everything and an empty journal; the
        writes between are appends.
        """
        store = self.store(compact_at=4096, compact_factor=2)
        for i in range(40):
            for change in pair(store, f"s{i}", f"jti-{i}"):
                self.written(store, change)
        kinds = [each[0].append for each in self.writer.writes]
        self.assertEqual(kinds[0], False)
        self.assertGreater(self.writer.compactions(), 1)
        self.assertGreater(kinds.count(True), 40)
        last = max(i for i, append in enumerate(kinds) if not append)
        written = self.writer.writes[last]
        self.assertEqual([w.path for w in written], [self.file, self.journal])
        snapshot = json.loads(written[0].data)
        self.assertEqual(json.loads(written[1].data), {"generation": snapshot["generation"]})
        self.assertLessEqual(
            len(self.journal.getContent()), max(4096, 2 * len(self.file.getContent()))
        )
        restarted = MemoryStore(path=self.file)
        for i in range(40):
            listed = self.successResultOf(restarted.bridges(f"s{i}", 1e9))
            self.assertEqual([(r.jti, r.bridge_key) for r in listed], [(f"jti-{i}", KEY)])

    def test_append_proportional_to_the_change(self) -> None:
        """
        What a pairing appends does not grow with the sessions held: the
        same bytes with 1,000 held as with 10.
        """
        store = self.store(compact_at=10**9)
        appended = []
        for i in range(1000):
            start = len(self.writer.writes)
            for change in pair(store, f"session-{i:04}", f"jti-{i:04}"):
                self.written(store, change)
            appended.append(sum(len(w[0].data) for w in self.writer.writes[start:]))
        self.assertEqual(self.writer.compactions(), 1)
        self.assertEqual(appended[10], appended[999])
        self.assertLess(appended[999], 1024)


class WithoutClockTests(SynchronousTestCase):
    """Without a clock every change is written before its method returns."""

    def test_written_at_once(self) -> None:
        """Each change is one write, done when its Deferred is returned."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("pairings.json")
        writes: list[Sequence[FileWrite]] = []

        def writer(each: Sequence[FileWrite]) -> Deferred[None]:
            writes.append(each)
            return write_in_place(each)

        store = MemoryStore(path=path, writer=writer)
        self.successResultOf(store.revoke("a", 2e9, 1e9))
        self.successResultOf(store.revoke("b", 2e9, 1e9))
        self.assertEqual(len(writes), 2)
        self.assertEqual(json.loads(writes[1][0].data)["revoked"], {"b": 2e9})
        self.assertEqual(on_disk(path)["revoked"], {"a": 2e9, "b": 2e9})
