"""Export, session and input helpers of tuner.onnx_tools, on real tiny torch models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tuner_fixtures import MLP, Digits, export, load_digits_split, trained_mlp

from tuner.errors import ArtifactError, TunerError
from tuner.onnx_tools import (
    RuntimeOptions,
    as_feeds,
    describe_inputs,
    export_onnx,
    load_session,
    make_batch,
    output_names,
    sha256_file,
)


@pytest.fixture(scope="module")
def digits() -> Digits:
    return load_digits_split()


@pytest.fixture(scope="module")
def mlp(digits: Digits) -> MLP:
    return trained_mlp(digits)


class KeywordModel(torch.nn.Module):
    """A MiniLM-shaped toy: token ids and a mask in, a mean-pooled embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def test_exported_mlp_has_a_dynamic_batch_and_matches_torch(
    mlp: MLP, digits: Digits, tmp_path: Path
) -> None:
    path = export(mlp, digits.x_holdout, tmp_path / "mlp.onnx")
    (spec,) = describe_inputs(path)
    assert (spec.name, spec.dtype, spec.shape[1]) == ("input", "float32", 64)
    assert isinstance(spec.shape[0], str)  # symbolic batch axis
    assert output_names(path) == ["logits"]
    x = digits.x_holdout[:5]  # not the export batch size of 2
    got = load_session(path).run(None, {"input": x})[0]
    want = mlp(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dynamo_exporter_writes_one_self_contained_file(
    mlp: MLP, digits: Digits, tmp_path: Path
) -> None:
    path = export_onnx(mlp, {"input": digits.x_holdout[:2]}, tmp_path / "d.onnx", exporter="dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]
    got = load_session(path).run(None, {"input": digits.x_holdout[:3]})[0]
    np.testing.assert_allclose(got, mlp(torch.from_numpy(digits.x_holdout[:3])).detach(), atol=1e-5)


def test_keyword_inputs_are_named_in_signature_order(tmp_path: Path) -> None:
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    # Dict order differs from forward's parameter order on purpose.
    sample = {"attention_mask": mask, "input_ids": ids}
    path = export_onnx(KeywordModel().eval(), sample, tmp_path / "kw.onnx", output_names=["emb"])
    specs = describe_inputs(path)
    assert [s.name for s in specs] == ["input_ids", "attention_mask"]
    assert [s.dtype for s in specs] == ["int64", "int64"]
    out = load_session(path).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert out.shape == (2, 8)


def test_session_gets_threads_spinning_and_optimization_level(
    mlp: MLP, digits: Digits, tmp_path: Path
) -> None:
    path = export(mlp, digits.x_holdout, tmp_path / "mlp.onnx")
    options = RuntimeOptions(threads=2, spinning=False, graph_optimization="basic")
    so = load_session(path, options).get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert "BASIC" in str(so.graph_optimization_level)


def test_bad_runtime_options_and_missing_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="threads=0"):
        RuntimeOptions(threads=0)
    with pytest.raises(TunerError, match="'fastest'"):
        RuntimeOptions(graph_optimization="fastest")
    with pytest.raises(ArtifactError, match="missing.onnx"):
        load_session(tmp_path / "missing.onnx")
    with pytest.raises(ArtifactError, match="missing.onnx"):
        sha256_file(tmp_path / "missing.onnx")
    with pytest.raises(TunerError, match="not available"):
        (tmp_path / "m.onnx").write_bytes(b"")
        load_session(tmp_path / "m.onnx", RuntimeOptions(provider="NoSuchExecutionProvider"))


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_feeds_are_checked_and_typed(mlp: MLP, digits: Digits, tmp_path: Path) -> None:
    specs = describe_inputs(export(mlp, digits.x_holdout, tmp_path / "mlp.onnx"))
    feeds = as_feeds(digits.x_holdout.astype(np.float64), specs)
    assert feeds["input"].dtype == np.float32
    with pytest.raises(TunerError, match=r"\['wrong'\].*\['input'\]"):
        as_feeds({"wrong": digits.x_holdout}, specs)
    batch = make_batch(as_feeds(digits.x_holdout[:3], specs), 7)
    assert batch["input"].shape == (7, 64)
    np.testing.assert_array_equal(batch["input"][3], digits.x_holdout[0])


def test_export_failure_names_the_module(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cannot trace me")

    with pytest.raises(TunerError, match="cannot export Broken"):
        export_onnx(Broken(), {"x": np.zeros((2, 3), np.float32)}, tmp_path / "b.onnx")
