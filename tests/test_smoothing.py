"""Activation smoothing before dynamic int8: exact in float, more faithful once quantized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from tuner.batch_search import MeasureConfig  # noqa: E402
from tuner.candidates import SearchSpace, enumerate_candidates  # noqa: E402
from tuner.engine import tune  # noqa: E402
from tuner.errors import TunerError  # noqa: E402
from tuner.guard import Tolerance  # noqa: E402
from tuner.onnx_tools import export_onnx, load_session  # noqa: E402
from tuner.smoothing import channel_maxima, choose_smoothing, smooth_graph  # noqa: E402

FAST = MeasureConfig(warmup_runs=1, window_runs=3, min_window_s=0.0, max_windows=3)
OUTLIER = 300.0


def outlier_inputs(rows: int, seed: int) -> np.ndarray:
    """Rows whose channel 0 is 300x the others, like a transformer's outlier dimension."""
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    x[:, 0] *= OUTLIER
    return x


def exported_mlp(folder: Path, seed: int, sample: np.ndarray, scale_channel0: float) -> Path:
    """A 16 -> 64 -> 8 MLP with channel 0's first-layer weights divided by the given factor."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).eval()
    with torch.no_grad():
        model[0].weight[:, 0] /= scale_channel0
    return export_onnx(model, {"input": sample}, folder / "mlp.onnx")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP that reads every input channel equally (channel 0's weights scaled down)."""
    return exported_mlp(tmp_path_factory.mktemp("mlp"), 0, outlier_inputs(2, 0), OUTLIER)


def test_smoothing_leaves_the_float_outputs_unchanged(mlp: Path, tmp_path: Path) -> None:
    from tuner.candidates import gemm_to_matmul

    model = onnx.load(str(mlp))
    gemm_to_matmul(model)
    x = outlier_inputs(64, 1)
    sites = [n.input[0] for n in model.graph.node if n.op_type == "MatMul"]
    maxima = channel_maxima(model, sites, {"input": x})
    assert maxima["input"][0] > 100 * np.median(maxima["input"])  # the outlier is seen
    out = tmp_path / "smoothed.onnx"
    assert smooth_graph(mlp, out, maxima, 0.5) == 2  # both layers' inputs
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Mul") == 2 and "Gemm" not in ops
    ref = load_session(mlp).run(None, {"input": x})[0]
    got = load_session(out).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def tune_dynamic(model: Path, tmp_path: Path, rows: Any, smooth: tuple[bool, ...]) -> Any:
    """Tune only the per-channel MatMul dynamic candidates at a 0.999 cosine guard."""
    space = SearchSpace(
        fp32=False, dynamic_per_channel=(True,), dynamic_op_types=("matmul",),
        dynamic_preprocess=(False,), dynamic_smooth=smooth, fused_op_types=(),
        static_methods=(), torch_dynamic=False, prune_amounts=(), gpu=False, threads=(1,),
        spinning=(False,), max_batch_size=8,
    )  # fmt: skip
    return tune(
        model, calibration=rows(64, 2), holdout=rows(64, 3), slo_ms=1000.0, workdir=tmp_path,
        space=space, measure=FAST, task="embedding", tolerance=Tolerance(min_mean_cosine=0.999),
    )  # fmt: skip


def test_smoothed_candidate_is_more_faithful_than_the_plain_one(mlp: Path, tmp_path: Path) -> None:
    result = tune_dynamic(mlp, tmp_path, outlier_inputs, (False, True))
    trials = {t.name: t for t in result.leaderboard}
    plain, smoothed = trials["dynamic-s8-pc-matmul-raw"], trials["dynamic-s8-pc-matmul-raw-sq"]
    assert smoothed.accuracy["mean_cosine"] > plain.accuracy["mean_cosine"]
    assert not plain.passed and smoothed.passed, (plain.reason, smoothed.reason)
    assert "smoothed 2 MatMul inputs, alpha" in smoothed.config["notes"]
    # It passes as built, with nothing left in float or rescaled per row.
    assert not any(t.name.startswith(smoothed.name + "+") for t in result.leaderboard)
    # What was chosen is what ships: the artifact divides its inputs before quantizing them.
    ops = [n.op_type for n in onnx.load(smoothed.artifact).graph.node]
    assert ops.count("Mul") >= 2 and "DynamicQuantizeLinear" in ops


