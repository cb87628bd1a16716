"""The tuning bench measures what its table says: one thread means one core, and MACs count."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_thread_points_use_at_most_one_core() -> None:
    # A fresh process, as a user runs the bench: the pinning must hold from its first import.
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tuning.py"), "--check-pinning"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    points = json.loads(done.stdout.strip().splitlines()[-1])
    assert {p["variant"] for p in points} == {"torch eager fp32", "ORT fp32"}
    for p in points:
        assert p["threads"] == 1
        assert p["throughput"] > 0
        # Below one is other jobs holding the core; above ~1.2 would be a second core working.
        assert p["cpu_per_wall"] <= 1.2, p
        assert not p["flag"].startswith("over"), p


def test_graph_macs_count_matmuls_and_convs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from tuner.onnx_tools import export_onnx

    ceiling = _load(ROOT / "bench" / "peak" / "ceiling.py")
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = np.zeros((4, 64), np.float32)
    path = export_onnx(mlp.eval(), {"input": x[:2]}, tmp_path / "mlp.onnx")
    assert ceiling.graph_macs(path, {"input": x}) == 64 * 256 + 256 * 8
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten())
    image = np.zeros((2, 1, 8, 8), np.float32)
    path = export_onnx(cnn.eval(), {"input": image[:2]}, tmp_path / "cnn.onnx")
    assert ceiling.graph_macs(path, {"input": image}) == 8 * 8 * 4 * 9
    assert ceiling.ceiling_items_per_s(50.0, 1e6, threads=2) == pytest.approx(100_000)


def test_pinning_flag_names_the_disagreement() -> None:
    pytest.importorskip("torch")
    # Loaded in a child so the bench's environment pinning cannot leak into this process.
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import tuning as t; "
        "print(json.dumps([t.pinning_flag(1.0, 1), t.pinning_flag(1.9, 1), "
        "t.pinning_flag(0.5, 1), t.pinning_flag(1.9, 2)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ok, over, starved, two = json.loads(done.stdout.strip().splitlines()[-1])
    assert ok == "" and two == ""
    assert over.startswith("over: cpu/wall 1.90 for 1 thread")
    assert starved.startswith("starved: cpu/wall 0.50")
