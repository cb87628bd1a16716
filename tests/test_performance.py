"""Realized performance: metrics against scikit-learn, windows and coverage, the detector, the
CLI, and the tuner's held-out part built from labelled production rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from monitor.detect import run_detection
from monitor.events import list_events, retune_requests
from monitor.features import pack_rows
from monitor.labels import log_labels
from monitor.performance import (
    PerformanceDetector,
    classification_metrics,
    compare_performance,
    realized_performance,
    regression_metrics,
)
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tests.test_labels import T0, classes, store_predictions
from tuner.cli import main

RNG = np.random.default_rng(7)


def test_classification_metrics_match_scikit_learn() -> None:
    y = RNG.integers(0, 4, 500)
    pred = np.where(RNG.random(500) < 0.7, y, RNG.integers(0, 4, 500))
    probs = RNG.dirichlet(np.ones(4), 500)
    m, ci, per = classification_metrics(y.astype(float), pred.astype(float), probs.tolist())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs, labels=[0, 1, 2, 3]))
    precision = skm.precision_score(y, pred, average=None)
    recall = skm.recall_score(y, pred, average=None)
    for c in range(4):
        assert per[str(c)]["precision"] == pytest.approx(precision[c])
        assert per[str(c)]["recall"] == pytest.approx(recall[c])
    for name in ("accuracy", "macro_f1", "log_loss"):
        lo, hi = ci[name]
        assert lo <= m[name] <= hi  # type: ignore[operator]


def test_regression_metrics_match_scikit_learn() -> None:
    y = RNG.normal(10, 2, 400)
    pred = y + RNG.normal(0, 0.5, 400)
    m, ci = regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert m["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)))
    assert m["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, pred))
    assert ci["mae"][0] < m["mae"] < ci["mae"][1]  # type: ignore[operator]


def _traffic(db: Database, version: str, arm: str, n: int, accuracy: float, offset_s: float,
             prefix: str, label_share: float = 1.0) -> None:  # fmt: skip
    """``n`` predictions one second apart from ``T0 + offset_s``; labels for a share of them,
    right for ``accuracy`` of those."""
    rng = np.random.default_rng(len(prefix) + n)
    truth = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < accuracy, truth, (truth + 1) % 3)
    ids = [f"{prefix}{i}" for i in range(n)]
    store_predictions(db, "clf", classes(pred.tolist()), list(ids), version=version, arm=arm,
                      start=T0 + timedelta(seconds=offset_s))  # fmt: skip
    keep = rng.random(n) < label_share
    order = rng.permutation(int(keep.sum()))  # labels arrive out of order
    chosen = np.flatnonzero(keep)[order]
    log_labels(db, "clf", [ids[i] for i in chosen], truth[chosen].tolist())


def test_windows_per_version_and_arm_with_coverage(db_url: str) -> None:
    db = Database(db_url)
    _traffic(db, "v1", "champion", 600, 0.9, 0, "a", label_share=0.5)
    _traffic(db, "v2", "challenger", 300, 0.6, 3600, "b")
    rows = realized_performance(db, "clf", window=timedelta(hours=1), windows=3,
                                end=T0 + timedelta(hours=2))  # fmt: skip
    got = {(w.version, w.arm, w.start): w for w in rows}
    v1 = got[("v1", "champion", T0)]
    assert v1.predictions == 600 and v1.labelled == pytest.approx(300, abs=40)
    assert v1.coverage == pytest.approx(v1.labelled / 600)
    assert v1.metrics["accuracy"] == pytest.approx(0.9, abs=0.05)
    v2 = got[("v2", "challenger", T0 + timedelta(hours=1))]
    assert (v2.labelled, v2.coverage) == (300, 1.0)
    assert v2.task == "classification" and set(v2.per_class) == {"0", "1", "2"}
    only = realized_performance(db, "clf", version="v2", window=timedelta(hours=1), windows=3,
                                end=T0 + timedelta(hours=2))  # fmt: skip
    assert {w.version for w in only} == {"v2"}
    db.dispose()


def test_detector_opens_performance_drop_and_asks_for_a_retune(db_url: str) -> None:
    db = Database(db_url)
    settings = Settings(database_url=db_url, performance_recent_s=3600,
                        performance_reference_s=3600)  # fmt: skip
    _traffic(db, "v1", "main", 1200, 0.92, 0, "ref")
    _traffic(db, "v1", "main", 1200, 0.80, 3600, "drop")
    now = T0 + timedelta(hours=2)
    events = run_detection(db, settings, detectors=[PerformanceDetector(settings)], now=now)
    assert [(e.kind, e.action) for e in events] == [("performance_drop", "opened")]
    details = events[0].details
    assert details["metric"] == "accuracy" and details["ci"][0] > settings.performance_tolerance
    assert "accuracy 0.9" in events[0].summary and "-> 0.8" in events[0].summary
    assert [r.model for r in retune_requests(db)] == ["clf"]  # in the default retune_on
    assert "performance_drop" in settings.retune_on.split(",")
    db.dispose()


def test_detector_stays_quiet_when_stable_or_short_of_labels(db_url: str) -> None:
    db = Database(db_url)
    settings = Settings(database_url=db_url, performance_recent_s=3600,
                        performance_reference_s=3600, performance_min_labels=100)  # fmt: skip
    _traffic(db, "v1", "main", 1000, 0.9, 0, "ref")
    _traffic(db, "v1", "main", 1000, 0.9, 3600, "same")
    _traffic(db, "v1", "main", 1000, 0.5, 7200, "few", label_share=0.05)
    det = PerformanceDetector(settings)
    stable = det.detect(db, T0 + timedelta(hours=2))
    assert [f.flagged for f in stable] == [False]
    assert det.detect(db, T0 + timedelta(hours=3)) == []  # 50 labels: no verdict
    assert list_events(db) == []
    db.dispose()


def test_regression_drop_needs_a_significant_and_large_mae_increase() -> None:
    rng = np.random.default_rng(3)
    y1, y2 = rng.normal(0, 1, 500), rng.normal(0, 1, 500)
    base = (y1, y1 + rng.normal(0, 1.0, 500))
    worse = compare_performance("regression", base, (y2, y2 + rng.normal(0, 1.5, 500)),
                                tolerance=0.1, alpha=0.05, min_labels=50)  # fmt: skip
    assert worse.dropped and worse.metric == "mae" and worse.change > 0.3  # type: ignore[operator]
    same = compare_performance("regression", base, (y2, y2 + rng.normal(0, 1.0, 500)),
                               tolerance=0.1, alpha=0.05, min_labels=50)  # fmt: skip
    assert not same.dropped


def test_cli_performance_json_and_text(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = Database(db_url)
    # 200 calls a second apart, ending ten minutes ago: inside the last two 1-hour windows.
    ago = (utcnow() - T0).total_seconds() - 800
    _traffic(db, "v1", "main", 200, 0.9, ago, "c", label_share=0.5)
    db.dispose()
    args = ["performance", "clf", "--window", "1h", "--windows", "2", "--json",
            "--database-url", db_url]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    windows = out["windows"]
    assert {w["version"] for w in windows} == {"v1"}
    assert sum(w["predictions"] for w in windows) == 200
    for w in windows:
        assert set(w) >= {"metrics", "labelled", "coverage", "ci"}
        assert {"accuracy", "macro_f1", "log_loss"} <= set(w["metrics"])
        assert w["coverage"] == pytest.approx(w["labelled"] / w["predictions"])
    assert main(args[:-3] + ["--database-url", db_url]) == 0
    text = capsys.readouterr().out
    assert "predictions" in text and "coverage" in text and "accuracy" in text
    assert main(["performance", "clf", "--windows", "0", "--database-url", db_url]) == 1
    assert "windows=0" in capsys.readouterr().err


def test_labelled_production_rows_are_the_tuners_held_out_part(db_url: str, tmp_path: Path) -> None:
    from tests.tuner_fixtures import export, load_digits_split, trained_mlp
    from tuner import registry
    from tuner.data import production_data
    from tuner.guard import AccuracyGuard
    from tuner.onnx_tools import describe_inputs

    digits = load_digits_split()
    onnx = export(trained_mlp(digits), digits.x_calib[:4], tmp_path / "mlp.onnx")
    settings = Settings(database_url=db_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(db_url)
    registry.register("digits", onnx, db=db, settings=settings)
    inputs = describe_inputs(onnx)
    x = digits.x_holdout[:160].astype(np.float32)
    y = digits.y_holdout[:160]
    now = utcnow() - timedelta(minutes=30)  # inside production_data's default window
    ids = [f"img{i}" for i in range(len(x))]
    raw = pack_rows({inputs[0].name: x}, len(x))
    store_predictions(db, "digits", [{"top_class": int(c)} for c in y], list(ids), raw=raw,
                      start=now)  # fmt: skip
    log_labels(db, "digits", ids[:64], y[:64].tolist())
    data = production_data(db, "digits", "v1", inputs)
    assert data.labels is not None and len(data.labels) == 64
    assert "64 labelled production rows" in data.source
    assert data.windows[-1]["kind"] == "labelled"
    held = data.holdout[inputs[0].name]
    truth = {x[i].tobytes(): int(y[i]) for i in range(64)}
    assert [truth[row.tobytes()] for row in held] == data.labels.tolist()
    # The guard now judges accuracy on production's ground truth: a candidate that agrees
    # with the source's wrong answers less often fails on the labels, not only on fidelity.
    reference = np.eye(10)[data.labels]
    guard = AccuracyGuard(reference, labels=data.labels)
    worse = reference.copy()
    worse[:8] = np.roll(worse[:8], 1, axis=1)
    result = guard.check(worse)
    assert not result.passed and "accuracy_drop" in result.reason
    assert result.metrics["accuracy"] == pytest.approx(56 / 64)
    db.dispose()


def test_a_tuning_run_guards_on_labelled_production_rows(sqlite_url: str, tmp_path: Path) -> None:
    from sqlalchemy import select

    from monitor import Monitor, schema
    from tests.tuner_fixtures import export, load_digits_split, trained_mlp
    from tuner import registry
    from tuner.onnx_tools import describe_inputs
    from tuner.tuning import run_tuning

    digits = load_digits_split()
    onnx = export(trained_mlp(digits), digits.x_calib[:4], tmp_path / "mlp.onnx")
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    registry.register("digits", onnx, db=db, settings=settings)
    name = describe_inputs(onnx)[0].name
    ids = [f"req-{i}" for i in range(160)]
    with Monitor(sqlite_url) as mon:  # predictions with ids, labels for half of them later
        mon.log(name="digits", inputs={name: digits.x_holdout[:160]}, ids=ids)
        report = mon.log_labels(name="digits", ids=ids[:80][::-1],
                                labels=digits.y_holdout[:80][::-1].tolist())  # fmt: skip
    assert report.matched == 80
    outcome = run_tuning(db, settings, "digits", quick=True, slo_ms=1000.0, min_gain=100.0)
    assert "held-out part: 80 labelled production rows" in outcome.data_source
    guarded = [t for t in outcome.result.leaderboard if t.accuracy]
    assert guarded and all("accuracy" in t.accuracy and "top1_agreement" in t.accuracy
                           for t in guarded)  # fmt: skip
    with db.session() as s:
        run = s.scalars(select(schema.TuningRun)).one()
        assert run.summary["labelled_holdout_rows"] == 80
    db.dispose()


def test_experiment_arms_compared_on_their_labels(db_url: str) -> None:
    from monitor.performance import compare_arms

    db = Database(db_url)
    settings = Settings(database_url=db_url)
    _traffic(db, "v1", "champion", 800, 0.92, 0, "champ")
    _traffic(db, "v2", "challenger", 800, 0.78, 0, "chall")
    end = T0 + timedelta(hours=1)
    worse = compare_arms(db, "clf", ("v1", "champion"), ("v2", "challenger"), T0, end, settings)
    assert worse["status"] == "ok" and worse["worse"] is True
    assert worse["champion"]["labelled"] == 800 and worse["challenger"]["coverage"] == 1.0
    assert worse["reason"].startswith("challenger worse on labels: drop: accuracy 0.9")
    same = compare_arms(db, "clf", ("v1", "champion"), ("v1", "champion"), T0, end, settings)
    assert same["worse"] is False
    none = compare_arms(db, "clf", ("v9", "champion"), ("v8", "challenger"), T0, end, settings)
    assert (none["status"], none["worse"]) == ("no_labels", False)
    db.dispose()


def test_detect_cli_and_the_scheduled_job_run_the_performance_detector(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner import jobs

    db = Database(sqlite_url)
    recent = (utcnow() - T0).total_seconds() - 1200  # 1,000 calls ending 3 minutes ago
    _traffic(db, "v1", "main", 1000, 0.95, recent - 86_400 / 2, "old")
    _traffic(db, "v1", "main", 1000, 0.70, recent, "new")
    settings = Settings(database_url=sqlite_url)
    jobs.configure(settings, db)
    result = jobs.performance_detection()
    assert [(e["kind"], e["action"]) for e in result["events"]] == [("performance_drop", "opened")]
    _traffic(db, "v2", "main", 20, 0.7, recent, "few")  # too few labels: a listed skip
    db.dispose()
    assert main(["detect", "--verbose", "--database-url", sqlite_url]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "tested performance_drop: clf:v1 [main] realized performance dropped" in text
    assert "skipped performance clf:v2[main]: insufficient data" in text
    assert "tested 1 conditions (1 flagged), skipped 1 for too little data" in out.out


@pytest.mark.parametrize(
    ("challenger_accuracy", "decision"), [(0.75, "rollback"), (0.92, "promote")]
)
def test_an_experiment_is_judged_on_its_arms_labels(
    sqlite_url: str, tmp_path: Path, challenger_accuracy: float, decision: str
) -> None:
    from tests.test_web import _store_minutes, _tuned_candidate
    from tuner import experiments, promotions
    from tuner.analysis import run_analysis

    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    _tuned_candidate(db, settings, tmp_path)
    exp = experiments.start(db, "clf", "v2", share=0.5, min_samples=200)
    first = exp.started_at + timedelta(seconds=1)
    _store_minutes(db, "v1", "champion", first, [(240, 0, 3.1)] * 5)  # the challenger is
    _store_minutes(db, "v2", "challenger", first, [(236, 0, 2.3)] * 5)  # faster: x1.3
    offset = (first - T0).total_seconds()
    _traffic(db, "v1", "champion", 600, 0.92, offset, "ch")
    _traffic(db, "v2", "challenger", 600, challenger_accuracy, offset, "cl")
    (verdict,) = run_analysis(db, settings, now=exp.started_at + timedelta(minutes=15))
    assert verdict.decision == decision, verdict.reason
    labels = {v["guardrail"]: v for v in verdict.evidence["verdicts"]}["labels"]
    assert labels["effect"]["labelled"] == [600, 600]
    if decision == "rollback":
        assert labels["status"] == "breach"
        assert verdict.reason.startswith("guardrail: challenger worse on labels: drop: accuracy")
    else:  # the approval page shows the pending promotion's evidence, labels included
        assert labels["status"] == "pass"
        (pending,) = promotions.list_promotions(db, model="clf")
        shown = [v["guardrail"] for v in pending.evidence["verdicts"]]
        assert shown == ["latency", "errors", "agreement", "labels"]
    db.dispose()
