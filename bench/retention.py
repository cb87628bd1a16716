"""Steady-state database size under the default retention, and what a prune costs.

Run: ``.venv/bin/python bench/retention.py`` (``--rate 100``; ``--quick`` runs 1 full-rate
day instead of 3). One model version is served at ``--rate`` calls/s for 31 simulated days with
the default settings: 5 % of calls sampled (``sample_rate``), 1 % become spans, one 10 s latency
aggregate per interval. Time is simulated with backfilled timestamps: real wrapped calls through
the real writer give the template rows (a 1x64 float input, stored as 64 named columns plus its
raw ``.npz``, and a 10-value output), and each day's rows are bulk-inserted as copies of them
with that day's timestamps.

Days 31 to 3 before the end are inserted at the density the thinning leaves
(``samples_thin_per_minute``), with spans only where they are younger than their retention,
then pruned once (age-out, raw clearing, the 1-minute and 1-hour roll-ups run for real on
them). The last days are inserted at the full rate and pruned after each simulated day, like
the daily ``retention`` job: that is where the thinning of full-rate rows is measured. At the
end the SQLite file is vacuumed and measured. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import func, select, text

from monitor import Monitor, Settings, schema
from monitor.retention import prune
from monitor.storage import Database

SAMPLE_COLUMNS = "model, version, arm, ts, source, input_kind, features, outputs, raw, raw_bytes"
SPAN_COLUMNS = ("trace_id, span_id, parent_span_id, name, model, version, arm, start_time, "
                "duration_ms, batch_size, status, error_type, source, attributes")  # fmt: skip
AGG_COLUMNS = ("instance_id, model, version, arm, interval_start, interval_s, calls, errors, "
               "items, sum_ms, min_ms, max_ms, p50_ms, p95_ms, p99_ms, buckets, error_types, "
               "updated_at")  # fmt: skip
# SQLAlchemy's SQLite DateTime text form, from a unix time in seconds.
TS = "strftime('%Y-%m-%d %H:%M:%S', {t}, 'unixepoch') || printf('.%06d', ({t} * 1000000) % 1000000)"


def templates(url: str) -> dict[str, dict[str, Any]]:
    """One row of each table as the real writer stores a sampled, spanned call."""
    with Monitor(url, sample_rate=1.0, span_sample_rate=1.0) as mon:
        weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        model = mon.wrap(lambda x: x @ weights, name="m", version="v1")
        for _ in range(200):  # a realistic histogram: latencies spread over many buckets
            model(np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32))
        mon.flush()
    rows: dict[str, dict[str, Any]] = {}
    with Database(url).engine.connect() as conn:
        for table in ("samples", "spans", "latency_aggregates"):
            # Table names come from the tuple above, values are bound: nothing is injected.
            row = conn.execute(text(f"SELECT * FROM {table} LIMIT 1")).mappings().one()  # noqa: S608
            rows[table] = dict(row)
            conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608
        conn.commit()
    return rows


def insert_day(
    db: Database, tpl: dict[str, dict[str, Any]], start: float, samples: int, spans: int
) -> int:
    """Bulk-insert one simulated day of a version's telemetry starting at unix time ``start``."""
    day = 86_400
    plan = (  # table, columns, rows in the day
        ("samples", SAMPLE_COLUMNS, samples),
        ("spans", SPAN_COLUMNS, spans),
        ("latency_aggregates", AGG_COLUMNS, day // 10),
    )
    total = 0
    with db.engine.begin() as conn:
        for table, columns, n in plan:
            if n == 0:
                continue
            names = [c.strip() for c in columns.split(",")]
            time_col = {"samples": "ts", "spans": "start_time"}.get(table, "interval_start")
            values = ", ".join(
                TS.format(t=f"(:start + i * {day / n!r})") if c == time_col else f":{c}"
                for c in names
            )
            sql = (
                f"WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE "  # noqa: S608
                f"i < {n - 1}) INSERT INTO {table} ({columns}) SELECT {values} FROM seq"
            )
            params = {c: tpl[table][c] for c in names if c != time_col}
            if table == "latency_aggregates":
                params["instance_id"] = "bench0001"
            conn.execute(text(sql), {**params, "start": start})
            total += n
    return total


def sizes(db: Database) -> dict[str, int]:
    with db.session() as s:
        return {
            t.__tablename__: int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in (schema.Sample, schema.CallSpan, schema.LatencyAggregate)
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second")
    parser.add_argument("--quick", action="store_true", help="1 full-rate day instead of 3")
    args = parser.parse_args()
    days, full_days = 31, 1 if args.quick else 3
    workdir = tempfile.mkdtemp(prefix="tw-retention-")
    path = os.path.join(workdir, "bench.db")
    url = f"sqlite:///{path}"
    tpl = templates(url)
    db = Database(url)
    settings = Settings(database_url=url)
    end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    first = end - timedelta(days=days)
    full_samples, full_spans = int(86_400 * args.rate * 0.05), int(86_400 * args.rate * 0.01)
    thinned = 1440 * settings.samples_thin_per_minute
    inserted = touched = 0
    insert_s = prune_s = 0.0
    daily: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for d in range(days - full_days):
        young = (days - d) <= settings.retention_spans_days + 1
        start = (first + timedelta(days=d)).timestamp()
        inserted += insert_day(db, tpl, start, thinned, full_spans if young else 0)
    insert_s += time.perf_counter() - t0
    report = prune(db, settings, now=end - timedelta(days=full_days))
    prune_s += report.seconds
    touched += sum(sum(c.values()) for c in report.tables.values())
    print(f"days 1-{days - full_days}: prune {report.seconds:.1f} s {report.tables}", flush=True)
    for d in range(days - full_days, days):
        t0 = time.perf_counter()
        start = (first + timedelta(days=d)).timestamp()
        inserted += insert_day(db, tpl, start, full_samples, full_spans)
        insert_s += time.perf_counter() - t0
        report = prune(db, settings, now=first + timedelta(days=d + 1))
        prune_s += report.seconds
        n = sum(sum(c.values()) for c in report.tables.values())
        touched += n
        daily.append((report.seconds, n))
        print(f"day {d + 1}: prune {report.seconds:.1f} s {report.tables}", flush=True)
    rows = sizes(db)
    with db.engine.connect() as conn:
        raw_mb = (conn.execute(text("SELECT coalesce(sum(length(raw)), 0) FROM samples"))
                  .scalar() or 0) / 1e6  # fmt: skip
        conn.execute(text("VACUUM"))
    db.dispose()
    size_gb = os.path.getsize(path) / 1e9
    per_million = prune_s / max(touched, 1) * 1e6
    daily_s, daily_n = sum(s for s, _ in daily), sum(n for _, n in daily)
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    print(f"\nMachine: {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
          f"Python {platform.python_version()}, {when}")  # fmt: skip
    print(f"{days} simulated days at {args.rate:g} calls/s ({full_days} at the full sampled "
          "rate), default retention settings\n")  # fmt: skip
    print("| measure | value | target |\n|---|---|---|")
    print(f"| rows inserted (samples, spans, 10 s aggregates) | {inserted:,} | |")
    print(f"| rows left: samples / spans / aggregates | {rows['samples']:,} / "
          f"{rows['spans']:,} / {rows['latency_aggregates']:,} | |")  # fmt: skip
    print(f"| raw arrays left | {raw_mb:,.0f} MB | |")
    print(f"| database file after VACUUM | {size_gb:.2f} GB | <= 2 GB per version |")
    print(f"| bulk insert | {inserted / insert_s:,.0f} rows/s | |")
    print(f"| prune, all runs | {prune_s:.1f} s for {touched:,} rows deleted, thinned, "
          f"cleared or rolled up | |")  # fmt: skip
    print(f"| prune cost per million rows, all runs | {per_million:.1f} s | |")
    print(f"| daily prune at steady state | {daily_s / len(daily):.1f} s for "
          f"{daily_n // len(daily):,} rows ({daily_s / max(daily_n, 1) * 1e6:.1f} s per "
          "million) | |")  # fmt: skip


if __name__ == "__main__":
    main()
