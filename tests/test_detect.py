"""Detection end to end: data goes in through the wrapper or ``Monitor.log``, events come out."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from monitor import Monitor, Settings, schema
from monitor.detect import DriftDetector, LatencyDetector, run_detection
from monitor.events import Notifier, list_events, retune_requests
from monitor.storage import Database

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def _times(start: datetime, end: datetime, n: int) -> list[datetime]:
    step = (end - start) / n
    return [start + step * i for i in range(n)]


def _backfill_latency(
    mon: Monitor, start: datetime, end: datetime, n: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    lat = rng.lognormal(np.log(20.0 * scale), 0.3, n)
    mon.log(
        name="ranker",
        version="v1",
        inputs=rng.normal(size=(n, 3)),
        latency_ms=lat,
        timestamps=_times(start, end, n),
    )


def _settings(url: str, **kw: Any) -> Settings:
    return Settings(database_url=url, **kw)


def test_latency_regression_opens_one_event_and_resolves_when_it_clears(db_url: str) -> None:
    with Monitor(db_url) as mon:
        _backfill_latency(mon, NOW - timedelta(hours=3), NOW - timedelta(hours=1), 800, 1.0, 1)
        # The regression began 45 minutes before the 15-minute recent window and persists.
        _backfill_latency(mon, NOW - timedelta(hours=1), NOW, 400, 1.3, 2)
        mon.flush()
    settings = _settings(db_url, retune_on="latency_regression")
    db = Database(db_url)
    detectors = [LatencyDetector(settings)]
    first = run_detection(db, settings, detectors=detectors, now=NOW)
    assert [(e.kind, e.action, e.model, e.version, e.arm) for e in first] == [
        ("latency_regression", "opened", "ranker", "v1", "main")
    ]
    details = first[0].details
    assert details["source"] == "per_call" and details["median_ci"][0] > 1.1
    second = run_detection(db, settings, detectors=detectors, now=NOW + timedelta(minutes=5))
    assert [(e.id, e.action, e.occurrences) for e in second] == [(first[0].id, "updated", 2)]
    assert [r.model for r in retune_requests(db)] == ["ranker"]  # requested once, on open
    # Back to normal: compared with the baseline the open event froze, the condition clears.
    with Monitor(db_url) as mon:
        _backfill_latency(
            mon, NOW + timedelta(minutes=20), NOW + timedelta(minutes=40), 300, 1.0, 3
        )
    later = run_detection(db, settings, detectors=detectors, now=NOW + timedelta(minutes=40))
    assert [(e.id, e.action, e.status) for e in later] == [(first[0].id, "resolved", "resolved")]
    assert len(list_events(db)) == 1
    db.dispose()


def test_stable_latency_raises_nothing(db_url: str) -> None:
    with Monitor(db_url) as mon:
        _backfill_latency(mon, NOW - timedelta(hours=3), NOW, 1200, 1.0, 4)
    settings = _settings(db_url)
    db = Database(db_url)
    assert run_detection(db, settings, detectors=[LatencyDetector(settings)], now=NOW) == []
    db.dispose()


def test_latency_from_interval_aggregates_of_wrapped_calls(sqlite_url: str) -> None:
    delay = [0.001]

    def model(x: object) -> object:
        time.sleep(delay[0])
        return x

    with Monitor(sqlite_url, aggregate_interval_s=1, span_sample_rate=0.0) as mon:
        wrapped = mon.wrap(model, name="sleepy", version="v1")
        t_end = time.time() + 2.5
        while time.time() < t_end:
            wrapped(1)
        delay[0] = 0.004  # the model gets four times slower
        time.sleep(1.0)
        t_end = time.time() + 2.0
        while time.time() < t_end:
            wrapped(1)
        mon.flush()
    settings = _settings(sqlite_url, latency_recent_s=2, latency_baseline_s=60)
    db = Database(sqlite_url)
    events = run_detection(db, settings, detectors=[LatencyDetector(settings)])
    db.dispose()
    assert [(e.kind, e.model) for e in events] == [("latency_regression", "sleepy")]
    assert events[0].details["source"] == "aggregates"
    assert events[0].details["median_ratio"] > 2


def _drift_log(
    mon: Monitor, start: datetime, end: datetime, n: int, shift: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"f{i}" for i in range(6)])
    frame[["f0", "f1"]] += shift
    frame["plan"] = rng.choice(["basic", "pro"], size=n, p=[0.7, 0.3] if shift == 0 else [0.3, 0.7])
    scores = rng.normal(size=(n, 3)) + np.array([shift, 0, 0])
    mon.log(
        name="churn", version="v1", inputs=frame, outputs=scores, timestamps=_times(start, end, n)
    )


def test_drift_opens_data_and_prediction_events_with_reports(db_url: str) -> None:
    with Monitor(db_url) as mon:
        _drift_log(mon, NOW - timedelta(hours=5), NOW - timedelta(hours=4), 400, 0.0, 1)
        _drift_log(mon, NOW - timedelta(minutes=50), NOW, 400, 1.0, 2)
    settings = _settings(db_url, drift_reference_rows=400)
    db = Database(db_url)
    events = run_detection(db, settings, detectors=[DriftDetector(settings)], now=NOW)
    kinds = {e.kind: e for e in events}
    assert set(kinds) == {"data_drift", "prediction_drift"}
    data = kinds["data_drift"]
    drifted = {c["column"] for c in data.details["columns"] if c["drifted"]}
    assert {"f0", "f1", "plan"} <= drifted and not drifted & {"f3", "f4", "f5"}
    assert data.details["rows"] == {"reference": 400, "current": 400}
    with db.session() as s:
        reports = s.scalar(select(func.count()).select_from(schema.DriftReport))
        linked = s.scalar(
            select(schema.DriftReport.event_id).where(schema.DriftReport.target == "inputs")
        )
        columns = s.scalar(select(func.count()).select_from(schema.DriftColumn))
    assert reports == 2 and linked == data.id and columns == 7 + 2  # top_class, confidence
    db.dispose()


def test_same_distribution_is_not_drift(db_url: str) -> None:
    with Monitor(db_url) as mon:
        _drift_log(mon, NOW - timedelta(hours=5), NOW - timedelta(hours=4), 400, 0.0, 5)
        _drift_log(mon, NOW - timedelta(minutes=50), NOW, 400, 0.0, 6)
    settings = _settings(db_url, drift_reference_rows=400)
    db = Database(db_url)
    assert run_detection(db, settings, detectors=[DriftDetector(settings)], now=NOW) == []
    db.dispose()


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_gets_opened_events_and_a_dead_one_breaks_nothing(sqlite_url: str) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with Monitor(sqlite_url) as mon:
        _backfill_latency(mon, NOW - timedelta(hours=3), NOW - timedelta(minutes=30), 600, 1.0, 7)
        _backfill_latency(mon, NOW - timedelta(minutes=30), NOW, 300, 1.5, 8)
    settings = _settings(sqlite_url)
    db = Database(sqlite_url)
    hook = Notifier(f"http://127.0.0.1:{server.server_address[1]}/hook")
    events = run_detection(
        db, settings, detectors=[LatencyDetector(settings)], notifier=hook, now=NOW
    )
    server.shutdown()
    assert [p["event"]["id"] for p in _Hook.received] == [events[0].id]
    assert _Hook.received[0]["event"]["kind"] == "latency_regression"
    dead = Notifier("http://127.0.0.1:1/hook", timeout_s=0.5, retries=2, backoff_s=0.01)
    assert dead.notify(events[0]) is False
    db.dispose()


def test_bad_settings_name_the_value() -> None:
    from monitor import ConfigError

    with pytest.raises(ConfigError, match="drift_correction='holm'"):
        Settings(drift_correction="holm")
    with pytest.raises(ConfigError, match="latency_baseline_start='last week'"):
        settings = Settings(latency_baseline_start="last week", latency_baseline_end="x")
        LatencyDetector(settings).baseline_window(None, "c", NOW, None)  # type: ignore[arg-type]
