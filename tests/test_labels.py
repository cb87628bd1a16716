"""Labels: logged by id in any order, joined to stored predictions, bad input named."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from monitor import Monitor, schema
from monitor.errors import ConfigError
from monitor.labels import REQUEST, log_labels, request_context, row_ids
from monitor.storage import Database, insert_rows
from tuner.cli import main

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def store_predictions(
    db: Database, model: str, outputs: list[dict[str, Any]], ids: list[str | None],
    version: str = "v1", arm: str = "main", start: datetime = T0, step_s: float = 1.0,
    raw: list[bytes] | None = None,
) -> None:  # fmt: skip
    """Sampled predictions as the writer stores them, one per output summary."""
    rows = [
        {"model": model, "version": version, "arm": arm, "source": "log",
         "ts": start + timedelta(seconds=i * step_s), "input_kind": "tabular",
         "features": {"x0": float(i)}, "outputs": out,
         "raw": raw[i] if raw else None, "raw_bytes": len(raw[i]) if raw else None,
         "request_id": rid}
        for i, (out, rid) in enumerate(zip(outputs, ids))
    ]  # fmt: skip
    with db.session() as s:
        insert_rows(s, schema.Sample, rows)


def classes(preds: list[int], n: int = 3) -> list[dict[str, Any]]:
    out = []
    for c in preds:
        probs = [0.1 / (n - 1)] * n
        probs[c] = 0.9
        out.append({"top_class": c, "confidence": 0.9, "probs": probs})
    return out


def _labels(db: Database, model: str) -> dict[str, tuple[float | None, int]]:
    t = schema.Label
    with db.session() as s:
        rows = s.execute(select(t.request_id, t.value, t.updates).where(t.model == model))
        return {rid: (v, n) for rid, v, n in rows}


def test_labels_join_by_id_in_any_order_and_count_what_did_not(db_url: str) -> None:
    db = Database(db_url)
    store_predictions(db, "clf", classes([0, 1, 2, 1]), ["a", "b", "c", "d"])
    # Out of order, one id never sampled, one duplicate in the batch, one NaN.
    report = log_labels(db, "clf", ["d", "zz", "b", "a", "b", "c"],
                        [1, 2, 0, 0, 1, float("nan")])  # fmt: skip
    assert report.to_dict() == {
        "model": "clf", "received": 6, "stored": 5, "matched": 4, "not_sampled": 1,
        "duplicates": 1, "missing": 1, "task": "classification",
    }  # fmt: skip
    assert _labels(db, "clf")["b"] == (1.0, 0)  # the last label of the batch wins
    # A later batch for a known id replaces its label and counts the duplicate.
    again = log_labels(db, "clf", ["c"], [2])
    assert (again.duplicates, again.matched, again.missing) == (1, 1, 0)
    assert _labels(db, "clf")["c"] == (2.0, 1)
    assert "1 not sampled" in report.summary() and "1 duplicates" in report.summary()
    db.dispose()


def test_a_label_before_its_prediction_joins_once_the_prediction_is_stored(db_url: str) -> None:
    db = Database(db_url)
    store_predictions(db, "reg", [{"value": 1.5}], ["early"])
    first = log_labels(db, "reg", ["late"], [2.5])
    assert (first.matched, first.not_sampled, first.task) == (0, 1, "regression")
    store_predictions(db, "reg", [{"value": 2.0}], ["late"], start=T0 + timedelta(seconds=5))
    from monitor.performance import read_joined

    groups, _ = read_joined(db, "reg")
    assert np.nansum(groups[0].label) == 2.5 and int(np.isnan(groups[0].label).sum()) == 1
    db.dispose()


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (["cat", 1], "label 'cat' for id 'a' is not a number"),
        ([[0, 1], 1], "label [0, 1] for id 'a' has shape (2,)"),
        ([1.5, 1], "label 1.5 for id 'a' is not a class index"),
        ([7, 1], "label 7 for id 'a' is not below the 3 output classes"),
        ([{"y": 1}, 1], "label {'y': 1} for id 'a'"),
    ],
)
def test_labels_of_the_wrong_type_or_shape_name_the_value(
    db_url: str, labels: list[Any], fragment: str
) -> None:
    db = Database(db_url)
    store_predictions(db, "clf", classes([0, 1]), ["a", "b"])
    with pytest.raises(ConfigError) as err:
        log_labels(db, "clf", ["a", "b"], labels)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert _labels(db, "clf") == {}  # nothing half-stored
    db.dispose()


def test_bad_batches_are_refused_with_the_fix(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    with pytest.raises(ConfigError, match="ids has 1 entries for 2 rows"):
        log_labels(db, "clf", ["a"], [0, 1])
    with pytest.raises(ConfigError, match=r"id None \(row 1\)"):
        log_labels(db, "clf", ["a", None], [0, 1])
    with pytest.raises(ConfigError, match="shape"):
        log_labels(db, "clf", ["a", "b"], np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="task='ranking'"):
        log_labels(db, "clf", ["a"], [0], task="ranking")
    db.dispose()


def test_integer_predictions_make_a_classification_and_task_overrides(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    store_predictions(db, "pred", [{"value": 2.0}, {"value": 0.0}], ["a", "b"])
    assert log_labels(db, "pred", ["a"], [2]).task == "classification"
    with pytest.raises(ConfigError, match="not a class index"):
        log_labels(db, "pred", ["b"], [0.5])
    assert log_labels(db, "pred", ["b"], [0.5], task="regression").task == "regression"
    db.dispose()


def test_cli_imports_csv_and_parquet(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(db_url)
    store_predictions(db, "clf", classes([0, 1, 2]), ["r1", "r2", "r3"])
    db.dispose()
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\nr1,0\nr2,\nr9,1\n")
    assert main(["labels", "import", "clf", str(csv), "--database-url", db_url]) == 0
    out = capsys.readouterr().out
    assert "3 labels, 3 stored, 2 joined" in out and "1 not sampled" in out
    assert "1 missing (NaN)" in out
    pq = tmp_path / "labels.parquet"
    pd.DataFrame({"id": ["r3", "r1"], "label": [2, 1]}).to_parquet(pq)
    args = ["labels", "import", "clf", str(pq), "--json", "--database-url", db_url]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["matched"], report["duplicates"]) == (2, 1)


def test_cli_names_a_bad_file(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("request,label\nr1,0\n")
    assert main(["labels", "import", "clf", str(bad), "--database-url", sqlite_url]) == 1
    err = capsys.readouterr().err
    assert "lacks ['id']" in err and "give columns id,label" in err
    missing = str(tmp_path / "nope.csv")
    assert main(["labels", "import", "clf", missing, "--database-url", sqlite_url]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_request_context_is_a_context_variable() -> None:
    assert REQUEST.get() is None
    with request_context("req-1", sample=True) as ctx:
        assert REQUEST.get() is ctx and ctx.sample
        with request_context(["a", "b"]):
            assert REQUEST.get().request_id == ("a", "b")  # type: ignore[union-attr]
        assert REQUEST.get() is ctx
    assert REQUEST.get() is None
    assert row_ids("r", 1) == ["r"] and row_ids("r", 2) == ["r/0", "r/1"]
    assert row_ids(("a",), 2) == ["a", None]
    with pytest.raises(ConfigError, match="id 1.5"), request_context(1.5):  # type: ignore[arg-type]
        pass


def test_ids_from_log_context_and_deployment_join_labels(db_url: str, tmp_path: Path) -> None:
    import asyncio

    from monitor import Monitor, Settings
    from monitor.storage import read_samples
    from tests.serving_models import tiny_onnx
    from tuner import registry

    settings = Settings(database_url=db_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(db_url)
    registry.register("m", tiny_onnx(tmp_path / "v1.onnx"), db=db, settings=settings)
    db.dispose()
    with Monitor(db_url, sample_rate=0.0, sample_cap_per_minute=1) as mon:
        clf = mon.wrap(lambda x: np.eye(3)[x[:, 0].astype(int) % 3], name="clf")
        for i in range(4):  # forced past a cap of one row a minute
            with mon.context(request_id=f"q{i}", sample=True):
                clf(np.array([[i, 0.0]]))
        clf(np.array([[5, 0.0]]))  # sample_rate 0 and no context: not stored
        with mon.context(request_id="batch", sample=True):
            clf(np.array([[1, 0.0], [2, 0.0]]))
        mon.log(name="clf", inputs=np.zeros((2, 2)), outputs=np.eye(3)[:2], ids=["l0", "l1"])
        with pytest.raises(ConfigError, match="ids has 1 entries for 2 rows"):
            mon.log(name="clf", inputs=np.zeros((2, 2)), ids=["only-one"])
        dep = mon.deployment("m")
        x = {"x": np.ones((1, 4), np.float32)}
        with mon.context(sample=True):  # the call's own id, the context's sampling
            dep(x, key="u1", request_id="dep-sync")
            asyncio.run(dep.acall(x, request_id="dep-async"))
        report = mon.log_labels(name="clf", ids=["q3", "batch/1", "l1", "q9"], labels=[0, 2, 1, 0])
        assert (report.matched, report.not_sampled) == (3, 1)
        stored = {r.request_id for r in read_samples(mon.db, "clf")}
        assert stored == {"q0", "q1", "q2", "q3", "batch/0", "batch/1", "l0", "l1"}
        served = {r.request_id for r in read_samples(mon.db, "m")}
        assert served == {"dep-sync", "dep-async"}
        assert REQUEST.get() is None


def test_output_kind_scalar_makes_whole_number_outputs_a_regression(sqlite_url: str) -> None:
    # A model that predicts counts: wrapped with output_kind="scalar", its 2s and 3s are
    # quantities, and labels of 2.5 are targets, not class indexes.
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        counts = mon.wrap(lambda x: np.array([2.0, 3.0]), name="counts", output_kind="scalar")
        with mon.context(request_id=("a", "b")):
            counts(np.zeros((2, 4), dtype=np.float32))
        assert mon.flush()
        report = mon.log_labels(name="counts", ids=["a", "b"], labels=[2.5, 3.0])
    assert report.task == "regression"
