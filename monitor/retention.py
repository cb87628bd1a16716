"""Retention and downsampling: keep the telemetry a month of serving needs, in bounded space.

What :func:`prune` does, with the ages from :class:`~monitor.settings.Settings`:

- samples: raw input arrays cleared after ``retention_raw_days`` (the summary row stays),
  thinned to ``samples_thin_per_minute`` per model version and arm after
  ``samples_thin_after_days``, deleted after ``retention_samples_days``;
- spans deleted after ``retention_spans_days``; job runs after ``retention_job_runs_days``;
- latency aggregates merged into 1-minute rows after ``rollup_minute_after_days`` and into
  1-hour rows after ``rollup_hour_after_days``. Histogram buckets merge by adding counts, so a
  percentile over a rolled-up range is exactly the one over the original rows.

Kept whatever their age: events, drift reports, tuning runs, promotions, experiments, fidelity
checks, the audit log, pinned drift references (arm ``reference``) and each version's first
``drift_reference_rows`` samples (the default drift reference). Every delete or update touches at
most ``retention_batch_rows`` rows in its own short transaction, so the writer of a serving
process never waits long for the database, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, select, update

from monitor import schema, sketch
from monitor.settings import Settings
from monitor.storage import Database, as_utc, utcnow

# instance_id of merged aggregate rows ("rollup:60", "rollup:3600"): never a writer's id, and
# one per resolution, so a 1-minute row at 12:00 never collides with the 1-hour row of 12:00.
ROLLUP_PREFIX = "rollup:"
REFERENCE_ARM = "reference"  # pinned drift references (monitor.detect) are never pruned
MINUTE, HOUR = 60, 3600


@dataclass
class PruneReport:
    """Rows deleted, thinned, cleared and rolled up per table by one :func:`prune`."""

    dry_run: bool
    now: datetime
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, table: str, what: str, n: int) -> None:
        counts = self.tables.setdefault(table, {})
        counts[what] = counts.get(what, 0) + n

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form of ``tunewatch db prune --json``."""
        return {"dry_run": self.dry_run, "now": self.now.isoformat(),
                "seconds": round(self.seconds, 3), "tables": self.tables}  # fmt: skip


def prune(
    db: Database, settings: Settings, *, now: datetime | None = None, dry_run: bool = False
) -> PruneReport:
    """Apply the retention settings once; with ``dry_run`` only count what would change."""
    started = time.perf_counter()
    now = as_utc(now) if now is not None else utcnow()
    job = _Pruner(db, settings, now, dry_run)
    job.samples()
    job.age_out(schema.CallSpan, schema.CallSpan.start_time, settings.retention_spans_days)
    job.age_out(schema.JobRun, schema.JobRun.started_at, settings.retention_job_runs_days,
                schema.JobRun.status != "running")  # fmt: skip
    # Rows old enough for hours go straight into hour rows (a dry run then counts the same).
    job.roll_up(
        MINUTE, settings.rollup_minute_after_days, job.edge(HOUR, settings.rollup_hour_after_days)
    )
    job.roll_up(HOUR, settings.rollup_hour_after_days)
    job.report.seconds = time.perf_counter() - started
    return job.report


