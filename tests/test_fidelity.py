"""Fidelity to the source: real ONNX models, real deployments, stored raw inputs replayed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from monitor import Monitor, Settings, schema
from monitor.events import list_events, retune_requests
from monitor.storage import Database
from tests.serving_models import IN, WEIGHTS, light_model
from tuner import fidelity, jobs, promotions, registry
from tuner.cli import main
from tuner.guard import Tolerance

RNG = np.random.default_rng(0)
Weights = Callable[[np.ndarray], np.ndarray]


def degraded(w: np.ndarray) -> np.ndarray:
    """Weights off by noise: about 88 % top-1 agreement with the source on normal inputs."""
    return w + 0.2 * np.random.default_rng(5).normal(size=w.shape).astype(np.float32)


def rolled(w: np.ndarray) -> np.ndarray:
    """Output column k of the source becomes column k + 1: every answer is the wrong class."""
    return np.roll(w, 1, axis=1)


def variant(tmp_path: Path, name: str, change: Weights) -> Path:
    """The serving tests' light model with its weights changed (a real ONNX file)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(light_model(tmp_path / f"{name}-base.onnx")))
    (init,) = model.graph.initializer
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), "W"))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def derive(db: Database, settings: Settings, tmp_path: Path, name: str, change: Weights) -> str:
    """Register a version derived from v1 (its source) with changed weights."""
    info = registry.register("clf", variant(tmp_path, name, change), parent_version="v1",
                             status="candidate", db=db, settings=settings)  # fmt: skip
    return info.version


def make_champion(db: Database, version: str) -> None:
    p = promotions.request(db, "clf", version, evidence={"reason": "test"}, by="ana")
    promotions.approve(db, p.id, by="ana")


def serve(url: str, n: int) -> None:
    """``n`` calls through a real deployment, every one sampled with its raw input."""
    with Monitor(url, sample_rate=1.0) as mon:
        dep = mon.deployment("clf", poll_s=60)
        for i in range(n):
            dep({"x": RNG.normal(size=(1, IN)).astype(np.float32)}, key=f"user-{i}")
        mon.flush()


