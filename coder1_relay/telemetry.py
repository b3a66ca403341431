"""
Content-free telemetry for the relay: counts, timestamps and versions.

Every string written to the database is either from a fixed vocabulary (a
role, a counter name) or has passed a strict pattern (a bridge version, a
validated crash report), so no command text, output, path or environment
value can end up in it, whatever a party sends.  The relay's connection ids
stay in memory; rows get their own numbers.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from coder1_wire.crash import is_version, sanitize_crash_report

log = Logger()

_Row = Sequence[object]

ROLES = frozenset({"ide", "bridge"})
#: Why the relay throttled or refused a client (the label of the C{throttled} counter):
#: C{rate} a connection sent too fast, C{connections} one IP opened too many,
#: C{sessions} a browser session has too many tabs or bridges, C{pairing} the
#: pairing API said 429, C{timeout} a client was too slow with TLS or a request.
THROTTLE_REASONS = frozenset({"rate", "connections", "sessions", "pairing", "timeout"})
INVALID_VERSION = "invalid"
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
    type TEXT NOT NULL,
    version TEXT NOT NULL,
    frames TEXT NOT NULL      -- JSON of the sanitized frames
);
CREATE INDEX IF NOT EXISTS crash_reports_received_at ON crash_reports (received_at);
"""
_ADD_COUNT = """
INSERT INTO counts (period, name, label, value) VALUES (?, ?, ?, ?)
ON CONFLICT (period, name, label) DO UPDATE SET value = value + excluded.value
"""
_ADD_CONNECTION = "INSERT INTO connections (role, opened_at, closed_at) VALUES (?, ?, ?)"
_ADD_CRASH = "INSERT INTO crash_reports (received_at, type, version, frames) VALUES (?, ?, ?, ?)"
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
    CRASH_REPORT_DROPPED = "crash_report_dropped"
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
        retention: float = 30 * 86400,
        flush_interval: float = 10.0,
        prune_interval: float = 3600.0,
    ) -> None:
        self._db_path = db_path
        self._clock = clock
        self._retention = retention
        self._flush_interval = flush_interval
        self._prune_interval = prune_interval
        self._db: sqlite3.Connection | None = None
        self._live: dict[str, _Open] = {}
        self._counts: Counter[tuple[int, Count, str]] = Counter()
        self._closed: list[_Row] = []
        self._crashes: list[_Row] = []
        self._flusher = LoopingCall(self._flush)
        self._flusher.clock = cast(IReactorTime, clock)
        self._pruner = LoopingCall(self._prune)
        self._pruner.clock = cast(IReactorTime, clock)

    def startService(self) -> None:
        # Opened here rather than in __init__: twistd starts services after
        # dropping privileges, so the file belongs to the relay's user.
        self._db = _open(self._db_path)
        super().startService()
        log.info("Telemetry in {where}", where=self._db_path or "memory")
        self._pruner.start(self._prune_interval, now=True)
        self._flusher.start(self._flush_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._flusher, self._pruner):
            if loop.running:  # not when startService failed part way
                loop.stop()
        # The relay is going away and its connections with it.
        for connection_id in list(self._live):
            self.connection_closed(connection_id)
        self._flush()
        if self._db is not None:
            self._db.close()
            self._db = None

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
        """A bridge connected with this version; anything unlike a version counts as invalid."""
        self._count(Count.BRIDGE_VERSION, version if is_version(version) else INVALID_VERSION)

    def throttled(self, reason: str) -> None:
        """A limit throttled or refused a client, for C{reason} (one of C{THROTTLE_REASONS})."""
        if reason not in THROTTLE_REASONS:
            raise ValueError(f"unknown throttle reason {reason!r}")
        self._count(Count.THROTTLED, reason)

    def crash_report(self, report: object) -> bool:
        """
        Keep a bridge's crash report if it passes L{sanitize_crash_report}.

        @return: whether it will be stored.
        """
        clean = sanitize_crash_report(report)
        if clean is None:
            self._count(Count.CRASH_REPORT_REFUSED)
            return False
        if len(self._crashes) >= MAX_PENDING_CRASHES:
            self._count(Count.CRASH_REPORT_DROPPED)
            return False
        frames = json.dumps(clean["frames"], separators=(",", ":"))
        self._crashes.append((self._clock.seconds(), clean["type"], clean["version"], frames))
        return True

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
                    "SELECT received_at, type, version, frames FROM crash_reports"
                    " WHERE received_at >= ? ORDER BY received_at DESC LIMIT ?",
                    since,
                    _RECENT_ROWS,
                )
            ],
        }

    def _count(self, name: Count, label: str = "") -> None:
        period = int(self._clock.seconds() // PERIOD) * PERIOD
        self._counts[period, name, label] += 1

    def _flush(self) -> None:
        if self._db is None:
            return
        counts, self._counts = self._counts, Counter()
        closed, self._closed = self._closed, []
        crashes, self._crashes = self._crashes, []
        _write(
            self._db,
            [
                (_ADD_COUNT, [(p, n.value, lb, v) for (p, n, lb), v in counts.items()]),
                (_ADD_CONNECTION, closed),
                (_ADD_CRASH, crashes),
            ],
        )

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


def _open(path: str | None) -> sqlite3.Connection:
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
    db.executescript(_SETUP)
    return db


def _write(db: sqlite3.Connection, batches: Iterable[tuple[str, Sequence[_Row]]]) -> None:
    """Run all C{batches} in one transaction; on error, log and drop them."""
    try:
        with db:
            for sql, rows in batches:
                # Skipped when empty: executemany prepares the statement even for no rows.
                if rows:
                    db.executemany(sql, rows)
    except sqlite3.Error:
        log.failure("Telemetry write failed; this batch is dropped")
