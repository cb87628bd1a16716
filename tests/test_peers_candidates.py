"""What the tuner does that a model file alone cannot: fused graphs, mixed precision for
dynamic int8, padding trimmed per batch, and a serving configuration searched under load."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tuner.batch_search import MeasureConfig  # noqa: E402
from tuner.candidates import SearchSpace  # noqa: E402
from tuner.engine import TuneResult, trial_runner, tune  # noqa: E402
from tuner.guard import Tolerance  # noqa: E402
from tuner.onnx_tools import export_onnx, load_session, trim_padding  # noqa: E402

SEQ = 24
FAST = MeasureConfig(warmup_runs=1, window_runs=3, min_window_s=0.0, max_windows=3)
ONLY = dict(
    fp32=False, dynamic_per_channel=(), fused_op_types=(), static_methods=(),
    torch_dynamic=False, prune_amounts=(), gpu=False, threads=(1,), spinning=(False,),
    max_batch_size=8,
)  # fmt: skip


class MeanPooledBert(torch.nn.Module):
    """A tiny BERT (random weights, no download) with attention-masked mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        )  # fmt: skip
        self.bert = transformers.BertModel(config).eval()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentences(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Right-padded token rows of natural lengths 4..SEQ (like a tokenizer's output)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, rows)
    ids = rng.integers(1, 120, (rows, SEQ))
    mask = (np.arange(SEQ) < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = MeanPooledBert().eval()
    feeds = sentences(2, 0)
    axes = {name: {1: "sequence"} for name in feeds}
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    return model, export_onnx(model, feeds, path, output_names=["embedding"], dynamic_axes=axes)


def _tune(base: Path, tmp_path: Path, space: SearchSpace, **kwargs: object) -> TuneResult:
    return tune(
        base, calibration=sentences(32, 1), holdout=sentences(48, 2), slo_ms=1000.0,
        workdir=tmp_path, space=space, measure=FAST, task="embedding",
        tolerance=Tolerance(min_mean_cosine=0.99), **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_padding_trimmed_per_batch_gives_the_padded_outputs(
    bert: tuple[torch.nn.Module, Path],
) -> None:
    _, path = bert
    session = load_session(path)
    feeds = sentences(8, 3)
    feeds["attention_mask"][:, 15:] = 0  # no row is longer than 15 tokens
    feeds["input_ids"] *= feeds["attention_mask"]
    trimmed = trim_padding(feeds)
    assert trimmed["input_ids"].shape == (8, 15) and trimmed["token_type_ids"].shape == (8, 15)
    padded_out = session.run(None, feeds)[0]
    trimmed_out = session.run(None, trimmed)[0]
    np.testing.assert_allclose(trimmed_out, padded_out, rtol=1e-5, atol=1e-5)
    # A batch big enough to group runs by real length, in groups, and answers in order.
    from tuner.candidates import OrtRunner
    from tuner.onnx_tools import RuntimeOptions

    many = sentences(40, 7)
    grouped = OrtRunner(path, RuntimeOptions(), trim="attention_mask").run(many)[0]
    np.testing.assert_allclose(grouped, session.run(None, many)[0], rtol=1e-5, atol=1e-5)
    # Nothing to trim: the same arrays back.
    full = sentences(4, 4)
    full["attention_mask"][0] = 1
    assert trim_padding(full)["input_ids"].shape == (4, SEQ)


def test_fused_graph_candidate_builds_and_passes_the_guard(
    bert: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    import onnx

    _, path = bert
    space = SearchSpace(**{**ONLY, "fused_op_types": ("all", "matmul")})  # type: ignore[arg-type]
    result = _tune(path, tmp_path, space)
    trials = {t.name: t for t in result.leaderboard}
    fused = trials["fused-dynamic-s8-pc"]
    assert fused.passed, fused.reason
    assert fused.config["kind"] == "fused" and fused.accuracy["mean_cosine"] >= 0.99
    assert "fused ops" in fused.config["notes"]
    ops = {n.op_type for n in onnx.load(fused.artifact).graph.node}
    assert "SkipLayerNormalization" in ops and "DynamicQuantizeLinear" in ops
    # The source respects its mask, so every candidate runs with padding trimmed per batch,
    # and the trial's runner (what a deployment of it gets) trims too.
    assert fused.config["trim_padding"] == "attention_mask"
    runner = trial_runner(fused)
    feeds = sentences(8, 5)
    out = runner.run(feeds)[0]
    ref = load_session(path).run(None, feeds)[0]
    cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.mean() >= 0.99


def test_fused_graph_is_skipped_for_a_model_without_attention(tmp_path: Path) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    path = export_onnx(mlp.eval(), {"input": x[:2]}, tmp_path / "mlp.onnx")
    space = SearchSpace(**{**ONLY, "fp32": True, "fused_op_types": ("all",)})  # type: ignore[arg-type]
    result = tune(path, calibration=x[:32], holdout=x[32:], slo_ms=1000.0, workdir=tmp_path,
                  space=space, measure=FAST)  # fmt: skip
    skipped = {s.name: s.reason for s in result.skipped}
    assert "not a transformer graph" in skipped["fused-dynamic-s8-pc"]
    assert "trim_padding" not in result.leaderboard[0].config


def test_dynamic_candidate_keeps_its_most_damaged_node_in_float(
    bert: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, _ = bert
    broken = MeanPooledBert().eval()
    broken.load_state_dict(model.state_dict())
    layer = broken.bert.encoder.layer[0]
    with torch.no_grad():
        # Channel 5 of the FFN is never active (GELU of -50), so a huge weight reading it
        # changes nothing in float; with one scale for the whole tensor it zeroes the rest.
        layer.intermediate.dense.bias[5] = -50.0
        layer.output.dense.weight.mul_(20.0)  # the FFN, not the residual, shapes the output
        layer.output.dense.weight[0, 5] = 5000.0
    feeds = sentences(2, 0)
    axes = {name: {1: "sequence"} for name in feeds}
    path = export_onnx(broken, feeds, tmp_path / "broken.onnx", output_names=["embedding"],
                       dynamic_axes=axes)  # fmt: skip
    space = SearchSpace(
        **{
            **ONLY,
            "dynamic_per_channel": (False,),  # type: ignore[arg-type]
            "dynamic_op_types": ("matmul",),
            "dynamic_preprocess": (False,),
        }
    )
    result = _tune(path, tmp_path / "run", space)
    trials = {t.name: t for t in result.leaderboard}
    first = trials["dynamic-s8-matmul-raw"]
    assert not first.passed and "guard failed" in first.reason
    retries = [t for t in result.leaderboard if t.name.startswith("dynamic-s8-matmul-raw+float")]
    assert retries, [t.name for t in result.leaderboard]
    fixed = retries[-1]
    assert fixed.passed, fixed.reason
    assert fixed.config["nodes_to_exclude"][0].startswith("/bert/encoder/layer.0/output/dense")
    assert "left in float" in fixed.reason
    assert result.winner is not None and result.winner.name == fixed.name


def test_serving_search_returns_a_configuration_the_deployment_applies(
    bert: tuple[torch.nn.Module, Path], tmp_path: Path, sqlite_url: str
) -> None:
    from monitor import Monitor
    from monitor.settings import Settings
    from monitor.storage import Database
    from tuner import registry
    from tuner.serving_search import natural_rows, search_serving
    from tuner.tuning import serving_defaults

    _, path = bert
    space = SearchSpace(**{**ONLY, "fused_op_types": ("all",)})  # type: ignore[arg-type]
    result = _tune(path, tmp_path / "run", space, serving_clients=4)
    assert result.winner is not None
    serving = result.winner.config["serving"]
    assert set(serving) >= {"runtime", "batch_size", "max_delay_ms", "batch_workers", "search"}
    assert serving["search"]["clients"] == 4 and serving["search"]["points"]
    # tuning.py registers the winner with these keys in place of its model-level defaults.
    applied = serving_defaults(result.winner, 1000.0)
    assert applied["batch_size"] == serving["batch_size"]
    assert applied["runtime"]["threads"] == serving["runtime"]["threads"]

    # A batched configuration (batch sizes > 1 only), registered as tuning.py would.
    feeds = sentences(16, 6)
    found = search_serving(path, feeds, slo_ms=1000.0, mask="attention_mask", clients=6,
                           calls_per_client=3, batch_sizes=(4,), delays_ms=(1.0, 2.0))  # fmt: skip
    assert found.best is not None and found.best.max_batch_size == 4
    assert len(found.points) >= 2 and "calls/s" in found.reason
    # The trial's config carries trim_padding: the deployment pads ragged rows and runs them
    # grouped by length, as the search measured.
    config = {**found.best.to_config(), "trim_padding": "attention_mask"}
    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    db = Database(sqlite_url)
    registry.register("bert", path, config=config, db=db, settings=settings)
    db.dispose()
    rows = natural_rows(feeds, "attention_mask")
    session = load_session(path)
    with Monitor(sqlite_url, sample_rate=0.0) as mon:
        dep = mon.deployment("bert", poll_s=60)
        with ThreadPoolExecutor(6) as pool:  # concurrent callers of different lengths
            outs = list(pool.map(dep, rows))
        stats = dep.batching_stats()["champion"]
    assert stats["workers"] == found.best.batch_workers
    assert stats["items"] == len(rows) and stats["mean_batch_size"] <= 4
    for row, out in zip(rows, outs, strict=True):
        np.testing.assert_allclose(out[0], session.run(None, row)[0], rtol=1e-4, atol=1e-5)
