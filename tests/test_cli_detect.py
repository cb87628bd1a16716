"""``tunewatch detect``, ``drift`` and ``events``: the JSON other tools rely on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from monitor import Monitor
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
