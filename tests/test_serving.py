"""Serving loads every artifact from the bytes it hashed: a swapped file is never served."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from monitor import Monitor, Settings
from monitor.errors import ArtifactMismatch
from monitor.registry import champion, read_verified
from monitor.storage import Database
from tests.serving_models import tiny_onnx
from tuner import registry

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _registered(url: str, tmp_path: Path) -> tuple[Path, Path]:
    """Register ``m`` v1 (scale 1); return its stored artifact and a different model's file."""
    settings = Settings(database_url=url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(url)
    info = registry.register("m", tiny_onnx(tmp_path / "v1.onnx"), db=db, settings=settings)
    db.dispose()
    return Path(info.artifact_path), tiny_onnx(tmp_path / "evil.onnx", scale=-5.0)


def _expected(scale: float) -> np.ndarray:
    return X @ (np.arange(12, dtype=np.float32) * scale).reshape(4, 3)


def test_a_file_swapped_before_the_read_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    artifact, evil = _registered(sqlite_url, tmp_path)
    os.replace(evil, artifact)
    with Monitor(sqlite_url) as mon, pytest.raises(ArtifactMismatch, match="swapped"):
        mon.deployment("m", poll_s=60)


def test_a_missing_artifact_names_the_path(sqlite_url: str, tmp_path: Path) -> None:
    artifact, _ = _registered(sqlite_url, tmp_path)
    artifact.unlink()
    db = Database(sqlite_url)
    with pytest.raises(ArtifactMismatch, match=str(artifact.name)):
        read_verified(champion(db, "m"))
    db.dispose()


def test_the_session_runs_the_bytes_that_were_hashed(sqlite_url: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    artifact, evil = _registered(sqlite_url, tmp_path)
    db = Database(sqlite_url)
    data = read_verified(champion(db, "m"))
    os.replace(evil, artifact)  # swapped after the check, before the session is built
    (y,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": X})
    np.testing.assert_allclose(y, _expected(1.0))
    db.dispose()


def test_deployments_racing_a_file_swap_never_serve_the_swapped_model(
    sqlite_url: str, tmp_path: Path
) -> None:
    artifact, evil = _registered(sqlite_url, tmp_path)
    good = tmp_path / "good.onnx"
    good.write_bytes(artifact.read_bytes())
    stop = threading.Event()

    def swap() -> None:  # the file alternates between the registered model and another
        tmp = artifact.with_suffix(".tmp")
        while not stop.is_set():
            for source in (evil, good):
                tmp.write_bytes(source.read_bytes())
                os.replace(tmp, artifact)

    swapper = threading.Thread(target=swap, daemon=True)
    outcomes = {"served_registered": 0, "refused": 0, "served_swapped": 0}
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        swapper.start()
        try:
            for _ in range(150):
                try:
                    dep = mon.deployment("m", poll_s=60)
                except ArtifactMismatch:
                    outcomes["refused"] += 1
                    continue
                (y,) = dep({"x": X})
                dep.close()
                same = np.allclose(y, _expected(1.0))
                outcomes["served_registered" if same else "served_swapped"] += 1
        finally:
            stop.set()
            swapper.join()
    assert outcomes["served_swapped"] == 0, outcomes
    assert outcomes["served_registered"] > 0 and outcomes["refused"] > 0, outcomes
