"""
The relay's telemetry as a person reads it: C{coder1-relay telemetry}.

Reads the relay's SQLite file (read-only) or, for several relay processes,
their shared Redis (L{coder1_relay.redis_telemetry}), and prints counts per
hour and per day, bridge versions, throttles, crash reports by signature, what
was dropped, and the oldest row's age (the 30-day retention at work).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import attrs

from coder1_relay.crash_budget import DAY
from coder1_relay.telemetry import PERIOD as HOUR

#: The columns of the hourly and daily tables: header, and how a bucket fills it.
_COLUMNS = (
    ("tabs", "connections", "ide"),
    ("bridges", "connections", "bridge"),
    ("commands", "count", "command_started|"),
    ("completed", "count", "command_completed|"),
    ("crashes", "crashes", ""),
    ("throttled", "throttled", ""),
)


@attrs.define
class Summary:
    """Telemetry rows, from either store, in one shape."""

    where: str
    #: (hour, "name|label") -> value
    counts: Counter[tuple[int, str]] = attrs.field(factory=Counter)
    #: (hour, role) -> connections closed that hour
    connections: Counter[tuple[int, str]] = attrs.field(factory=Counter)
    crashes: list[dict[str, Any]] = attrs.field(factory=list)
    #: The oldest row's time, if there is any row.
    oldest: float | None = None
    #: The file's size and cap, for SQLite.
    size: int | None = None
    #: Crash rows of a relay from before they held known names only (not read).
    older_crashes: int = 0

    def saw(self, when: float) -> None:
        self.oldest = when if self.oldest is None else min(self.oldest, when)


def from_sqlite(path: str, where: str) -> Summary:
    """
    The summary of a relay's C{telemetry.sqlite}, opened read-only.

    @raise FileNotFoundError: there is no such file.
    @raise sqlite3.Error: it is not a relay's telemetry database.
    """
    size = os.path.getsize(path)  # FileNotFoundError before sqlite would make the file
    summary = Summary(where, size=size)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        for period, name, label, value in db.execute(
            "SELECT period, name, label, value FROM counts"
        ):
            summary.counts[period, f"{name}|{label}"] += value
            summary.saw(period)
        for role, closed_at in db.execute("SELECT role, closed_at FROM connections"):
            summary.connections[int(closed_at // HOUR) * HOUR, role] += 1
            summary.saw(closed_at)
        columns = [row[1] for row in db.execute("PRAGMA table_info(crash_reports)")]
        query = "SELECT received_at, type, version, frames, signature FROM crash_reports"
        if "signature" not in columns:
            # An older relay's rows, which may hold names a bridge chose: not shown;
            # the relay deletes them when it next starts (telemetry.py).
            (summary.older_crashes,) = db.execute("SELECT count(*) FROM crash_reports").fetchone()
            query = "SELECT * FROM crash_reports WHERE 0"
        rows = db.execute(query)
        for row in rows:
            received_at, type_, version, frames, signature = row
            summary.crashes.append(
                {
                    "received_at": received_at,
                    "type": type_,
                    "version": version,
                    "frames": json.loads(frames),
                    "signature": signature,
                }
            )
            summary.saw(received_at)
    db.close()
    return summary


async def from_redis(client: Any, where: str) -> Summary:
    """The summary of a deployment's telemetry in Redis (C{client}: a ready L{RedisClient})."""
    summary = Summary(where)
    prefix = client.settings.prefix + "telemetry:"
    cursor = "0"
    keys: list[str] = []
    while True:
        cursor, found = await client.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        keys += found
        if cursor == "0":
            break
    for key in keys:
        kind, _, period_text = key[len(prefix) :].partition(":")
        period = int(period_text)
        if kind == "crashes":
            for row in await client.call("LRANGE", key, 0, -1):
                crash = json.loads(row)
                summary.crashes.append(crash)
                summary.saw(crash["received_at"])
            continue
        flat = await client.call("HGETALL", key)
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            if kind == "counts":
                summary.counts[period, field] += int(value)
            elif kind == "connections" and field.endswith("|count"):
                summary.connections[period, field.partition("|")[0]] += int(value)
        summary.saw(period)
    return summary


