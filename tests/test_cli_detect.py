"""``tunewatch detect``, ``drift`` and ``events``: the JSON other tools rely on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from monitor import Monitor, schema
from monitor.storage import Database
from tuner.cli import main

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _seed(url: str) -> None:
    rng = np.random.default_rng(0)
    with Monitor(url) as mon:
        n = 1200
        times = [NOW - timedelta(hours=2) + timedelta(seconds=6 * i) for i in range(n)]
        frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
        frame.loc[n // 2 :, "a"] += 1.5  # the second hour drifts on column a
        lat = rng.lognormal(np.log(10), 0.2, n) * np.where(np.arange(n) >= n - 150, 1.5, 1.0)
        mon.log(name="fraud", version="v2", inputs=frame, latency_ms=lat, timestamps=times)


def test_detect_json_lists_events_then_events_ack(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    _seed(db_url)
    code, out, _ = _run(capsys, "detect", "--json", "--database-url", db_url)
    assert code == 0
    events = json.loads(out)["events"]
    assert {e["kind"] for e in events} == {"latency_regression", "data_drift"}
    for e in events:
        assert {"kind", "model", "version", "severity", "summary", "details"} <= set(e)
        assert (e["model"], e["version"]) == ("fraud", "v2")
    code, out, _ = _run(capsys, "events", "--status", "open", "--json", "--database-url", db_url)
    listed = json.loads(out)["events"]
    assert code == 0 and len(listed) == 2
    code, out, _ = _run(
        capsys,
        "events",
        "ack",
        str(listed[0]["id"]),
        "--by",
        "ana",
        "--json",
        "--database-url",
        db_url,
    )
    acked = json.loads(out)["events"][0]
    assert code == 0 and acked["status"] == "acknowledged" and acked["acknowledged_by"] == "ana"
    code, _, err = _run(capsys, "events", "ack", "9999", "--database-url", db_url)
    assert code == 1 and "event 9999 does not exist" in err


def test_drift_over_explicit_windows(capsys: pytest.CaptureFixture[str], sqlite_url: str) -> None:
    _seed(sqlite_url)
    iso = [(NOW - timedelta(hours=h)).isoformat() for h in (2, 1, 0)]
    code, out, _ = _run(
        capsys,
        "drift",
        "fraud",
        "--reference-start",
        iso[0],
        "--reference-end",
        iso[1],
        "--current-start",
        iso[1],
        "--current-end",
        iso[2],
        "--json",
        "--database-url",
        sqlite_url,
    )
    assert code == 0
    report = json.loads(out)
    assert report["drift_detected"] is True and report["share_drifted"] == 0.5
    assert report["rows"] == {"reference": 600, "current": 600} and report["version"] == "v2"
    by_col = {c["column"]: c for c in report["columns"]}
    assert by_col["a"]["drifted"] and not by_col["b"]["drifted"]
    assert {"method", "score", "threshold", "drifted"} <= set(by_col["a"])


def test_drift_with_empty_windows_says_insufficient_data(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    _seed(sqlite_url)
    code, out, _ = _run(
        capsys,
        "drift",
        "fraud",
        "--reference-start",
        "2020-01-01T00:00:00Z",
        "--reference-end",
        "2020-01-02T00:00:00Z",
        "--current-start",
        "2020-01-02T00:00:00Z",
        "--current-end",
        "2020-01-03T00:00:00Z",
        "--json",
        "--database-url",
        sqlite_url,
    )
    report = json.loads(out)
    assert code == 0 and report["status"] == "insufficient_data"
    assert "insufficient data: 0 of 30 rows" in report["message"]
    code, _, err = _run(
        capsys,
        "drift",
        "fraud",
        "--reference-start",
        "yesterday",
        "--reference-end",
        "x",
        "--current-start",
        "x",
        "--current-end",
        "x",
        "--database-url",
        sqlite_url,
    )
    assert code == 1 and "--reference-start='yesterday' is not an ISO-8601 time" in err
    code, _, err = _run(
        capsys,
        "drift",
        "nosuch",
        "--reference-start",
        "2020-01-01",
        "--reference-end",
        "x",
        "--current-start",
        "x",
        "--current-end",
        "x",
        "--database-url",
        sqlite_url,
    )
    assert code == 1 and "model 'nosuch' has no data" in err


def _report_count(url: str) -> int:
    db = Database(url)
    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(schema.DriftReport)) or 0)
    finally:
        db.dispose()


def test_drift_without_windows_uses_the_documented_defaults(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    _seed(sqlite_url)
    code, out, _ = _run(capsys, "drift", "fraud", "--json", "--database-url", sqlite_url)
    report = json.loads(out)
    ref_start, ref_end = map(datetime.fromisoformat, report["reference_window"])
    cur_start, cur_end = map(datetime.fromisoformat, report["current_window"])
    seeded = [NOW - timedelta(hours=2) + timedelta(seconds=6 * i) for i in range(1200)]
    in_last_hour = sum(cur_start <= t < cur_end for t in seeded)
    # The first 500 samples after go-live (all before the shift) against the last hour.
    assert code == 0 and report["rows"] == {"reference": 500, "current": in_last_hour}
    assert ref_start == seeded[0] and ref_end == seeded[499] and ref_end < cur_start
    assert cur_end - cur_start == timedelta(hours=1)
    assert report["drift_detected"] is True
    assert [c["column"] for c in report["columns"] if c["drifted"]] == ["a"]


def test_reversed_empty_or_partial_windows_are_refused(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    _seed(sqlite_url)
    before = _report_count(sqlite_url)
    iso = [(NOW - timedelta(hours=h)).isoformat() for h in (2, 1, 0)]
    windows = {
        "reversed": ("--reference-start", iso[1], "--reference-end", iso[0],
                     "--current-start", iso[1], "--current-end", iso[2]),
        "empty": ("--reference-start", iso[0], "--reference-end", iso[1],
                  "--current-start", iso[2], "--current-end", iso[2]),
    }  # fmt: skip
    for word, args in windows.items():
        code, out, err = _run(capsys, "drift", "fraud", *args, "--database-url", sqlite_url)
        assert code == 1 and out == "" and err.count("\n") == 1
        assert f"is {word}: --" in err
    code, _, err = _run(capsys, "drift", "fraud", "--current-end", iso[2],
                        "--database-url", sqlite_url)  # fmt: skip
    assert code == 1 and "drift got --current-end only: give all four" in err
    assert _report_count(sqlite_url) == before  # nothing was stored


def test_detect_says_what_it_tested_and_why_it_skipped(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    _seed(sqlite_url)
    with Monitor(sqlite_url) as mon:  # a version whose samples are all older than an hour
        old = [NOW - timedelta(hours=5) + timedelta(seconds=i) for i in range(40)]
        frame = pd.DataFrame({"a": np.zeros(40)})
        mon.log(name="quiet", version="v1", inputs=frame, latency_ms=np.ones(40), timestamps=old)
    code, out, err = _run(capsys, "detect", "--verbose", "--database-url", sqlite_url)
    assert code == 0
    assert "tested latency_regression: fraud:v2 [main] latency regressed" in err
    assert "tested data_drift: fraud:v2 inputs drifted" in err
    assert "skipped drift quiet:v1: no samples in the last 3600 s" in err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("tested 2 conditions (2 flagged), skipped 1 for too little data;")
    assert summary.endswith("2 events changed")
    code, out, err = _run(capsys, "detect", "--database-url", sqlite_url)
    assert code == 0 and err == "" and out.count("[updated]") == 2
    last = out.strip().splitlines()[-1]
    assert last == "tested 2 conditions (2 flagged), skipped 1 for too little data " \
        "(--verbose says why); 2 events changed"  # fmt: skip
    code, out, _ = _run(capsys, "detect", "--json", "--database-url", sqlite_url)
    report = json.loads(out)
    assert {(t["kind"], t["flagged"]) for t in report["tested"]} == {
        ("latency_regression", True), ("data_drift", True)}  # fmt: skip
    assert report["skipped"] == ["skipped drift quiet:v1: no samples in the last 3600 s"]
