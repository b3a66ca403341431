"""
Numbers and tables shared by every benchmark.

A benchmark runs each system several *rounds* in one invocation and keeps one
value per round and metric.  A table row shows the median over the rounds,
with the minimum and maximum beside it, and the ratio of the medians against
the baseline row of the same table (measured in the same invocation, so a noisy
machine moves both).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import attrs


def percentile(samples: Sequence[float], q: float) -> float:
    """The C{q}-th percentile (0-100) of C{samples}, linear between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@attrs.frozen
class Spread:
    """One metric over the rounds: median, min, max."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        kept = [v for v in values if not math.isnan(v)]
        if not kept:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(kept), min(kept), max(kept), len(kept))


@attrs.define
class Row:
    """One system in a table: its name and, per metric, one value per round."""

    name: str
    values: dict[str, list[float]] = attrs.field(factory=dict)
    note: str = ""

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def spread(self, metric: str) -> Spread:
        return Spread.of(self.values.get(metric, []))


@attrs.frozen
class Metric:
    """A column: its key, its header, its unit, and whether lower is better."""

    key: str
    header: str
    unit: str = ""
    lower_is_better: bool = True
    digits: int = 1


def _number(value: float, digits: int) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 10000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(value: float, baseline: float) -> float:
    """C{value / baseline}, NaN when either is missing or the baseline is 0."""
    if math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return math.nan
    return value / baseline


@attrs.define
class Table:
    """
    Rows of systems and columns of metrics; the C{baseline} row's medians are
    what the ratio columns divide by.
    """

    title: str
    metrics: list[Metric]
    baseline: str
    rows: list[Row] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def row(self, name: str, note: str = "") -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        row = Row(name, note=note)
        self.rows.append(row)
        return row

    def _base(self) -> Row | None:
        return next((r for r in self.rows if r.name == self.baseline), None)

    def render(self) -> str:
        """The table as Markdown: each metric as C{median [min-max]}, then its ratio."""
        base = self._base()
        header = ["system"]
        for m in self.metrics:
            unit = f" ({m.unit})" if m.unit else ""
            header.append(f"{m.header}{unit} median [min-max]")
            if self.baseline:
                header.append(f"x {self.baseline}")
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in self.rows:
            cells = [row.name + (f" ({row.note})" if row.note else "")]
            for m in self.metrics:
                s = row.spread(m.key)
                cells.append(
                    f"{_number(s.median, m.digits)} "
                    f"[{_number(s.low, m.digits)}-{_number(s.high, m.digits)}]"
                    if s.rounds
                    else "-"
                )
                if not self.baseline:
                    continue
                b = base.spread(m.key).median if base is not None else math.nan
                r = ratio(s.median, b)
                cells.append("-" if math.isnan(r) else f"{r:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        rounds = sorted({s.rounds for r in self.rows for s in map(r.spread, r.values)} - {0})
        lines.append("")
        lines.append(f"rounds per cell: {', '.join(map(str, rounds)) or '0'}")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "baseline": self.baseline,
            "rows": {
                r.name: {k: attrs.asdict(r.spread(k)) | {"values": v} for k, v in r.values.items()}
                for r in self.rows
            },
            "notes": self.notes,
        }

    def median(self, row: str, metric: str) -> float:
        for r in self.rows:
            if r.name == row:
                return r.spread(metric).median
        return math.nan


def emit(table: Table, out: TextIO = sys.stdout, json_out: TextIO | None = None) -> None:
    """Print a table (and, if asked, append it as one JSON line to C{json_out})."""
    out.write(table.render() + "\n\n")
    out.flush()
    if json_out is not None:
        json_out.write(json.dumps(table.as_json()) + "\n")
        json_out.flush()


def verdict(ok: bool | None) -> str:
    """How a target reads in a results table."""
    return "n/a" if ok is None else ("met" if ok else "MISSED")