def setup(url: str, tmp_path: Path) -> tuple[Settings, Database]:
    settings = Settings(database_url=url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(url)
    registry.register("clf", light_model(tmp_path / "source.onnx"), db=db, settings=settings)
    return settings, db


def cli_fidelity(url: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    assert main(["fidelity", "clf", "--json", "--database-url", url, *extra]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_a_degraded_champion_opens_fidelity_drop_and_a_faithful_one_resolves_it(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = setup(db_url, tmp_path)
    make_champion(db, derive(db, settings, tmp_path, "stale", degraded))
    serve(db_url, 120)

    out = cli_fidelity(db_url, capsys, "--rows", "100")
    assert (out["model"], out["version"], out["source_version"]) == ("clf", "v2", "v1")
    assert (out["rows"], out["task"], out["status"], out["passed"]) == (
        100, "classification", "ok", False
    )  # fmt: skip
    metrics = out["metrics"]
    assert isinstance(metrics, dict) and 0.7 < metrics["top1_agreement"] < 0.97
    assert "top1_agreement" in str(out["message"]) and out["event_id"] is not None
    (event,) = list_events(db, model="clf")
    assert (event.id, event.kind, event.version, event.status) == (
        out["event_id"], "fidelity_drop", "v2", "open"
    )  # fmt: skip
    # fidelity_drop is in the default retune_on: the event asks for a retune.
    assert [(r.model, r.event_id) for r in retune_requests(db)] == [("clf", event.id)]

    # The scheduled job checks again: the same event is updated, not duplicated.
    jobs.configure(settings, db)
    assert jobs.run("fidelity", "tuner.jobs:fidelity", settings.fidelity_job_interval_s) == (
        "success"
    )
    (event,) = list_events(db, model="clf")
    assert (event.status, event.occurrences) == ("open", 2)

    make_champion(db, derive(db, settings, tmp_path, "recalibrated", lambda w: w))
    serve(db_url, 60)
    out = cli_fidelity(db_url, capsys)
    assert (out["version"], out["rows"], out["status"], out["passed"]) == ("v3", 60, "ok", True)
    assert isinstance(out["metrics"], dict) and out["metrics"]["top1_agreement"] == 1.0
    (event,) = list_events(db, model="clf")
    assert (event.version, event.status) == ("v2", "resolved")
    with db.session() as s:
        rows = s.execute(
            select(schema.FidelityCheck.version, schema.FidelityCheck.passed,
                   schema.FidelityCheck.rows).order_by(schema.FidelityCheck.id)
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [("v2", False, 100), ("v2", False, 120), ("v3", True, 60)]
    db.dispose()


def test_a_source_champion_and_too_few_rows_open_nothing(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = setup(sqlite_url, tmp_path)
    out = cli_fidelity(sqlite_url, capsys)
    assert (out["version"], out["status"], out["passed"], out["event_id"]) == (
        "v1", "is_source", True, None
    )  # fmt: skip

    make_champion(db, derive(db, settings, tmp_path, "stale", degraded))
    serve(sqlite_url, fidelity.MIN_ROWS - 1)
    out = cli_fidelity(sqlite_url, capsys)
    assert (out["status"], out["passed"], out["rows"]) == (
        "insufficient_data", None, fidelity.MIN_ROWS - 1
    )  # fmt: skip
    assert f"at least {fidelity.MIN_ROWS} are needed" in str(out["message"])
    assert list_events(db, model="clf") == []

    assert main(["fidelity", "clf", "--rows", "0", "--database-url", sqlite_url]) == 1
    assert "rows=0 must be >= 1" in capsys.readouterr().err
    assert main(["fidelity", "nope", "--database-url", sqlite_url]) == 1
    assert "'nope' has no champion" in capsys.readouterr().err
    db.dispose()


def test_the_text_output_names_the_verdict(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = setup(sqlite_url, tmp_path)
    assert main(["fidelity", "clf", "--database-url", sqlite_url]) == 0
    assert capsys.readouterr().out == (
        "clf:v1 vs source v1: is_source on 0 rows: clf:v1 is its own source: nothing to compare\n"
    )
    make_champion(db, derive(db, settings, tmp_path, "stale", degraded))
    serve(sqlite_url, 40)
    assert main(["fidelity", "clf", "--database-url", sqlite_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("clf:v2 vs source v1: FAILED on 40 rows: top1_agreement")
    assert "event #1" in out
    db.dispose()


def test_better_by_separates_a_real_gap_from_noise() -> None:
    def rep(scores: list[float]) -> fidelity.Replay:
        arr = np.asarray(scores)
        return fidelity.Replay("m", "v", "s", "a", len(arr), "classification",
                               {"top1_agreement": float(arr.mean())}, True, "ok", "",
                               scores=arr)  # fmt: skip

    faithful, stale = rep([1.0] * 200), rep([1.0] * 176 + [0.0] * 24)
    assert fidelity.better_by(faithful, stale, 0.0, 0.05)
    assert not fidelity.better_by(stale, faithful, 0.0, 0.05)
    assert not fidelity.better_by(faithful, rep([1.0] * 199 + [0.0]), 0.01, 0.05)
    assert fidelity.margin("classification") == pytest.approx(0.01)
    assert fidelity.margin("regression", Tolerance(max_rel_error=0.05)) == 0.05
    assert fidelity.describe(stale) == "top-1 agreement 88.0 %"


def test_the_weights_variants_are_what_the_tests_say() -> None:
    x = RNG.normal(size=(2000, IN)).astype(np.float32)
    truth = (x @ WEIGHTS).argmax(axis=1)
    assert np.array_equal((x @ rolled(WEIGHTS)).argmax(axis=1), (truth + 1) % WEIGHTS.shape[1])
    assert 0.8 < np.mean((x @ degraded(WEIGHTS)).argmax(axis=1) == truth) < 0.95


def test_replays_reuse_a_verified_session_and_still_refuse_a_swapped_file(
    sqlite_url: str, tmp_path: Path
) -> None:
    from monitor.registry import get_version
    from tuner.errors import ArtifactError

    settings, db = setup(sqlite_url, tmp_path)
    v2 = derive(db, settings, tmp_path, "faithful", lambda w: w)
    source, derived = get_version(db, "clf", "v1"), get_version(db, "clf", v2)
    first = fidelity.verified_session(source)
    assert fidelity.verified_session(source) is first  # built once per sha256
    assert fidelity.verified_session(derived) is not first
    x = {"x": np.ones((2, IN), np.float32)}
    np.testing.assert_allclose(first.run(None, x)[0], x["x"] @ WEIGHTS, rtol=1e-5)
    # The bytes are checked on every call: a swapped file is refused, cached session or not.
    Path(source.artifact_path).write_bytes(Path(derived.artifact_path).read_bytes())
    with pytest.raises(ArtifactError):
        fidelity.verified_session(source)
    db.dispose()


def test_the_first_check_after_a_promotion_replays_the_rows_served_in_its_experiment(
    sqlite_url: str, tmp_path: Path
) -> None:
    from tuner import experiments

    settings, db = setup(sqlite_url, tmp_path)
    v2 = derive(db, settings, tmp_path, "faithful", lambda w: w)
    experiments.start(db, "clf", v2, share=0.5, min_samples=200)
    serve(sqlite_url, 160)  # about 80 calls on the challenger arm
    make_champion(db, v2)  # promoted: no call has reached it as champion yet
    check = fidelity.check_champion(db, settings, "clf")
    assert check.replay.status == "ok" and check.replay.passed, check.replay.message
    assert check.replay.version == v2 and check.replay.rows >= fidelity.MIN_ROWS
    db.dispose()