def test_the_alpha_is_the_one_with_the_least_calibration_error(mlp: Path, tmp_path: Path) -> None:
    from tuner.candidates import quantize_dynamic_model

    choice = choose_smoothing(
        mlp, tmp_path, {"input": outlier_inputs(32, 4)},
        lambda src, out: quantize_dynamic_model(src, out, op_types="matmul"),
        alphas=(0.2, 0.5, 0.8),
    )  # fmt: skip
    assert set(choice.errors) == {0.0, 0.2, 0.5, 0.8}
    assert choice.errors[choice.alpha] == min(choice.errors[a] for a in (0.2, 0.5, 0.8))
    assert choice.errors[choice.alpha] < choice.errors[0.0]
    assert choice.path.exists() and f"alpha {choice.alpha:g}" in choice.note()


def test_a_graph_without_weighted_matmuls_is_refused_by_name(tmp_path: Path) -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    x = np.zeros((2, 1, 8, 8), np.float32)
    path = export_onnx(conv, {"input": x}, tmp_path / "conv.onnx")
    with pytest.raises(TunerError, match="conv.onnx has no MatMul with a constant weight"):
        choose_smoothing(path, tmp_path / "w", {"input": x}, lambda s, o: s)


def test_only_per_channel_dynamic_specs_are_smoothed() -> None:
    space = SearchSpace(dynamic_per_channel=(True, False), dynamic_op_types=("matmul",),
                        dynamic_preprocess=(False,), dynamic_smooth=(False, True))  # fmt: skip
    specs, _ = enumerate_candidates(space, has_torch_module=False, providers=[], vnni=True)
    names = {s.name for s in specs if s.kind == "dynamic"}
    assert names == {"dynamic-s8-pc-matmul-raw", "dynamic-s8-matmul-raw",
                     "dynamic-s8-pc-matmul-raw-sq"}  # fmt: skip


def outlier_rows(rows: int, seed: int) -> np.ndarray:
    """Rows of like magnitude, and every eighth row 1000x larger (a token outlier)."""
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    x[::8] *= 1000.0
    return x


@pytest.fixture(scope="module")
def plain_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_mlp(tmp_path_factory.mktemp("plain"), 1, outlier_rows(2, 0), 1.0)


def test_per_row_scales_leave_the_float_outputs_unchanged(plain_mlp: Path, tmp_path: Path) -> None:
    from tuner.smoothing import per_token_graph

    names = [n.name for n in onnx.load(str(plain_mlp)).graph.node if n.op_type == "Gemm"]
    out = tmp_path / "scaled.onnx"
    assert per_token_graph(plain_mlp, out, names) == 2
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("ReduceMax") == 2 and ops.count("Div") == 2
    x = outlier_rows(32, 1)
    ref = load_session(plain_mlp).run(None, {"input": x})[0]
    got = load_session(out).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    with pytest.raises(TunerError, match="no MatMul named \\['nope'\\] in mlp.onnx"):
        per_token_graph(plain_mlp, tmp_path / "x.onnx", ["nope"])


def test_a_candidate_failing_on_token_outliers_is_rescued_by_per_row_scales(
    plain_mlp: Path, tmp_path: Path
) -> None:
    result = tune_dynamic(plain_mlp, tmp_path, outlier_rows, (False,))
    trials = {t.name: t for t in result.leaderboard}
    plain = trials["dynamic-s8-pc-matmul-raw"]
    assert not plain.passed and "guard failed" in plain.reason
    rescued = [t for t in result.leaderboard if "+pt" in t.name and t.passed]
    assert rescued, [(t.name, t.reason) for t in result.leaderboard]
    assert "per-row input scales on the" in rescued[0].config["notes"]
    assert not any("+float" in t.name for t in result.leaderboard)  # no float needed
    assert result.winner is not None and result.winner.name == rescued[0].name
    ops = [n.op_type for n in onnx.load(rescued[0].artifact).graph.node]
    assert "ReduceMax" in ops and "DynamicQuantizeLinear" in ops
