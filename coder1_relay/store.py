"""
The relay's shared state, behind one small interface.

Pairing codes, rate-limit windows, revocations, paired bridges and presence
are all the state a relay keeps (besides telemetry).  Nothing else reaches
into it, so a shared implementation (several relay processes, one
deployment: C{coder1_relay.redis_store}) can replace L{MemoryStore} without
touching the callers.  Every method returns a Deferred, as a networked store
would, and may fail with L{StoreUnavailable}.

Durability (group commit): a change that must outlive a restart (a
revocation, a paired bridge, its key) is made in memory at once, so every
later read sees it, and its Deferred fires only once the file that holds it
has been written and synced.  Changes made while a write is waiting for the
next reactor turn, or while one is under way, share the next write: however
many pairings or revocations arrive together, they are written once, not
once each.  So a revocation is on disk before the API says it is done, and a
busy relay writes at most one file at a time.

On disk (a journal): the state is a snapshot (C{pairings.json}) and the
changes made since (C{pairings.json.journal}), one line per write holding
the records that write changed, appended and synced.  So a pairing costs a
write of its own records, not of every session held.  When the journal has
grown past C{compact_factor} times the snapshot, the next write is a new
snapshot and a new journal (each written whole and renamed into place).
The journal's first line names its snapshot's generation; a journal of
another generation (a crash between the two renames) is ignored, its
changes being in the snapshot.  A last line cut short by a crash is
ignored: no caller of that write had been answered.
"""

from __future__ import annotations

import bisect
import json
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from coder1_wire.secretfile import append_secret, write_secret


class StoreUnavailable(Exception):
    """
    The store cannot answer now (a shared store that is unreachable, or did
    not answer in time).  The web layer answers 503: try again later.
    """


@attrs.frozen
class PendingCode:
    """A live pairing code: its browser session and that browser's public identity key."""

    session: str
    browser_key: str
    expires_at: float


@attrs.frozen
class BridgeRecord:
    """
    A bridge paired with a browser session (what the token was issued for),
    with the bridge's public identity key as it gave it at pairing.
    """

    peer: int
    jti: str
    label: str
    paired_at: float
    expires_at: float
    #: Empty until the bridge presents it, right after redeeming C{code}.
    bridge_key: str = ""
    code: str = ""


@attrs.frozen
class Presence:
    """A bridge connected right now."""

    peer: int
    label: str
    version: str
    since: float
    bridge_key: str


class IRelayStore(Interface):
    """All the relay's state but telemetry."""

    def add_code(code: str, pending: PendingCode, now: float) -> Deferred[bool]:
        """
        Make C{code} live for C{pending.session} until C{pending.expires_at}.

        @return: False (and change nothing) when C{code} is live already.
        """

    def take_code(code: str, now: float) -> Deferred[PendingCode | None]:
        """
        Atomically consume a live code: of any number of concurrent calls for
        one code, exactly one gets it; the rest get None, as do expired and
        unknown codes.
        """

    def hit(key: str, now: float, window: float, limit: int) -> Deferred[float | None]:
        """
        Count one event against C{key}'s sliding window, if there is room.

        @return: None when counted; otherwise the seconds until there is room
            (nothing is counted then).
        """

    def count(key: str, now: float, window: float) -> Deferred[int]:
        """How many events C{key} has in the window ending at C{now}."""

    def release(key: str, now: float) -> Deferred[None]:
        """
        Take back one event counted against C{key} at C{now} by L{hit}: a
        place reserved in the window before an attempt that turned out not
        to count.  Nothing happens when there is no such event.
        """

    def revoke(jti: str, expires_at: float, now: float) -> Deferred[None]:
        """Revoke a token id until C{expires_at} (after which it is dead anyway)."""

    def is_revoked(jti: str, now: float) -> Deferred[bool]:
        """Whether a token id is revoked (until the C{expires_at} it was revoked with)."""

    def next_peer(session: str) -> Deferred[int]:
        """A bridge number not used before in C{session} (1, 2, ...)."""

    def add_bridge(session: str, record: BridgeRecord) -> Deferred[None]:
        """Remember a bridge paired with C{session}."""

    def set_bridge_key(session: str, peer: int, bridge_key: str) -> Deferred[BridgeRecord | None]:
        """
        Record bridge C{peer}'s public key, once (and forget its code).

        @return: the updated record, or None when there is no such bridge or
            it has a key already.
        """

    def bridges(session: str, now: float) -> Deferred[list[BridgeRecord]]:
        """The bridges paired with C{session} whose tokens are neither expired nor revoked."""

    def set_presence(session: str, presence: Presence) -> Deferred[None]:
        """Mark a bridge of C{session} connected."""

    def clear_presence(session: str, peer: int) -> Deferred[None]:
        """Mark a bridge of C{session} disconnected."""

    def clear_all_presence(session: str) -> Deferred[None]:
        """
        Mark every bridge of C{session} disconnected at once (a relay
        process that finds another's presence entries stale).
        """

    def presence(session: str) -> Deferred[list[Presence]]:
        """The bridges of C{session} connected right now."""


