"""
Content-free telemetry for the relay: counts, timestamps and versions.

Every string written to the database is from a fixed vocabulary: a role, a
counter name, a reason, a name in the relay's own copy of the bridge's code
(L{coder1_relay.code_names}), or a version made of digits and PEP 440's
markers; so no command text, output, path or environment value can end up in
it, whatever a party sends.  The relay's connection ids stay in memory; rows
get their own numbers.

Everything is bounded: crash reports by their size, by a daily budget per
bridge, per session and in all (L{coder1_relay.crash_budget}); the file by
C{TelemetrySettings.max_bytes}, past which new rows are dropped and counted.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coder1_relay.code_names import CodeNames
from coder1_relay.crash_budget import CrashBudget, CrashBudgetPolicy
from coder1_wire.crash import is_version, sanitize_crash_report

if TYPE_CHECKING:  # txredisapi is an extra
    from coder1_relay.redis_telemetry import RedisTelemetry

log = Logger()

_Row = Sequence[object]

ROLES = frozenset({"ide", "bridge"})
#: Why the relay throttled or refused a client (the label of the C{throttled} counter):
#: C{rate} a connection sent too fast, C{connections} one IP opened too many,
#: C{sessions} a browser session has too many tabs or bridges, C{pairing} the
#: pairing API said 429, C{timeout} a client was too slow with TLS or a request.
THROTTLE_REASONS = frozenset({"rate", "connections", "sessions", "pairing", "timeout"})
INVALID_VERSION = "invalid"
#: The label of versions past L{MAX_VERSIONS} distinct ones in an hour.
OTHER_VERSION = "other"
MAX_VERSIONS = 16
#: Why a crash report was not kept (the label of C{crash_report_dropped}):
#: C{budget} its bridge's, session's or the relay's daily budget was used up,
#: C{pending} too many waited for the next write, C{full} the database is at its cap.
DROP_REASONS = frozenset({"budget", "pending", "full"})
#: How long rows are kept: 30 days.
RETENTION = 30 * 86400
#: Counters are kept per hour: enough for an operator, coarse for everyone else.
PERIOD = 3600
#: Valid crash reports held between two flushes; more are counted, not kept.
MAX_PENDING_CRASHES = 100
#: How far back, and how many rows, a snapshot reads.
_RECENT = 86400
_RECENT_ROWS = 100

_SETUP = """
PRAGMA secure_delete = ON;  -- pruned rows are overwritten, not left in free pages
CREATE TABLE IF NOT EXISTS connections (
    id INTEGER PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('ide', 'bridge')),
    opened_at REAL NOT NULL,
    closed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS connections_closed_at ON connections (closed_at);