def render(summary: Summary, now: float | None = None, hours: int = 24) -> str:
    """The summary as text: short sentences and aligned tables."""
    now = time.time() if now is None else now
    lines = [f"Telemetry in {summary.where}."]
    if summary.size is not None:
        lines[0] = f"Telemetry in {summary.where} ({_size(summary.size)})."
    if summary.oldest is None:
        lines.append("It holds nothing yet.")
        return "\n".join(lines) + "\n"
    lines.append(
        f"Oldest row: {_age(now - summary.oldest)} old ({_utc(summary.oldest)}); "
        "rows are deleted when 30 days old."
    )
    buckets = _buckets(summary)
    recent = [h for h in sorted({h for h, _ in buckets}) if h > now - hours * HOUR]
    lines += ["", f"Last {hours} hours, per hour (UTC):"]
    lines += _table("hour", [(_utc(h), buckets_for(buckets, [h])) for h in recent])
    days = sorted({int(h // DAY) * DAY for h, _ in buckets})
    rows = [(_utc(d)[:10], buckets_for(buckets, range(d, d + DAY, HOUR))) for d in days]
    lines += ["", "Per day (UTC):"]
    lines += _table("day", rows)
    versions = _labelled(summary, "bridge_version")
    if versions:
        lines += ["", "Bridge versions (connections): " + _listing(versions)]
    throttled = _labelled(summary, "throttled")
    if throttled:
        lines += ["", "Throttled, by reason: " + _listing(throttled)]
    lines += _crashes(summary.crashes)
    if summary.older_crashes:
        lines[-1] = (
            f"Crash reports: {_n(summary.older_crashes, 'row')} written by an older relay, not "
            "shown; the relay deletes them when it next starts."
        )
    dropped = _labelled(summary, "crash_report_dropped")
    refused = sum(_labelled(summary, "crash_report_refused").values())
    rows_dropped = sum(_labelled(summary, "connection_dropped").values())
    if dropped or refused or rows_dropped:
        lines += [
            "",
            "Not kept: "
            + ", ".join(
                [f"{_n(n, 'crash report')} ({reason})" for reason, n in sorted(dropped.items())]
                + ([f"{_n(refused, 'malformed crash report')}"] if refused else [])
                + (
                    [f"{_n(rows_dropped, 'connection row')} (database full)"]
                    if rows_dropped
                    else []
                )
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def buckets_for(buckets: dict[tuple[int, str], int], hours: Iterable[int]) -> list[int]:
    """The table columns' values over C{hours}."""
    hours = list(hours)
    return [sum(buckets.get((h, column), 0) for h in hours) for column, _, _ in _COLUMNS]


def _buckets(summary: Summary) -> dict[tuple[int, str], int]:
    buckets: defaultdict[tuple[int, str], int] = defaultdict(int)
    for column, source, key in _COLUMNS:
        if source == "connections":
            for (hour, role), n in summary.connections.items():
                if role == key:
                    buckets[hour, column] += n
        elif source == "count":
            for (hour, field), n in summary.counts.items():
                if field == key:
                    buckets[hour, column] += n
        elif source == "throttled":
            for (hour, field), n in summary.counts.items():
                if field.startswith("throttled|"):
                    buckets[hour, column] += n
        else:
            for crash in summary.crashes:
                buckets[int(crash["received_at"] // HOUR) * HOUR, column] += 1
    return dict(buckets)


def _table(first: str, rows: list[tuple[str, list[int]]]) -> list[str]:
    if not rows:
        return ["  (nothing)"]
    headers = [first, *(name for name, _, _ in _COLUMNS)]
    cells = [[label, *(f"{n:,}" for n in values)] for label, values in rows]
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]
    out = []
    for row in [headers, *cells]:
        out.append(
            "  "
            + row[0].ljust(widths[0])
            + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        )
    return out


def _labelled(summary: Summary, name: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for (_, field), n in summary.counts.items():
        counted, _, label = field.partition("|")
        if counted == name:
            found[label] += n
    return found


def _listing(counts: Counter[str]) -> str:
    return ", ".join(f"{label or '-'} {n:,}" for label, n in counts.most_common())


def _crashes(crashes: list[dict[str, Any]]) -> list[str]:
    if not crashes:
        return ["", "Crash reports: none."]
    groups: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for crash in crashes:
        groups[crash["signature"]].append(crash)
    lines = ["", "Crash reports, by signature (most first):"]
    for signature, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        crash = group[-1]
        versions = ", ".join(sorted({c["version"] for c in group}))
        where = ""
        if crash["frames"]:
            f = crash["frames"][-1]
            where = f" in {f['module']}, {f['function']}, line {f['line']}"
        lines.append(
            f"  {signature}  {len(group):,} x {crash['type']}{where} (version {versions}; "
            f"last {_utc(max(c['received_at'] for c in group))})"
        )
    return lines


def _n(n: int, thing: str) -> str:
    return f"{n:,} {thing}" + ("" if n == 1 else "s")


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(when))


def _age(seconds: float) -> str:
    if seconds >= 2 * DAY:
        return f"{int(seconds // DAY)} days"
    if seconds >= 2 * HOUR:
        return f"{int(seconds // HOUR)} hours"
    return f"{max(int(seconds // 60), 0)} minutes"


def _size(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KiB"
