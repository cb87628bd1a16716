"""Prometheus metrics of tunewatch, read from the database on every scrape.

The numbers come from the shared tables, not from in-process counters, so every ``tunewatch``
process (API, scheduler, serving wrappers) reports the same totals and a restart loses nothing.

>>> from monitor.storage import Database
>>> payload, content_type = render_metrics(Database("sqlite://"))
>>> b"tunewatch_database_up 1.0" in payload, content_type.startswith("text/plain")
(True, True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor import schema, sketch
from monitor.errors import StorageError
from monitor.storage import Database, utcnow
from tuner.experiments import STATUSES as EXPERIMENT_STATUSES
from tuner.promotions import STATUSES as PROMOTION_STATUSES

log = logging.getLogger("tunewatch.metrics")

RECENT = timedelta(minutes=5)
# Bucket bounds (ms) of the latency histograms: fine enough for p95/p99 from 0.25 ms to 10 s.
LATENCY_BOUNDS_MS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150,
                     200, 300, 500, 750, 1000, 2000, 5000, 10000)  # fmt: skip
DROP_PREFIX = "dropped_"


class DatabaseCollector(Collector):
    """Collects tunewatch's state from the database each time Prometheus scrapes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        """Yield every metric family; only ``tunewatch_database_up 0`` when the DB is down."""
        try:
            with self.db.session() as s:
                families = list(_families(s))
        except StorageError as exc:
            log.warning("metrics scrape could not read the database: %s", exc)
            yield _gauge("tunewatch_database_up", "1 when the database answered this scrape", 0)
            return
        yield _gauge("tunewatch_database_up", "1 when the database answered this scrape", 1)
        yield from families


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _families(s: Session) -> Iterator[Any]:
    yield from _job_runs(s)
    yield _by_status(s, schema.Experiment, "tunewatch_experiments",
                     "Experiments by status", EXPERIMENT_STATUSES)  # fmt: skip
    yield _by_status(s, schema.Promotion, "tunewatch_promotions",
                     "Promotion requests by status", PROMOTION_STATUSES)  # fmt: skip
    yield _events(s)
    yield _drops(s)
    yield from _recent_calls(s)
    yield _recent_latency(s)


def _job_runs(s: Session) -> Iterator[Any]:
    t = schema.JobRun
    rows = s.execute(select(t.job_id, t.status, func.count()).group_by(t.job_id, t.status)).all()
    runs = CounterMetricFamily("tunewatch_job_runs", "Scheduled job runs by job", labels=["job"])
    failed = CounterMetricFamily(
        "tunewatch_job_failures", "Scheduled job runs that failed, by job", labels=["job"]
    )
    totals: dict[str, int] = {}
    failures: dict[str, int] = {}
    for job, status, n in rows:
        totals[job] = totals.get(job, 0) + int(n)
        failures[job] = failures.get(job, 0) + (int(n) if status == "failed" else 0)
    for job in sorted(totals):
        runs.add_metric([job], totals[job])
        failed.add_metric([job], failures[job])
    yield runs
    yield failed


def _by_status(
    s: Session, table: Any, name: str, doc: str, known: Iterable[str]
) -> GaugeMetricFamily:
    counts = dict.fromkeys(known, 0)  # every known status appears, so alerts see a 0, not a gap
    for status, n in s.execute(select(table.status, func.count()).group_by(table.status)):
        counts[status] = int(n)
    family = GaugeMetricFamily(name, doc, labels=["status"])
    for status, n in sorted(counts.items()):
        family.add_metric([status], n)
    return family


def _events(s: Session) -> GaugeMetricFamily:
    t = schema.Event
    stmt = select(t.kind, t.status, func.count()).group_by(t.kind, t.status)
    family = GaugeMetricFamily(
        "tunewatch_events", "Detection events by kind and status", labels=["kind", "status"]
    )
    for kind, status, n in s.execute(stmt):
        family.add_metric([kind, status], int(n))
    return family


def _drops(s: Session) -> CounterMetricFamily:
    t = schema.TelemetryCounter
    stmt = (
        select(t.name, func.sum(t.value))
        .where(t.name.startswith(DROP_PREFIX, autoescape=True))
        .group_by(t.name)
    )
    family = CounterMetricFamily(
        "tunewatch_telemetry_dropped",
        "Telemetry records dropped by the data plane, summed over processes, by reason",
        labels=["reason"],
    )
    for name, total in s.execute(stmt):
        family.add_metric([name[len(DROP_PREFIX) :]], int(total or 0))
    return family


def _recent_calls(s: Session) -> Iterator[GaugeMetricFamily]:
    t = schema.LatencyAggregate
    since = utcnow() - RECENT
    stmt = (
        select(t.model, t.version, t.arm, func.sum(t.calls), func.sum(t.errors))
        .where(t.interval_start >= since)
        .group_by(t.model, t.version, t.arm)
    )
    labels = ["model", "version", "arm"]
    calls = GaugeMetricFamily(
        "tunewatch_recent_calls", "Calls recorded in the last 5 minutes", labels=labels
    )
    errors = GaugeMetricFamily(
        "tunewatch_recent_errors", "Failed calls recorded in the last 5 minutes", labels=labels
    )
    for model, version, arm, n_calls, n_errors in s.execute(stmt):
        calls.add_metric([model, version, arm], int(n_calls or 0))
        errors.add_metric([model, version, arm], int(n_errors or 0))
    yield calls
    yield errors


def _recent_latency(s: Session) -> GaugeHistogramMetricFamily:
    """Latency of the last 5 minutes per model, version and arm, as a gauge histogram.

    Built from the stored per-interval histograms of that window only (a bounded read): each
    scrape shows the recent distribution, so ``histogram_quantile(0.95,
    tunewatch_recent_latency_ms_bucket)`` needs no ``rate()``.
    """
    t = schema.LatencyAggregate
    stmt = select(t.model, t.version, t.arm, t.buckets, t.sum_ms).where(
        t.interval_start >= utcnow() - RECENT
    )
    hists: dict[tuple[str, str, str], dict[int, int]] = {}
    sums: dict[tuple[str, str, str], float] = {}
    for model, version, arm, buckets, sum_ms in s.execute(stmt):
        key = (model, version, arm)
        hists[key] = sketch.merge((hists.get(key, {}), buckets))
        sums[key] = sums.get(key, 0.0) + float(sum_ms or 0.0)
    family = GaugeHistogramMetricFamily(
        "tunewatch_recent_latency_ms",
        "Latency (ms) of the calls recorded in the last 5 minutes",
        labels=["model", "version", "arm"],
    )
    for key in sorted(hists):
        family.add_metric(list(key), _cumulative(hists[key]), sums[key])
    return family


def _cumulative(hist: dict[int, int]) -> list[tuple[str, float]]:
    """Prometheus ``le`` buckets of a sketch histogram (each sketch bucket by its value)."""
    values = sorted((sketch.bucket_value(i), n) for i, n in hist.items())
    out, seen, j = [], 0, 0
    for bound in LATENCY_BOUNDS_MS:
        while j < len(values) and values[j][0] <= bound:
            seen += values[j][1]
            j += 1
        out.append((f"{bound:g}", float(seen)))
    out.append(("+Inf", float(sum(hist.values()))))
    return out


def render_metrics(db: Database) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``db``'s state: ``(payload, content type)``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db))
    return generate_latest(registry), CONTENT_TYPE_LATEST