CREATE TABLE IF NOT EXISTS counts (
    period INTEGER NOT NULL,  -- start of the hour, unix seconds
    name TEXT NOT NULL,
    label TEXT NOT NULL,      -- '', a version or 'invalid' (bridge_version), a reason (throttled)
    value INTEGER NOT NULL,
    PRIMARY KEY (period, name, label)
);
CREATE TABLE IF NOT EXISTS crash_reports (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    type TEXT NOT NULL,       -- a name in the relay's copy of the bridge's code, or '?'
    version TEXT NOT NULL,
    frames TEXT NOT NULL,     -- JSON: [{module, function, line}], names as for type
    signature TEXT NOT NULL   -- 16 hex digits of SHA-256 over type and frames
);
CREATE INDEX IF NOT EXISTS crash_reports_received_at ON crash_reports (received_at);
"""
#: Crash rows of a relay before this schema could hold names a bridge chose: deleted.
_MIGRATE = (
    "DROP TABLE IF EXISTS crash_reports",
    "DROP INDEX IF EXISTS crash_reports_received_at",
)
_ADD_COUNT = """
INSERT INTO counts (period, name, label, value) VALUES (?, ?, ?, ?)
ON CONFLICT (period, name, label) DO UPDATE SET value = value + excluded.value
"""
_ADD_CONNECTION = "INSERT INTO connections (role, opened_at, closed_at) VALUES (?, ?, ?)"
_ADD_CRASH = (
    "INSERT INTO crash_reports (received_at, type, version, frames, signature)"
    " VALUES (?, ?, ?, ?, ?)"
)
_PRUNE = (
    "DELETE FROM connections WHERE closed_at < ?",
    "DELETE FROM counts WHERE period < ?",
    "DELETE FROM crash_reports WHERE received_at < ?",
)


class Count(enum.Enum):
    """The names of the counters: the only names the counts table holds."""

    COMMAND_STARTED = "command_started"
    COMMAND_COMPLETED = "command_completed"
    #: Bridge connections, labelled with the bridge's version.
    BRIDGE_VERSION = "bridge_version"
    CRASH_REPORT_REFUSED = "crash_report_refused"
    #: Labelled with a C{DROP_REASONS} word.
    CRASH_REPORT_DROPPED = "crash_report_dropped"
    #: Closed connections not written: the database is at its cap.
    CONNECTION_DROPPED = "connection_dropped"
    #: Clients throttled or refused by a limit, labelled with a C{THROTTLE_REASONS} word.
    THROTTLED = "throttled"


class ClockLike(Protocol):
    """
    The part of L{IReactorTime} used here, as a Protocol: without the mypy-zope
    plugin, mypy takes neither the reactor nor L{Clock<twisted.internet.task.Clock>}
    for an L{IReactorTime}, but it matches both to this.
    """

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall: ...


@attrs.frozen
class TelemetrySettings:
    """What an operator chooses (C{--telemetry-max-size})."""

    #: The database file's size, at most.  New rows stop a little below it (a
    #: quarter of it, at most 4 MiB, is kept for the hourly counts); past that they
    #: are dropped and counted.
    max_bytes: int = 32 * 1024 * 1024
    crash_budget: CrashBudgetPolicy = CrashBudgetPolicy()


@attrs.frozen
class _Open:
    """A connection the relay has open; written only once it closes."""

    role: str
    opened_at: float


class Telemetry(Service):
    """
    Counts what happens on the relay, in memory, and writes it to SQLite every
    C{flush_interval} seconds and when stopped; rows older than C{retention}
    seconds are deleted at start and every C{prune_interval} seconds.

    SQLite is used synchronously: a flush is one small transaction on a local
    file.  Telemetry is best effort: a failed write is logged and its batch
    dropped, never raised into the relay.
    """

    def __init__(
        self,
        db_path: str | None,
        clock: ClockLike,
        *,
        retention: float = RETENTION,
        flush_interval: float = 10.0,
        prune_interval: float = 3600.0,
        settings: TelemetrySettings = TelemetrySettings(),
        code_names: CodeNames | None = None,
        shared: RedisTelemetry | None = None,
    ) -> None:
        self._db_path = db_path
        self._clock = clock
        self._retention = retention
        self._flush_interval = flush_interval
        self._prune_interval = prune_interval
        self._settings = settings
        self._names = code_names
        self._budget = CrashBudget(clock, settings.crash_budget)
        self._versions: tuple[int, set[str]] = (-1, set())
        #: With several relay processes: where they all write, instead of SQLite.
        self._shared = shared
        self._db: sqlite3.Connection | None = None
        self._live: dict[str, _Open] = {}
        self._counts: Counter[tuple[int, Count, str]] = Counter()
        self._closed: list[_Row] = []
        self._crashes: list[_Row] = []
        #: Throttles by reason since the start, for the metrics (C{coder1_relay.metrics}).
        self.throttle_totals: Counter[str] = Counter()
        self._flusher = LoopingCall(self._flush_on_time)
        self._flusher.clock = cast(IReactorTime, clock)
        self._pruner = LoopingCall(self._prune)
        self._pruner.clock = cast(IReactorTime, clock)

    def startService(self) -> None:
        # Opened here rather than in __init__: twistd starts services after
        # dropping privileges, so the file belongs to the relay's user.
        if self._shared is None:
            self._db = _open(self._db_path, self._settings.max_bytes)
        super().startService()
        where = "the shared store" if self._shared else self._db_path or "memory"
        log.info("Telemetry in {where}", where=where)
        self._pruner.start(self._prune_interval, now=True)
        self._flusher.start(self._flush_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Write what is pending; fires once it is written (to Redis, when shared)."""
        if not self.running:
            return succeed(None)
        super().stopService()
        for loop in (self._flusher, self._pruner):
            if loop.running:  # not when startService failed part way
                loop.stop()
        # The relay is going away and its connections with it.
        for connection_id in list(self._live):
            self.connection_closed(connection_id)
        written = self._flush()
        if self._db is not None:
            self._db.close()
            self._db = None
        return written

    def connection_opened(self, role: str, connection_id: str) -> None:
        """A party connected; C{connection_id} is the relay's own opaque id."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self._live.setdefault(connection_id, _Open(role, self._clock.seconds()))

    def connection_closed(self, connection_id: str) -> None:
        """A connection ended; an id this service never saw is ignored."""
        opened = self._live.pop(connection_id, None)
        if opened is not None:
            self._closed.append((opened.role, opened.opened_at, self._clock.seconds()))

    def command_started(self) -> None:
        """The IDE started a command on a bridge."""
        self._count(Count.COMMAND_STARTED)

    def command_completed(self) -> None:
        """A command ended."""
        self._count(Count.COMMAND_COMPLETED)

    def bridge_version(self, version: str) -> None:
        """
        A bridge connected with this version: anything unlike a version counts
        as invalid, and past L{MAX_VERSIONS} distinct ones in an hour as other.
        """
        period = self._period()
        if self._versions[0] != period:
            self._versions = (period, set())
        seen = self._versions[1]
        if not is_version(version):
            version = INVALID_VERSION
        elif version not in seen and len(seen) >= MAX_VERSIONS:
            version = OTHER_VERSION
        else:
            seen.add(version)
        self._count(Count.BRIDGE_VERSION, version)

    def throttled(self, reason: str) -> None:
        """A limit throttled or refused a client, for C{reason} (one of C{THROTTLE_REASONS})."""
        if reason not in THROTTLE_REASONS:
            raise ValueError(f"unknown throttle reason {reason!r}")
        self.throttle_totals[reason] += 1
        self._count(Count.THROTTLED, reason)

    def crash_report(self, report: object, session: str = "", peer: int = 0) -> bool:
        """
        Keep what the relay may of bridge C{peer} of C{session}'s crash
        report: if it passes L{sanitize_crash_report} and the day's budget
        allows, its names that the relay's copy of the bridge's code holds.

        @return: whether it will be stored.
        """
        clean = sanitize_crash_report(report)
        if clean is None:
            self.crash_report_refused()
            log.info("refused a malformed crash report from a bridge")
            return False
        if not self._budget.take(session, peer):
            self._count(Count.CRASH_REPORT_DROPPED, "budget")
            return False
        if len(self._crashes) >= MAX_PENDING_CRASHES:
            self._count(Count.CRASH_REPORT_DROPPED, "pending")
            return False
        # Read at the first report, not at start: the vocabulary's reading churns through
        # the packages' code objects, which leaves the relay about 1 MiB larger for good.
        names = self._names if self._names is not None else CodeNames.of_packages()
        self._names = names
        kept = names.keep(clean)
        frames = json.dumps(kept["frames"], separators=(",", ":"))
        self._crashes.append(
            (self._clock.seconds(), kept["type"], kept["version"], frames, kept["signature"])
        )
        return True

    def crash_report_refused(self) -> None:
        """A bridge sent something that is not a crash report (malformed or too large)."""
        self._count(Count.CRASH_REPORT_REFUSED)

    def snapshot(self) -> dict[str, object]:
        """Open connections, unwritten counters and recently written rows."""
        since = self._clock.seconds() - _RECENT
        return {
            "open_connections": {
                role: sum(o.role == role for o in self._live.values()) for role in sorted(ROLES)
            },
            "pending": {
                "counts": [
                    {"period": period, "name": name.value, "label": label, "value": value}
                    for (period, name, label), value in self._counts.items()
                ],
                "connections": len(self._closed),
                "crash_reports": len(self._crashes),
            },
            "counts": self._query(
                "SELECT period, name, label, value FROM counts WHERE period >= ?"
                " ORDER BY period, name, label",
                since,
            ),
            "connections": self._query(
                "SELECT role, opened_at, closed_at FROM connections WHERE closed_at >= ?"
                " ORDER BY closed_at DESC LIMIT ?",
                since,
                _RECENT_ROWS,
            ),
            "crash_reports": [
                {**row, "frames": json.loads(str(row["frames"]))}
                for row in self._query(
                    "SELECT received_at, type, version, frames, signature FROM crash_reports"
                    " WHERE received_at >= ? ORDER BY received_at DESC LIMIT ?",
                    since,
                    _RECENT_ROWS,
                )
            ],
        }

    def _period(self) -> int:
        return int(self._clock.seconds() // PERIOD) * PERIOD

    def _count(self, name: Count, label: str = "", by: int = 1) -> None:
        self._counts[self._period(), name, label] += by

    def _flush_on_time(self) -> None:
        """The timer's flush: the next comes on time, whether or not Redis has answered."""
        self._flush()

    def _flush(self) -> Deferred[None]:
        if self._shared is not None:
            return self._flush_shared(self._shared)
        if self._db is None:
            return succeed(None)
        closed, self._closed = self._closed, []
        crashes, self._crashes = self._crashes, []
        if closed or crashes:
            max_bytes = self._settings.max_bytes
            full = _used_bytes(self._db) >= max_bytes - min(max_bytes // 4, _HEADROOM)
            # Past the soft cap, or at the file's hard one: dropped and counted.
            if full or not _write(self._db, [(_ADD_CONNECTION, closed), (_ADD_CRASH, crashes)]):
                if crashes:
                    self._count(Count.CRASH_REPORT_DROPPED, "full", len(crashes))
                if closed:
                    self._count(Count.CONNECTION_DROPPED, "", len(closed))
        # The counts: a few rows an hour, from fixed vocabularies, in the room kept for them.
        counts, self._counts = self._counts, Counter()
        _write(self._db, [(_ADD_COUNT, [(p, n.value, lb, v) for (p, n, lb), v in counts.items()])])
        return succeed(None)

    def _flush_shared(self, shared: RedisTelemetry) -> Deferred[None]:
        closed, self._closed = self._closed, []
        crashes, self._crashes = self._crashes, []
        counts, self._counts = self._counts, Counter()
        if not (closed or crashes or counts):
            return succeed(None)
        named = {(p, n.value, lb): v for (p, n, lb), v in counts.items()}

        def dropped(n: int) -> None:
            if n:
                self._count(Count.CRASH_REPORT_DROPPED, "full", n)

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, FirstError):
                error = error.subFailure.value
            log.warn("Telemetry not written ({why}); this batch is dropped", why=str(error))

        return shared.write(named, closed, crashes).addCallbacks(dropped, failed)

    def _prune(self) -> None:
        if self._db is not None:
            cutoff = self._clock.seconds() - self._retention
            _write(self._db, [(statement, [(cutoff,)]) for statement in _PRUNE])

    def _query(self, sql: str, *params: object) -> list[dict[str, object]]:
        if self._db is None:
            return []
        cursor = self._db.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


