"""Per model/version summaries over a window: calls, error rate, latency quantiles, drops."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from monitor import schema, sketch
from monitor.storage import Database, as_utc, counters, read_aggregates, utcnow
from monitor.writer import DROP_PREFIX


@dataclass(frozen=True)
class VersionStatus:
    """What one model version did in the window."""

    model: str
    version: str
    arms: list[str]
    calls: int
    calls_per_s: float
    items: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    samples: int
    active_s: float = 0.0  # first to last interval with calls: what calls_per_s divides by


@dataclass(frozen=True)
class Status:
    """The ``tunewatch status`` report."""

    since: datetime
    until: datetime
    window_s: float
    models: list[VersionStatus]
    dropped: int
    drops_by_reason: dict[str, int]
    samples_capped: int

    def to_dict(self) -> dict[str, Any]:
        """The stable ``--json`` form (times as ISO-8601 UTC)."""
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        return out


def summarize(
    db: Database,
    *,
    window: timedelta = timedelta(hours=1),
    until: datetime | None = None,
    model: str | None = None,
) -> Status:
    """Summarise the latency aggregates and samples of every model version in the window."""
    end = as_utc(until) if until else utcnow()
    start = end - window
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in read_aggregates(db, model, start=start, end=end):
        groups.setdefault((row.model, row.version), []).append(row)
    samples = _sample_counts(db, start, end, model)
    seconds = window.total_seconds()
    models = [
        _version_status(m, v, rows, samples.get((m, v), 0), _active_s(rows, start, end))
        for (m, v), rows in sorted(groups.items())
    ]
    for (m, v), n in sorted(samples.items()):
        if (m, v) not in groups:
            models.append(VersionStatus(m, v, [], 0, 0.0, 0, 0, 0.0, None, None, None, n))
    counts = counters(db)
    drops = {k[len(DROP_PREFIX) :]: v for k, v in counts.items() if k.startswith(DROP_PREFIX)}
    return Status(
        start, end, seconds, models, sum(drops.values()), drops, counts.get("samples_capped", 0)
    )


def _active_s(rows: list[Any], start: datetime, end: datetime) -> float:
    """Seconds from the first to the last interval with calls, within the window.

    A burst of traffic in a long window gets its own rate, not one diluted by the idle time.
    """
    first = max(min(r.interval_start for r in rows), start)
    last = min(max(r.interval_start + timedelta(seconds=r.interval_s) for r in rows), end)
    return max((last - first).total_seconds(), 1.0)


def _version_status(
    model: str, version: str, rows: list[Any], samples: int, seconds: float
) -> VersionStatus:
    calls = sum(r.calls for r in rows)
    errors = sum(r.errors for r in rows)
    hist = sketch.merge(r.buckets for r in rows)
    p50, p95, p99 = (
        round(q, 4) if q == q else None for q in sketch.quantiles(hist, (0.5, 0.95, 0.99))
    )
    return VersionStatus(
        model, version, sorted({r.arm for r in rows}), calls, round(calls / seconds, 3),
        sum(r.items for r in rows), errors, round(errors / calls, 6) if calls else 0.0,
        p50, p95, p99, samples, round(seconds, 3),
    )  # fmt: skip


def _sample_counts(
    db: Database, start: datetime, end: datetime, model: str | None
) -> dict[tuple[str, str], int]:
    t = schema.Sample
    stmt = (
        select(t.model, t.version, func.count())
        .where(t.ts >= start, t.ts < end)
        .group_by(t.model, t.version)
    )
    if model is not None:
        stmt = stmt.where(t.model == model)
    with db.session() as s:
        return {(m, v): int(n) for m, v, n in s.execute(stmt)}