class _Pruner:
    def __init__(self, db: Database, settings: Settings, now: datetime, dry_run: bool) -> None:
        self.db, self.s, self.now, self.dry_run = db, settings, now, dry_run
        self.batch = settings.retention_batch_rows
        self._would_thin: set[int] = set()  # a dry run's thinned ids
        self.report = PruneReport(dry_run, now)
        for table in ("samples", "spans", "job_runs", "latency_aggregates"):
            self.report.tables[table] = {}

    def _cutoff(self, days: float) -> datetime | None:
        return self.now - timedelta(days=days) if days > 0 else None

    # --- samples ------------------------------------------------------------------------

    def samples(self) -> None:
        t = schema.Sample
        for model, version in self._versions():
            keep_until = self._reference_end(model, version)
            if keep_until is None:
                continue  # fewer rows than the drift reference: all of them are the reference
            own = [t.model == model, t.version == version, t.arm != REFERENCE_ARM,
                   t.ts > keep_until]  # fmt: skip
            old = self._cutoff(self.s.retention_samples_days)
            if old is not None:
                self._delete_batches(t, "samples", "deleted", [*own, t.ts < old])
            # Rows the age-out deletes are not counted again (a dry run reports the same).
            younger = [t.ts >= old] if old is not None else []
            thin = self._cutoff(self.s.samples_thin_after_days)
            if thin is not None:  # predictions with an id wait for their labels: never thinned
                self._thin([*own, *younger, t.ts < thin, t.request_id.is_(None)])
            raw = self._cutoff(self.s.retention_raw_days)
            if raw is not None:  # after thinning: only the rows that stay
                self._clear_raw([*own, *younger, t.ts < raw, t.raw.is_not(None)])

    def _versions(self) -> list[tuple[str, str]]:
        t = schema.ModelVersionSeen
        with self.db.session() as s:
            return [(m, v) for m, v in s.execute(select(t.model, t.version).order_by(t.id))]

    def _reference_end(self, model: str, version: str) -> datetime | None:
        """Time of the version's ``drift_reference_rows``-th sample (None: fewer rows).

        The drift detector's default reference is a version's first samples: they are kept.
        """
        t = schema.Sample
        stmt = (
            select(t.ts).where(t.model == model, t.version == version)
            .order_by(t.ts, t.id).offset(self.s.drift_reference_rows - 1).limit(1)
        )  # fmt: skip
        with self.db.session() as s:
            return s.scalar(stmt)

    def _clear_raw(self, where: list[Any]) -> None:
        t = schema.Sample
        self.report.add("samples", "raw_cleared", 0)
        if self.dry_run:  # rows the thinning would have deleted are not cleared
            with self.db.session() as s:
                ids = s.scalars(select(t.id).where(*where)).all()
            self.report.add("samples", "raw_cleared", len(set(ids) - self._would_thin))
            return
        for ids in self._id_batches(t, where):
            with self.db.session() as s:
                s.execute(update(t).where(t.id.in_(ids)).values(raw=None, raw_bytes=None))
            self.report.add("samples", "raw_cleared", len(ids))

    def _thin(self, where: list[Any]) -> None:
        """Keep the first ``samples_thin_per_minute`` samples of each arm and minute."""
        t = schema.Sample
        cap = self.s.samples_thin_per_minute
        self.report.add("samples", "thinned", 0)
        kept: dict[tuple[str, int], int] = {}
        surplus: list[int] = []
        after: tuple[datetime, int] | None = None
        while True:
            stmt = select(t.id, t.arm, t.ts).where(*where).order_by(t.ts, t.id).limit(self.batch)
            if after is not None:  # keyset paging: (ts, id) after the last row seen
                stmt = stmt.where((t.ts > after[0]) | ((t.ts == after[0]) & (t.id > after[1])))
            with self.db.session() as s:
                rows = s.execute(stmt).all()
            for row_id, arm, ts in rows:
                slot = (arm, int(as_utc(ts).timestamp()) // MINUTE)
                if kept.get(slot, 0) < cap:
                    kept[slot] = kept.get(slot, 0) + 1
                else:
                    surplus.append(row_id)
            while len(surplus) >= self.batch or (surplus and len(rows) < self.batch):
                self._delete_ids(t, "samples", "thinned", surplus[: self.batch])
                surplus = surplus[self.batch :]
            if len(rows) < self.batch:
                return
            after = (rows[-1][2], rows[-1][0])
            minute = int(as_utc(after[0]).timestamp()) // MINUTE
            kept = {slot: n for slot, n in kept.items() if slot[1] >= minute}  # rows come in order

    # --- plain age-outs -----------------------------------------------------------------

    def age_out(self, table: Any, column: Any, days: float, *extra: Any) -> None:
        cutoff = self._cutoff(days)
        if cutoff is not None:
            name = table.__tablename__
            self._delete_batches(table, name, "deleted", [column < cutoff, *extra])

    def _delete_batches(self, table: Any, name: str, what: str, where: list[Any]) -> None:
        self.report.add(name, what, 0)
        if self.dry_run:
            self.report.add(name, what, self._count(table, where))
            return
        for ids in self._id_batches(table, where):
            self._delete_ids(table, name, what, ids)

    def _delete_ids(self, table: Any, name: str, what: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        if self.dry_run:
            if what == "thinned":
                self._would_thin.update(ids)
        else:
            with self.db.session() as s:
                s.execute(delete(table).where(table.id.in_(ids)))
        self.report.add(name, what, len(ids))

    def _id_batches(self, table: Any, where: list[Any]) -> Iterator[list[int]]:
        """Ids matching ``where``, one short read per batch (the caller changes them)."""
        while True:
            with self.db.session() as s:
                ids = list(s.scalars(select(table.id).where(*where).limit(self.batch)))
            if ids:
                yield ids
            if len(ids) < self.batch:
                return

    def _count(self, table: Any, where: list[Any]) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)

    # --- latency aggregates -------------------------------------------------------------

    def edge(self, step: int, days: float) -> datetime | None:
        """Start of the step ``days`` ago: whole steps only are merged, once all rows are old."""
        cutoff = self._cutoff(days)
        if cutoff is None:
            return None
        return datetime.fromtimestamp(cutoff.timestamp() // step * step, timezone.utc)

    def roll_up(self, step: int, days: float, since: datetime | None = None) -> None:
        """Merge rows finer than ``step`` seconds older than ``days`` (and after ``since``)."""
        edge = self.edge(step, days)
        if edge is None:
            return
        t = schema.LatencyAggregate
        where = [t.interval_s < step, t.interval_start < edge]
        self.report.add("latency_aggregates", "rolled_up", 0)
        if since is not None:
            where.append(t.interval_start >= since)
        if self.dry_run:
            self.report.add("latency_aggregates", "rolled_up", self._count(t, where))
            return
        while True:
            with self.db.session() as s:
                rows = s.scalars(
                    select(t).where(*where).order_by(t.model, t.version, t.arm, t.interval_start)
                    .limit(self.batch)
                ).all()  # fmt: skip
                if rows:
                    self._merge(s, rows, step)
                    s.execute(delete(t).where(t.id.in_([r.id for r in rows])))
            if not rows:
                return
            self.report.add("latency_aggregates", "rolled_up", len(rows))
            if len(rows) < self.batch:
                return

    def _merge(self, s: Any, rows: Sequence[schema.LatencyAggregate], step: int) -> None:
        """Add ``rows`` into their ``step`` rows, created or updated."""
        groups: dict[tuple[str, str, str, datetime], list[schema.LatencyAggregate]] = {}
        for r in rows:
            epoch = int(as_utc(r.interval_start).timestamp()) // step * step
            key = (r.model, r.version, r.arm, datetime.fromtimestamp(epoch, timezone.utc))
            groups.setdefault(key, []).append(r)
        t = schema.LatencyAggregate
        instance = f"{ROLLUP_PREFIX}{step}"
        starts = [key[3] for key in groups]
        existing = {  # the batch's rows of this resolution written by earlier runs, locked
            (r.model, r.version, r.arm, as_utc(r.interval_start)): r
            for r in s.scalars(
                select(t).where(t.instance_id == instance,
                                t.model.in_({key[0] for key in groups}),
                                t.interval_start >= min(starts), t.interval_start <= max(starts))
                .with_for_update()
            )
        }  # fmt: skip
        for (model, version, arm, start), members in groups.items():
            target = existing.get((model, version, arm, start))
            if target is None:
                target = t(instance_id=instance, model=model, version=version, arm=arm,
                           interval_start=start, interval_s=step, calls=0, errors=0, items=0,
                           sum_ms=0.0, min_ms=float("inf"), max_ms=0.0, buckets={},
                           error_types={})  # fmt: skip
                s.add(target)
            _add_into(target, members, self.now)


def _add_into(target: schema.LatencyAggregate, rows: Sequence[schema.LatencyAggregate],
              now: datetime) -> None:  # fmt: skip
    """Add rows' counts and histograms into ``target`` (buckets merge exactly)."""
    everything = [target, *rows]
    buckets = sketch.merge({int(k): int(v) for k, v in r.buckets.items()} for r in everything)
    errors: dict[str, int] = {}
    for r in everything:
        for name, n in (r.error_types or {}).items():
            errors[name] = errors.get(name, 0) + int(n)
    target.calls = sum(int(r.calls) for r in everything)
    target.errors = sum(int(r.errors) for r in everything)
    target.items = sum(int(r.items) for r in everything)
    target.sum_ms = sum(float(r.sum_ms) for r in everything)
    target.min_ms = min(float(r.min_ms) for r in everything)
    target.max_ms = max(float(r.max_ms) for r in everything)
    target.p50_ms, target.p95_ms, target.p99_ms = sketch.quantiles(buckets, (0.5, 0.95, 0.99))
    target.buckets = {str(k): v for k, v in buckets.items()}
    target.error_types = errors
    target.updated_at = now


__all__ = ["ROLLUP_PREFIX", "PruneReport", "prune"]