#: Room below C{max_bytes} kept for the counts, at most.
_HEADROOM = 4 * 1024 * 1024


def _used_bytes(db: sqlite3.Connection) -> int:
    """The bytes of the database's pages in use (free pages are reused first)."""
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


def _open(path: str | None, max_bytes: int) -> sqlite3.Connection:
    if path is None:
        db = sqlite3.connect(":memory:")
    else:
        # Create the file ourselves: sqlite would create it by the umask.
        # fchmod also tightens a file that already existed.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        db = sqlite3.connect(path)
    db.execute("PRAGMA secure_delete = ON")  # before the migration deletes anything
    columns = [row[1] for row in db.execute("PRAGMA table_info(crash_reports)")]
    if columns and "signature" not in columns:
        with db:
            for statement in _MIGRATE:
                db.execute(statement)
    db.executescript(_SETUP)
    # The hard cap: a write past it fails (its batch is dropped and counted), so
    # the file never grows beyond it, whatever the soft cap let through.
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.execute(f"PRAGMA max_page_count = {max_bytes // page_size}")
    return db


def _write(db: sqlite3.Connection, batches: Iterable[tuple[str, Sequence[_Row]]]) -> bool:
    """Run all C{batches} in one transaction; on error, log and drop them, return False."""
    try:
        with db:
            for sql, rows in batches:
                # Skipped when empty: executemany prepares the statement even for no rows.
                if rows:
                    db.executemany(sql, rows)
    except sqlite3.Error as e:
        # SQLite's own words ("database or disk is full", "no such table: counts").
        log.error("Telemetry write failed ({why}); this batch is dropped", why=str(e))
        return False
    return True
