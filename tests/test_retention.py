"""Retention and downsampling on SQLite and PostgreSQL, through the real writer and CLI."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from monitor import Monitor, Settings, schema, sketch
from monitor.retention import ROLLUP_PREFIX, prune
from monitor.storage import Database, create_db_engine, read_aggregates, upgrade
from tuner.cli import main

NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)  # ranges stay in one minute
RNG = np.random.default_rng(5)


def _settings(url: str, **changes: Any) -> Settings:
    return Settings(database_url=url, drift_reference_rows=50, sample_cap_per_minute=1_000_000,
                    samples_thin_per_minute=10, **changes)  # fmt: skip


def _log(mon: Monitor, start: datetime, n: int, seconds: float, version: str = "v1") -> np.ndarray:
    """Backfill ``n`` calls (8-value tensor rows, lognormal latencies) over ``seconds``."""
    latencies = RNG.lognormal(1.0, 0.6, n)
    times = [start + timedelta(seconds=seconds * i / n) for i in range(n)]
    mon.log(name="m", version=version, inputs=RNG.normal(size=(n, 8)).astype(np.float32),
            latency_ms=latencies, timestamps=times)  # fmt: skip
    return latencies


def _count(db: Database, table: Any, *where: Any) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def _quantiles(db: Database, start: datetime, end: datetime) -> list[float]:
    rows = read_aggregates(db, "m", "v1", start=start, end=end)
    return sketch.quantiles(sketch.merge(r.buckets for r in rows), (0.5, 0.95, 0.99))


def test_rolled_up_percentiles_equal_the_raw_ones_within_the_sketch_error(db_url: str) -> None:
    settings = _settings(db_url, retention_batch_rows=100)  # steps split across batches
    ranges = {  # hour-aligned ranges: 3 days old -> minute rows, 40 days old -> hour rows
        60: NOW.replace(minute=0, second=0) - timedelta(days=3),
        3600: NOW.replace(minute=0, second=0) - timedelta(days=40),
    }
    truth: dict[int, np.ndarray] = {}
    with Monitor(settings=settings, sample_rate=0.0) as mon:
        for step, start in ranges.items():
            truth[step] = _log(mon, start, 3000, 3600)
        mon.flush()
        db = mon.db
        before = {step: _quantiles(db, s, s + timedelta(hours=1)) for step, s in ranges.items()}
        report = prune(db, settings)
        assert report.tables["latency_aggregates"]["rolled_up"] == 2 * 360  # 10 s rows
        for step, start in ranges.items():
            end = start + timedelta(hours=1)
            rows = read_aggregates(db, "m", "v1", start=start, end=end)
            assert {r.interval_s for r in rows} == {step}
            assert len(rows) == 3600 // step and sum(r.calls for r in rows) == 3000
            after = _quantiles(db, start, end)
            assert after == before[step]  # merged buckets are exact
            raw = np.percentile(truth[step], [50, 95, 99], method="inverted_cdf")
            np.testing.assert_allclose(after, raw, rtol=sketch.RELATIVE_ERROR)
        again = prune(db, settings)
    assert again.tables["latency_aggregates"].get("rolled_up", 0) == 0


def test_samples_spans_and_job_runs_age_out_thin_and_lose_raw(db_url: str) -> None:
    settings = _settings(db_url)
    with Monitor(settings=settings, sample_rate=0.0) as mon:
        _log(mon, NOW - timedelta(days=29.5), 50, 50)  # the drift reference: kept
        _log(mon, NOW - timedelta(days=31), 10, 10, version="v0")  # too few rows: all kept
        _log(mon, NOW - timedelta(days=29), 100, 30)  # old enough for raw clearing
        _log(mon, NOW - timedelta(days=20), 300, 30)  # thinned to 10, raw cleared
        _log(mon, NOW - timedelta(days=5), 300, 30)  # thinned to 10, raw kept
        _log(mon, NOW - timedelta(hours=1), 300, 30)  # untouched
        mon.flush()
        db = mon.db
    with db.session() as s:
        s.add(schema.JobRun(job_id="x", slot=1, instance="t", started_at=NOW - timedelta(days=40),
                            status="success"))  # fmt: skip
        s.add(schema.JobRun(job_id="x", slot=2, instance="t", started_at=NOW - timedelta(days=40),
                            status="running"))  # fmt: skip
    dry = prune(db, settings, dry_run=True)
    assert _count(db, schema.Sample) == 1060 and _count(db, schema.JobRun) == 2
    report = prune(db, settings)
    assert report.tables == dry.tables  # the dry run counted exactly what the run did
    t = schema.Sample
    assert report.tables["samples"] == {"deleted": 0, "thinned": 90 + 290 + 290,
                                        "raw_cleared": 10 + 10}  # fmt: skip
    assert _count(db, t, t.ts < NOW - timedelta(days=25)) == 50 + 10 + 10
    assert _count(db, t, t.ts > NOW - timedelta(days=2)) == 300
    assert _count(db, t, t.raw.is_not(None), t.ts > NOW - timedelta(days=14)) == 310
    assert _count(db, t, t.raw.is_not(None)) == 50 + 10 + 310  # references keep raw rows
    assert _count(db, schema.CallSpan) == 300 + 300  # 7 days
    assert _count(db, schema.JobRun) == 1
    db.dispose()


def test_prune_with_heavy_writes_loses_nothing_inside_the_window(db_url: str) -> None:
    settings = _settings(db_url, retention_batch_rows=40, samples_thin_after_days=0.0)
    calls = 2000
    with Monitor(settings=settings, sample_rate=1.0, span_sample_rate=1.0) as mon:
        _log(mon, NOW - timedelta(days=31), 50, 50)  # the reference
        _log(mon, NOW - timedelta(days=30.5), 600, 300)  # to be deleted, 40 rows at a time
        mon.flush()
        model = mon.wrap(lambda x: x * 2, name="m", version="v1")
        done = threading.Event()

        def serve() -> None:
            for i in range(calls):
                model(np.full((1, 8), float(i), dtype=np.float32))
            done.set()

        writer = threading.Thread(target=serve)
        writer.start()
        reports = []
        while not done.is_set() or not reports:
            reports.append(prune(mon.db, settings))
        writer.join()
        mon.flush()
        reports.append(prune(mon.db, settings))
        db = mon.db
        t = schema.Sample
        deleted = sum(r.tables["samples"].get("deleted", 0) for r in reports)
        assert deleted == 600
        assert _count(db, t, t.ts > NOW - timedelta(days=1)) == calls
        assert _count(db, schema.CallSpan, schema.CallSpan.source == "call") == calls
        recent = read_aggregates(db, "m", "v1", start=NOW - timedelta(days=1))
        assert sum(r.calls for r in recent) == calls


def test_prune_cli_reports_json_and_dry_run_changes_nothing(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEWATCH_DRIFT_REFERENCE_ROWS", "50")
    monkeypatch.setenv("TUNEWATCH_SAMPLES_THIN_PER_MINUTE", "10")
    with Monitor(settings=_settings(sqlite_url), sample_rate=0.0) as mon:
        _log(mon, NOW - timedelta(days=29.5), 50, 50)
        _log(mon, NOW - timedelta(days=10), 120, 60)
        mon.flush()
    db = Database(sqlite_url)
    before = _count(db, schema.Sample), _count(db, schema.LatencyAggregate)
    env_args = ["--database-url", sqlite_url, "--json"]
    assert main(["db", "prune", "--dry-run", *env_args]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["tables"]["samples"]["thinned"] == 110
    assert (_count(db, schema.Sample), _count(db, schema.LatencyAggregate)) == before
    assert main(["db", "prune", *env_args]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["tables"] == dry["tables"]
    assert _count(db, schema.Sample) == before[0] - 110
    t = schema.LatencyAggregate
    assert _count(db, t, t.instance_id.like(ROLLUP_PREFIX + "%")) == 2  # 1-minute rows
    assert main(["db", "prune", "--database-url", sqlite_url]) == 0
    assert "samples: deleted 0, thinned 0, raw_cleared 0" in capsys.readouterr().out
    db.dispose()


def test_prune_on_a_database_behind_head_asks_for_an_upgrade(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_db_engine(sqlite_url)
    upgrade(engine, "0004")
    engine.dispose()
    assert main(["db", "prune", "--database-url", sqlite_url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tunewatch db upgrade" in err


def test_negative_retention_settings_are_refused() -> None:
    from monitor.errors import ConfigError

    with pytest.raises(ConfigError, match="retention_spans_days=-1"):
        Settings(retention_spans_days=-1)


def test_predictions_with_ids_are_not_thinned_while_they_wait_for_labels(
    sqlite_url: str,
) -> None:
    settings = _settings(sqlite_url)
    with Monitor(settings=settings, sample_rate=0.0) as mon:
        _log(mon, NOW - timedelta(days=29.5), 50, 50)  # the drift reference
        n = 300
        times = [NOW - timedelta(days=5) + timedelta(seconds=30 * i / n) for i in range(n)]
        ids = [f"order-{i}" for i in range(n // 2)]
        mon.log(name="m", version="v1", inputs=RNG.normal(size=(n // 2, 8)).astype(np.float32),
                latency_ms=np.ones(n // 2), timestamps=times[: n // 2], ids=ids)  # fmt: skip
        mon.log(name="m", version="v1", inputs=RNG.normal(size=(n // 2, 8)).astype(np.float32),
                latency_ms=np.ones(n // 2), timestamps=times[n // 2 :])  # fmt: skip
        mon.flush()
        db = mon.db
    report = prune(db, settings)
    t = schema.Sample
    assert _count(db, t, t.request_id.is_not(None)) == 150  # every labelled-to-be row kept
    assert report.tables["samples"]["thinned"] == 150 - 10  # the rest down to 10 a minute
    db.dispose()