#: How many rate-limit hits between sweeps of empty windows.
SWEEP_EVERY = 1024


#: The journal may grow to this many bytes before it is compacted, however small the snapshot.
COMPACT_AT = 64 * 1024
#: And to this many times the snapshot's size.
COMPACT_FACTOR = 2.0


@attrs.frozen
class FileWrite:
    """
    One durable write: replace C{path} with C{data} (atomically, mode 0600),
    or append C{data} to it and sync it.
    """

    path: FilePath[str]
    data: bytes
    append: bool = False

    def run(self) -> None:
        """Do it, in the calling thread: on disk when this returns."""
        if self.append:
            append_secret(self.path, self.data)
        else:
            write_secret(self.path, self.data)


#: Does one group commit's writes, in order, and fires once they are on disk.
Writer = Callable[[Sequence[FileWrite]], "Deferred[None]"]


def _run_all(writes: Sequence[FileWrite]) -> None:
    for write in writes:
        write.run()


def write_in_place(writes: Sequence[FileWrite]) -> Deferred[None]:
    """The default L{Writer}: the writes in the calling thread."""
    return maybeDeferred(_run_all, writes)


def write_in_thread(reactor: IReactorThreads) -> Writer:
    """
    A L{Writer} that runs the writes in C{reactor}'s thread pool, so that the
    event loop goes on while the disk syncs (the store never has two writes
    under way, so they cannot overtake each other).
    """

    def write(writes: Sequence[FileWrite]) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), _run_all, writes)

    return write


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@implementer(IRelayStore)
@attrs.define
class MemoryStore:
    """
    The default store: one process's memory.  When C{path} is given, what must
    outlive a restart (revocations, paired bridges, bridge numbers: no content)
    is also kept in that file and its journal (see the module's docstring),
    mode 0600, so a restarted relay still lists and can revoke the bridges
    whose tokens it issued, and never reuses a number.

    With a C{clock}, changes share writes (group commit, see the module's
    docstring): the write happens one reactor turn after the first change
    that needs it, or as soon as the write under way is done.  Without one,
    each change is written before its method returns (tests, tools).
    C{writer} does the writing (the relay's service passes one that runs in a
    thread, so that the event loop does not wait for the disk).
    """

    path: FilePath[str] | None = None
    clock: IReactorTime | None = None
    writer: Writer = write_in_place
    compact_at: int = COMPACT_AT
    compact_factor: float = COMPACT_FACTOR
    _codes: dict[str, PendingCode] = attrs.field(factory=dict)
    #: Per key: the window's length and its events, oldest first (a list: a few
    #: events each, and a deque costs 600 bytes even empty).
    _windows: dict[str, tuple[float, list[float]]] = attrs.field(factory=dict)
    _hits: int = 0
    _revoked: dict[str, float] = attrs.field(factory=dict)
    _peers: dict[str, int] = attrs.field(factory=dict)
    _bridges: dict[str, dict[int, BridgeRecord]] = attrs.field(factory=dict)
    _presence: dict[str, dict[int, Presence]] = attrs.field(factory=dict)
    #: The earliest expiry of a revocation or bridge record: nothing to prune before it.
    _next_expiry: float = math.inf
    #: What changed since the last write, in order (dicts as ordered sets): the
    #: revocations, the sessions' bridge numbers and the bridge records the
    #: next journal line holds.
    _new_revoked: dict[str, None] = attrs.field(factory=dict)
    _new_peers: dict[str, None] = attrs.field(factory=dict)
    _new_records: dict[tuple[str, int], None] = attrs.field(factory=dict)
    #: The sizes of the snapshot and the journal on disk (or being written).
    _snapshot_size: int = 0
    _journal_size: int = 0
    #: The next write is a new snapshot and journal: there is no journal of
    #: this snapshot yet, its end may be cut short, or a write failed.
    _compact_next: bool = True
    #: Callers whose changes are made but not yet written; the next write is theirs.
    _waiting: list[Deferred[None]] = attrs.field(factory=list)
    #: The next write, scheduled for the next reactor turn.
    _flush_call: IDelayedCall | None = None
    #: The callers of the write under way (None when none is).
    _writing: list[Deferred[None]] | None = None
    log: Logger = attrs.field(factory=Logger, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.path is None or not self.path.exists():
            return
        content = self.path.getContent()
        saved: dict[str, Any] = json.loads(content)
        self._merge(saved)
        self._snapshot_size = len(content)
        self._compact_next = not self._replay(saved.get("generation"))
        # Records from before end-to-end encryption, or whose bridge had not
        # presented its key, have none: their bridges must pair again.
        self._bridges = {
            session: keyed
            for session, records in self._bridges.items()
            if (keyed := {p: r for p, r in records.items() if r.bridge_key})
        }
        self._next_expiry = self._earliest_expiry()

    @property
    def journal(self) -> FilePath[str] | None:
        """The file of the changes made since the snapshot C{path}."""
        return None if self.path is None else self.path.siblingExtension(".journal")

    def _merge(self, saved: dict[str, Any]) -> None:
        """Apply a snapshot, or a journal line (the same keys, only what changed)."""
        self._revoked.update({str(k): float(v) for k, v in saved["revoked"].items()})
        self._peers.update({str(k): int(v) for k, v in saved["peers"].items()})
        for session, records in saved["bridges"].items():
            mine = self._bridges.setdefault(str(session), {})
            for r in records:
                mine[int(r["peer"])] = BridgeRecord(**r)

    def _replay(self, generation: str | None) -> bool:
        """
        Apply the journal of the snapshot of C{generation}, if there is one.

        @return: whether the next change may be appended to it (it is this
            snapshot's, and whole).
        """
        journal = self.journal
        assert journal is not None
        if generation is None or not journal.exists():
            return False
        content = journal.getContent()
        lines = content.split(b"\n")
        # Empty after a whole last line; else the start of a write that was never synced.
        tail = lines.pop()
        if not lines or json.loads(lines[0]) != {"generation": generation}:
            return False
        for number, line in enumerate(lines[1:], start=2):
            try:
                change = json.loads(line)
            except ValueError:
                if number < len(lines) or tail:
                    raise  # synced whole before a later write began: damaged since
                return False  # the last write's, never synced whole
            self._merge(change)
        self._journal_size = len(content)
        return not tail

    def _earliest_expiry(self) -> float:
        return min(
            (
                *self._revoked.values(),
                *(r.expires_at for records in self._bridges.values() for r in records.values()),
            ),
            default=math.inf,
        )

    def _prune(self, now: float) -> None:
        """
        Drop what expired (its tokens are dead anyway); a scan only once
        something has.  The files keep them until the next snapshot.
        """
        if now < self._next_expiry:
            return
        self._revoked = {j: exp for j, exp in self._revoked.items() if exp > now}
        for session, records in list(self._bridges.items()):
            live = {p: r for p, r in records.items() if r.expires_at > now}
            if len(live) == len(records):
                continue
            if live:
                self._bridges[session] = live
            else:
                del self._bridges[session]
        self._next_expiry = self._earliest_expiry()

    def _changed(self, now: float) -> Deferred[None]:
        """
        The durable part changed (in memory, already): prune, and fire the
        Deferred returned once the change is on disk.
        """
        self._prune(now)
        if self.path is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        if self._flush_call is None and self._writing is None:
            if self.clock is None:
                self._flush()
            else:
                self._flush_call = self.clock.callLater(0, self._flush)
        return done

    def _journal_line(self) -> bytes:
        """What changed since the last write, as one journal line (and forget it)."""
        bridges: dict[str, list[dict[str, Any]]] = {}
        for session, peer in self._new_records:
            record = self._bridges.get(session, {}).get(peer)
            if record is not None:  # else pruned since: dead anyway
                bridges.setdefault(session, []).append(attrs.asdict(record))
        line = _encode(
            {
                "revoked": {j: self._revoked[j] for j in self._new_revoked if j in self._revoked},
                "peers": {s: self._peers[s] for s in self._new_peers},
                "bridges": bridges,
            }
        )
        self._new_revoked.clear()
        self._new_peers.clear()
        self._new_records.clear()
        return line + b"\n"

    def _compaction(self, path: FilePath[str], journal: FilePath[str]) -> list[FileWrite]:
        """
        A new snapshot of the whole state, then its journal, empty: the old
        journal's changes are in the snapshot, and it is ignored from the
        moment the snapshot replaces the old one.
        """
        generation = secrets.token_hex(8)
        bridges = {
            session: [attrs.asdict(r) for r in records.values()]
            for session, records in self._bridges.items()
        }
        snapshot = _encode(
            {
                "generation": generation,
                "revoked": self._revoked,
                "peers": self._peers,
                "bridges": bridges,
            }
        )
        header = _encode({"generation": generation}) + b"\n"
        self._snapshot_size, self._journal_size = len(snapshot), len(header)
        self._compact_next = False
        return [FileWrite(path, snapshot), FileWrite(journal, header)]

    def _flush(self) -> None:
        """Write everything once for all waiting callers; then those who came meanwhile."""
        self._flush_call = None
        batch, self._waiting = self._waiting, []
        self._writing = batch
        maybeDeferred(self._write).addBoth(self._written, batch)

    def _write(self) -> Deferred[None]:
        path, journal = self.path, self.journal
        assert path is not None and journal is not None
        line = self._journal_line()
        limit = max(self.compact_at, self.compact_factor * self._snapshot_size)
        if self._compact_next or self._journal_size + len(line) > limit:
            return self.writer(self._compaction(path, journal))
        self._journal_size += len(line)
        return self.writer([FileWrite(journal, line, append=True)])

    def _written(self, result: Failure | None, batch: list[Deferred[None]]) -> None:
        self._writing = None
        if isinstance(result, Failure):
            # What it held is in memory; the journal's end is unknown: write all anew.
            self._compact_next = True
            self.log.failure(
                "writing {path} failed", result, path=self.path.path if self.path else ""
            )
        for each in batch:
            if isinstance(result, Failure):
                each.errback(result)
            else:
                each.callback(None)
        if self._waiting and self._writing is None and self._flush_call is None:
            if self.clock is None:
                self._flush()
            else:
                self._flush_call = self.clock.callLater(0, self._flush)

    def flushed(self) -> Deferred[None]:
        """Fires once every change made so far is on disk (or its write failed)."""
        pending = self._waiting or self._writing
        if not pending:
            return succeed(None)
        done: Deferred[None] = Deferred()
        pending.append(done)
        done.addErrback(lambda _: None)
        return done

    def add_code(self, code: str, pending: PendingCode, now: float) -> Deferred[bool]:
        live = self._codes.get(code)
        if live is not None and live.expires_at > now:
            return succeed(False)
        self._codes[code] = pending
        return succeed(True)

    def take_code(self, code: str, now: float) -> Deferred[PendingCode | None]:
        self._forget_expired_codes(now)
        pending = self._codes.pop(code, None)
        if pending is None or pending.expires_at <= now:
            return succeed(None)
        return succeed(pending)

    def _forget_expired_codes(self, now: float) -> None:
        for code in [c for c, p in self._codes.items() if p.expires_at <= now]:
            del self._codes[code]

    def _window(self, key: str, now: float, window: float) -> list[float]:
        events = self._windows.get(key, (window, []))[1]
        gone = bisect.bisect_right(events, now - window)
        if gone:
            del events[:gone]
        return events

    def _sweep(self, now: float) -> None:
        """Forget windows with nothing left in them: keys name every session and address."""
        self._windows = {
            key: (window, events)
            for key, (window, events) in self._windows.items()
            if events and events[-1] > now - window
        }

    def hit(self, key: str, now: float, window: float, limit: int) -> Deferred[float | None]:
        self._hits += 1
        if self._hits % SWEEP_EVERY == 0:
            self._sweep(now)
        events = self._window(key, now, window)
        if len(events) >= limit:
            return succeed(events[len(events) - limit] + window - now)
        events.append(now)
        self._windows[key] = (window, events)
        return succeed(None)

    def count(self, key: str, now: float, window: float) -> Deferred[int]:
        return succeed(len(self._window(key, now, window)))

    def release(self, key: str, now: float) -> Deferred[None]:
        events = self._windows.get(key, (0.0, []))[1]
        at = bisect.bisect_left(events, now)
        if at < len(events) and events[at] == now:
            del events[at]
        return succeed(None)

    def revoke(self, jti: str, expires_at: float, now: float) -> Deferred[None]:
        self._revoked[jti] = expires_at
        self._new_revoked[jti] = None
        self._next_expiry = min(self._next_expiry, expires_at)
        return self._changed(now)

    def is_revoked(self, jti: str, now: float) -> Deferred[bool]:
        return succeed(self._revoked.get(jti, now) > now)

    def next_peer(self, session: str) -> Deferred[int]:
        self._peers[session] = self._peers.get(session, 0) + 1
        self._new_peers[session] = None
        return succeed(self._peers[session])

    def add_bridge(self, session: str, record: BridgeRecord) -> Deferred[None]:
        self._bridges.setdefault(session, {})[record.peer] = record
        self._new_records[session, record.peer] = None
        self._next_expiry = min(self._next_expiry, record.expires_at)
        return self._changed(record.paired_at)

    def set_bridge_key(
        self, session: str, peer: int, bridge_key: str
    ) -> Deferred[BridgeRecord | None]:
        record = self._bridges.get(session, {}).get(peer)
        if record is None or record.bridge_key:
            return succeed(None)
        self._bridges[session][peer] = attrs.evolve(record, bridge_key=bridge_key, code="")
        self._new_records[session, peer] = None
        updated = attrs.evolve(record, bridge_key=bridge_key)
        return self._changed(record.paired_at).addCallback(lambda _: updated)

    def bridges(self, session: str, now: float) -> Deferred[list[BridgeRecord]]:
        live = [
            r
            for r in self._bridges.get(session, {}).values()
            if r.expires_at > now and r.jti not in self._revoked
        ]
        return succeed(sorted(live, key=lambda r: r.peer))

    def set_presence(self, session: str, presence: Presence) -> Deferred[None]:
        self._presence.setdefault(session, {})[presence.peer] = presence
        return succeed(None)

    def clear_presence(self, session: str, peer: int) -> Deferred[None]:
        self._presence.get(session, {}).pop(peer, None)
        return succeed(None)

    def clear_all_presence(self, session: str) -> Deferred[None]:
        self._presence.pop(session, None)
        return succeed(None)

    def presence(self, session: str) -> Deferred[list[Presence]]:
        return succeed(sorted(self._presence.get(session, {}).values(), key=lambda p: p.peer))
