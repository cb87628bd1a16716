"""Registry and tuning end to end: register, tamper, tune on production samples, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from monitor import Monitor, Settings, schema
from monitor.registry import champion, get_version, list_versions
from monitor.storage import Database
from tests.tuner_fixtures import dead_branch, export, load_digits_split, trained_mlp
from tuner import registry
from tuner.cli import main
from tuner.errors import ArtifactError, Conflict, NotEnoughSamples
from tuner.onnx_tools import load_session
from tuner.tuning import run_tuning


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    digits = load_digits_split()
    path = export(trained_mlp(digits), digits.x_calib[:4], tmp_path_factory.mktemp("m") / "m.onnx")
    return path, digits.x_holdout


def _settings(url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=url, artifacts_dir=str(tmp_path / "artifacts"))


def _slow_champion(db: Database, settings: Settings, source: Path, tmp_path: Path) -> None:
    """Serve a faithful but much slower derivative of v1, so a rebuilt winner surely beats it.

    (Against an fp32 champion, whether an int8 variant is 5 % faster depends on the machine.)
    """
    slow = dead_branch(source, tmp_path / "slow.onnx")
    registry.register("digits", slow, version="slow", parent_version="v1", db=db,
                      settings=settings)  # fmt: skip
    registry.set_status(db, "digits", "v1", "retired")
    registry.set_status(db, "digits", "slow", "champion")


def test_register_champion_candidate_and_list(
    db_url: str,
    tmp_path: Path,
    mlp_onnx: tuple[Path, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(db_url, tmp_path)
    db = Database(db_url)
    first = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    second = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    assert (first.version, first.status) == ("v1", "champion")
    assert (second.version, second.status, second.parent_version) == ("v2", "candidate", None)
    assert Path(first.artifact_path).is_file() and first.sha256 == second.sha256
    with pytest.raises(Conflict, match="'v2' already"):
        registry.register("digits", mlp_onnx[0], version="v2", db=db, settings=settings)
    db.dispose()
    code = main(["models", "--json", "--database-url", db_url])
    listed = json.loads(capsys.readouterr().out)["models"]
    assert code == 0
    assert [(m["version"], m["status"], m["artifact"]) for m in listed] == [
        ("v1", "champion", first.artifact_path),
        ("v2", "candidate", second.artifact_path),
    ]


def test_swapped_artifact_is_refused(
    sqlite_url: str, tmp_path: Path, mlp_onnx: tuple[Path, np.ndarray]
) -> None:
    settings = _settings(sqlite_url, tmp_path)
    db = Database(sqlite_url)
    info = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    Path(info.artifact_path).write_bytes(b"not the model")
    with pytest.raises(ArtifactError, match="corrupted or was swapped"):
        registry.verified_artifact(info)
    with pytest.raises(ArtifactError, match="corrupted"):
        run_tuning(db, settings, "digits")
    db.dispose()


def test_register_rejects_a_bad_file(sqlite_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    code = main(["register", "m", "--onnx", str(bad), "--database-url", sqlite_url])
    assert code == 1
    with pytest.raises(ArtifactError, match="does not exist"):
        registry.register("m", tmp_path / "missing.onnx", settings=_settings(sqlite_url, tmp_path))


def _serve_traffic(url: str, onnx_path: str, rows: np.ndarray) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path)
    name = session.get_inputs()[0].name
    with Monitor(url, sample_rate=1.0, sample_cap_per_minute=100_000) as mon:
        wrapped = mon.wrap(session, name="digits", version="v1")
        for i in range(0, len(rows), 8):
            wrapped.run(None, {name: rows[i : i + 8]})


def test_tune_on_production_samples_registers_the_winner(
    db_url: str,
    tmp_path: Path,
    mlp_onnx: tuple[Path, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(db_url, tmp_path)
    db = Database(db_url)
    base = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    _serve_traffic(db_url, base.artifact_path, mlp_onnx[1][:20])
    with pytest.raises(NotEnoughSamples, match="has 20 stored raw input samples.*at least 48"):
        run_tuning(db, settings, "digits", quick=True)
    _serve_traffic(db_url, base.artifact_path, mlp_onnx[1][20:200])
    _slow_champion(db, settings, mlp_onnx[0], tmp_path)
    outcome = run_tuning(db, settings, "digits", slo_ms=20.0, quick=True)
    out = outcome.to_dict()
    assert out["outcome"] == "registered" and "the incumbent's throughput" in out["reason"]
    assert (out["source_version"], out["incumbent"]["version"]) == ("v1", "slow")
    assert out["winner"] is not None and out["winner"]["version"] == f"v1-t{outcome.run_id}"
    assert out["winner"]["config"]["batch_size"] >= 1 and Path(out["winner"]["artifact"]).is_file()
    # Serving defaults for a deployment: waiting to fill a batch plus running it fits the SLO.
    config = out["winner"]["config"]
    assert config["batch_workers"] >= 1
    if config["batch_size"] > 1:
        full = next(
            p for t in out["leaderboard"] if t["name"] == out["winner"]["name"]
            for p in t["curve"] if p["batch_size"] == config["batch_size"]
        )  # fmt: skip
        assert 0 <= config["max_delay_ms"] <= min(full["p95_ms"], 20.0 - full["p95_ms"]) + 1e-3
    names = {t["name"] for t in out["leaderboard"]}
    assert {"ort-fp32", "dynamic-s8-pc", "static-minmax-u8-all"} <= names
    assert all({"passed", "reason", "config", "accuracy"} <= set(t) for t in out["leaderboard"])
    assert Path(out["report"]).read_text().count("|") > 10 and Path(out["plot"]).stat().st_size > 0
    assert out["data"].startswith("production samples of digits:{v1,slow} (one source): 200 rows")
    assert [(w["kind"], w["rows"]) for w in out["data_windows"]] == [("window", 200)]
    assert out["speedup"] is not None and out["speedup"] > 0  # measured alike, never assumed
    versions = {v.version: v for v in list_versions(db, "digits")}
    assert versions[out["winner"]["version"]].status == "candidate"
    assert versions[out["winner"]["version"]].parent_version == "v1"
    assert champion(db, "digits").version == "slow"
    with db.session() as s:
        run = s.get(schema.TuningRun, outcome.run_id)
        trials = s.scalar(
            select(func.count())
            .select_from(schema.TuningTrial)
            .where(schema.TuningTrial.run_id == outcome.run_id)
        )
        assert run is not None and run.status == "done" and run.winner_version is not None
        assert run.outcome == "registered" and run.summary["incumbent"]["version"] == "slow"
    assert trials == len(out["leaderboard"])
    db.dispose()


def _cli_setup(
    url: str, tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, labels: bool
) -> Path:
    """Register v1 and a slow champion for the CLI; return a dataset file of held-out rows."""
    settings = _settings(url, tmp_path)
    monkeypatch.setenv("TUNEWATCH_ARTIFACTS_DIR", settings.artifacts_dir)
    db = Database(url)
    registry.register("digits", source, db=db, settings=settings)
    _slow_champion(db, settings, source, tmp_path)
    db.dispose()
    digits = load_digits_split()
    data = tmp_path / "data.npz"
    arrays = {"input": digits.x_holdout[:128]}
    if labels:
        arrays["labels"] = digits.y_holdout[:128]
    np.savez(data, **arrays)  # type: ignore[arg-type]
    return data


def test_tune_cli_json_with_a_dataset(
    sqlite_url: str,
    tmp_path: Path,
    mlp_onnx: tuple[Path, np.ndarray],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _cli_setup(sqlite_url, tmp_path, mlp_onnx[0], monkeypatch, labels=True)
    code = main(
        [
            "tune",
            "digits",
            "--dataset",
            str(data),
            "--quick",
            "--slo-ms",
            "20",
            "--json",
            "--database-url",
            sqlite_url,
        ]
    )
    assert code == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == f"dataset {data}"
    # The dataset's labels were used: accuracy against them, within the default 0.5 points.
    acc = out["winner"]["accuracy"]
    assert 0.5 < acc["accuracy"] <= 1.0 and 0.5 < acc["accuracy_champion"] <= 1.0
    assert acc["accuracy_drop"] == pytest.approx(acc["accuracy_champion"] - acc["accuracy"])
    assert acc["accuracy_drop"] <= 0.005
    assert {"version", "artifact", "config"} <= set(out["winner"])


def test_scheduled_retune_consumes_requests_from_detection(
    sqlite_url: str, tmp_path: Path, mlp_onnx: tuple[Path, np.ndarray]
) -> None:
    from monitor.events import Finding, apply_finding, retune_requests
    from tuner import jobs

    settings = _settings(sqlite_url, tmp_path).replace(tune_quick=True, tune_slo_ms=20.0)
    db = Database(sqlite_url)
    base = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    _serve_traffic(sqlite_url, base.artifact_path, mlp_onnx[1][:120])
    _slow_champion(db, settings, mlp_onnx[0], tmp_path)
    drift = Finding("data_drift", "digits", "v1", "", True, "warning", "inputs drifted", {})
    event = apply_finding(db, drift, retune_kinds=["data_drift"])
    assert event is not None and [r.status for r in retune_requests(db, None)] == ["pending"]
    jobs.configure(settings, db)
    assert jobs.retune() == {"handled": 1}
    (request,) = retune_requests(db, None)
    assert request.status == "done" and "winner v1-t" in request.note
    with db.session() as s:
        run = s.scalars(select(schema.TuningRun)).one()
        assert run.retune_request_id == request.id and run.status == "done"
    db.dispose()


def test_weights_stored_beside_the_graph_are_kept_inside_the_artifact(
    sqlite_url: str, tmp_path: Path, mlp_onnx: tuple[Path, np.ndarray]
) -> None:
    import onnx

    split = tmp_path / "exported" / "split.onnx"
    split.parent.mkdir()
    onnx.save(
        onnx.load(str(mlp_onnx[0])),
        str(split),
        save_as_external_data=True,
        location="split.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "exported" / "split.onnx.data").stat().st_size > 1000
    settings = _settings(sqlite_url, tmp_path)
    db = Database(sqlite_url)
    info = registry.register("split", split, db=db, settings=settings)
    artifact = Path(info.artifact_path)
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["model.onnx"]
    session = load_session(registry.verified_artifact(info))
    x = mlp_onnx[1][:3].astype(np.float32)
    want = load_session(mlp_onnx[0]).run(None, {"input": x})[0]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-6)
    db.dispose()


def test_a_failed_registration_leaves_no_artifact_behind(
    sqlite_url: str, tmp_path: Path, mlp_onnx: tuple[Path, np.ndarray]
) -> None:
    settings = _settings(sqlite_url, tmp_path)
    db = Database(sqlite_url)
    first = registry.register("digits", mlp_onnx[0], db=db, settings=settings)
    shutil.rmtree(Path(first.artifact_path).parent)  # the files are gone, the row is not
    with pytest.raises(Conflict):
        registry.register("digits", mlp_onnx[0], version="v1", db=db, settings=settings)
    assert not Path(first.artifact_path).parent.exists()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        registry.register("digits", broken, version="v2", db=db, settings=settings)
    second = registry.register("digits", mlp_onnx[0], version="v2", db=db, settings=settings)
    assert Path(second.artifact_path).is_file()
    db.dispose()


def test_tune_cli_registers_the_serving_configuration_it_searched(
    sqlite_url: str,
    tmp_path: Path,
    mlp_onnx: tuple[Path, np.ndarray],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _cli_setup(sqlite_url, tmp_path, mlp_onnx[0], monkeypatch, labels=False)
    args = ["tune", "digits", "--dataset", str(data), "--quick", "--slo-ms", "50",
            "--database-url", sqlite_url]  # fmt: skip
    with pytest.raises(SystemExit) as bad:
        main([*args, "--serving-clients", "0"])
    assert bad.value.code == 2
    assert "--serving-clients: '0' is not a number of clients: use a whole number from 1 to" in (
        capsys.readouterr().err
    )
    assert main([*args, "--serving-clients", "4", "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    searched = out["winner"]["config"]["serving"]
    assert searched["search"]["clients"] == 4 and searched["search"]["points"]
    # The registered version carries what the search chose, and a deployment reads it.
    db = Database(sqlite_url)
    version = get_version(db, "digits", out["winner"]["version"])
    for key in ("batch_size", "max_delay_ms", "batch_workers"):
        assert version.config[key] == searched[key]
    assert version.config["runtime"]["threads"] == searched["runtime"]["threads"]
    db.dispose()
