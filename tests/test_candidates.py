"""Candidate builders and the accuracy debugger, on real tiny models trained on digits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tuner_fixtures import (
    MLP,
    Digits,
    export,
    load_digits_split,
    outlier_calibration,
    trained_cnn,
    trained_mlp,
)

from tuner.accuracy_debug import exclusion_plans, rank_damaged_nodes
from tuner.candidates import (
    ArrayDataReader,
    BuildContext,
    CandidateSpec,
    SearchSpace,
    build_candidate,
    convert_fp16,
    cpu_has_vnni,
    enumerate_candidates,
    open_runner,
    quantize_static_model,
)
from tuner.errors import ArtifactError, TunerError
from tuner.onnx_tools import RuntimeOptions, describe_inputs, load_session, sha256_file


@pytest.fixture(scope="module")
def digits() -> Digits:
    return load_digits_split()


@pytest.fixture(scope="module")
def mlp(digits: Digits) -> MLP:
    return trained_mlp(digits)


@pytest.fixture(scope="module")
def ctx(
    mlp: MLP, digits: Digits, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuildContext]:
    workdir = tmp_path_factory.mktemp("candidates")
    base = export(mlp, digits.x_holdout, workdir / "base.onnx")
    yield BuildContext(
        base, workdir, {"input": digits.x_calib}, describe_inputs(base), ["logits"], mlp
    )


def names(specs: list[CandidateSpec]) -> list[str]:
    return [s.name for s in specs]


def agreement(ctx: BuildContext, path: Path, digits: Digits) -> float:
    """Top-1 agreement of a candidate ONNX model with the base model on the holdout set."""
    feeds = {"input": digits.x_holdout}
    base = load_session(ctx.base).run(None, feeds)[0].argmax(1)
    return float(np.mean(load_session(path).run(None, feeds)[0].argmax(1) == base))


def ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_space_enumerates_variants_and_lists_skipped_ones_with_reasons() -> None:
    space = SearchSpace(static_methods=("MinMax", "Entropy"), static_op_types=("all",))
    specs, skipped = enumerate_candidates(space, has_torch_module=False, vnni=True)
    assert names(specs)[:3] == ["ort-fp32", "dynamic-s8-pc", "dynamic-s8"]
    assert "static-entropy-s8-all" in names(specs)
    assert len([s for s in specs if s.kind == "static"]) == 4
    by_name = {s.name: s.reason for s in skipped}
    assert "pass torch_module=" in by_name["torch-dynamic-s8"]
    assert "pass torch_module=" in by_name["pruned30-dynamic-s8-pc"]


def test_gpu_candidates_are_skipped_here_with_the_reason() -> None:
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        pytest.skip("this machine has CUDA; the skip path does not apply")
    specs, skipped = enumerate_candidates(SearchSpace(), has_torch_module=True, providers=None)
    assert not [s for s in specs if s.provider != "CPUExecutionProvider"]
    gpu = {s.name: s.reason for s in skipped}
    assert set(gpu) == {"cuda-fp32", "cuda-fp16", "tensorrt-fp32", "tensorrt-fp16"}
    assert "CUDAExecutionProvider not in onnxruntime.get_available_providers()" in gpu["cuda-fp16"]
    assert "onnxruntime-gpu" in gpu["tensorrt-fp32"]


def test_gpu_candidates_join_when_the_provider_exists() -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    specs, skipped = enumerate_candidates(SearchSpace(), has_torch_module=True, providers=providers)
    gpu = [s for s in specs if s.provider == "CUDAExecutionProvider"]
    assert names(gpu) == ["cuda-fp32", "cuda-fp16"] and [s.kind for s in gpu] == ["fp32", "fp16"]
    assert names(skipped) == ["tensorrt-fp32", "tensorrt-fp16"]


def test_reduce_range_follows_vnni(tmp_path: Path) -> None:
    with_vnni, without = tmp_path / "a", tmp_path / "b"
    with_vnni.write_text("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    without.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_has_vnni(with_vnni) and not cpu_has_vnni(without)
    assert not cpu_has_vnni(tmp_path / "missing")
    specs, _ = enumerate_candidates(SearchSpace(), has_torch_module=False, vnni=False)
    assert all(s.params["reduce_range"] for s in specs if s.kind in ("dynamic", "static"))


def test_unknown_choices_are_named() -> None:
    with pytest.raises(TunerError, match="'KL'"):
        SearchSpace(static_methods=("KL",))
    with pytest.raises(TunerError, match=r"prune_amounts=\(1.5,\)"):
        SearchSpace(prune_amounts=(1.5,))


def test_runtime_options_search_threads_and_spinning() -> None:
    labels = [o.label() for o in SearchSpace(threads=(1, 2, 4)).runtime_options()]
    assert labels == ["t1", "t2", "t2-spin", "t4", "t4-spin"]
    assert json.dumps(SearchSpace().to_dict())


def test_data_reader_batches_and_rewinds() -> None:
    reader = ArrayDataReader({"x": np.arange(10, dtype=np.float32).reshape(5, 2)}, batch_size=2)
    assert len(reader) == 3
    assert [b["x"].shape[0] for b in reader] == [2, 2, 1]
    assert reader.get_next() is None
    reader.rewind()
    first = reader.get_next()
    assert first is not None and first["x"][0, 1] == 1.0


def test_fp32_candidate_is_graph_optimized(ctx: BuildContext, digits: Digits) -> None:
    built = build_candidate(
        CandidateSpec("ort-fp32", "fp32", {"graph_optimization": "extended"}), ctx
    )
    assert built.path.exists() and built.runtime == "onnxruntime"
    assert agreement(ctx, built.path, digits) == 1.0


def test_dynamic_int8_quantizes_the_linear_layers(ctx: BuildContext, digits: Digits) -> None:
    specs, _ = enumerate_candidates(SearchSpace(), has_torch_module=True, vnni=True)
    by_name = {s.name: s for s in specs}
    built = build_candidate(by_name["dynamic-s8-pc"], ctx)
    raw = build_candidate(by_name["dynamic-s8-pc-raw"], ctx)
    for candidate in (built, raw):
        # The exporter emits Gemm, which dynamic quantization ignores; the builder rewrites it.
        assert "MatMulInteger" in ops(candidate.path) and "Gemm" not in ops(candidate.path)
        assert agreement(ctx, candidate.path, digits) >= 0.98
    # One is quantized from the pre-processed graph, the other from the export as it was.
    assert sha256_file(raw.path) != sha256_file(built.path)
    assert by_name["dynamic-s8-pc-raw"].params["preprocess"] is False


def test_static_qdq_candidate(ctx: BuildContext, digits: Digits) -> None:
    specs, _ = enumerate_candidates(SearchSpace(), has_torch_module=True, vnni=True)
    spec = next(s for s in specs if s.name == "static-percentile-u8-matmul_conv")
    built = build_candidate(spec, ctx)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(built.path)
    assert agreement(ctx, built.path, digits) >= 0.98


def test_torch_dynamic_candidate_runs_in_torch(ctx: BuildContext, digits: Digits) -> None:
    built = build_candidate(CandidateSpec("torch-dynamic-s8", "torch_dynamic"), ctx)
    assert built.runtime == "torch" and built.path.suffix == ".pt"
    assert "cannot export" in built.notes
    out = open_runner(built, RuntimeOptions()).run({"input": digits.x_holdout})[0]
    base = load_session(ctx.base).run(None, {"input": digits.x_holdout})[0]
    assert np.mean(out.argmax(1) == base.argmax(1)) >= 0.98


def test_pruned_candidate_reports_sparsity_and_why_it_is_not_faster(ctx: BuildContext) -> None:
    spec = CandidateSpec(
        "pruned50-dynamic-s8-pc",
        "pruned",
        {"amount": 0.5, "per_channel": True, "reduce_range": False},
    )
    built = build_candidate(spec, ctx)
    assert built.extra["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "dense kernels do not skip zeros" in built.notes
    assert "MatMulInteger" in ops(built.path)
    assert isinstance(ctx.torch_module, MLP)
    assert float((ctx.torch_module.hidden.weight == 0).float().mean()) < 0.01  # original untouched


def test_fp16_conversion_keeps_fp32_io(ctx: BuildContext, tmp_path: Path) -> None:
    path = convert_fp16(ctx.base, tmp_path / "fp16.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kinds = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
    x = {"input": np.random.default_rng(0).random((3, 64), dtype=np.float32)}
    # ORT's CPU provider runs these fp16 ops too, which lets the conversion be checked here.
    np.testing.assert_allclose(
        load_session(path).run(None, x)[0], load_session(ctx.base).run(None, x)[0], atol=2e-2
    )


def test_build_errors_name_the_candidate(ctx: BuildContext, tmp_path: Path) -> None:
    broken = BuildContext(
        tmp_path / "nothing.onnx", tmp_path, ctx.calibration, ctx.inputs, ctx.outputs
    )
    with pytest.raises(ArtifactError, match="building 'ort-fp32' failed"):
        build_candidate(CandidateSpec("ort-fp32", "fp32", {"graph_optimization": "all"}), broken)
    with pytest.raises(TunerError, match="pass torch_module="):
        build_candidate(CandidateSpec("torch-dynamic-s8", "torch_dynamic"), broken)


def test_debugger_blames_the_node_fed_by_the_outlier(
    ctx: BuildContext, digits: Digits, tmp_path: Path
) -> None:
    bad_calibration = {"input": outlier_calibration(digits.x_calib)}
    qdq = quantize_static_model(ctx.preprocessed, tmp_path / "bad.onnx", bad_calibration)
    assert agreement(ctx, qdq, digits) < 0.5  # one huge pixel ruins the input scale
    ranked = rank_damaged_nodes(
        ctx.preprocessed, qdq, {"input": digits.x_holdout}, tmp_path / "debug"
    )
    assert ranked[0].node == "/hidden/Gemm" and ranked[0].tensor == "input"
    assert ranked[0].sqnr_db < ranked[-1].sqnr_db
    plans = exclusion_plans(ranked, (0.1, 0.3))
    assert plans[0] == ["/hidden/Gemm"] and len(plans[1]) == 2
    fixed = quantize_static_model(
        ctx.preprocessed, tmp_path / "fixed.onnx", bad_calibration, nodes_to_exclude=plans[1]
    )
    assert agreement(ctx, fixed, digits) >= 0.98


def test_cnn_candidates_build(digits: Digits, tmp_path: Path) -> None:
    cnn = trained_cnn(digits)
    images = digits.x_holdout.reshape(-1, 1, 8, 8)
    base = export(cnn, images, tmp_path / "cnn.onnx")
    ctx = BuildContext(
        base,
        tmp_path,
        {"input": digits.x_calib.reshape(-1, 1, 8, 8)},
        describe_inputs(base),
        ["logits"],
        cnn,
    )
    static = build_candidate(
        CandidateSpec(
            "static-minmax-s8-all",
            "static",
            {
                "calibration": "MinMax",
                "activation_type": "QInt8",
                "weight_type": "QInt8",
                "per_channel": True,
                "reduce_range": False,
                "op_types": "all",
            },
        ),
        ctx,
    )
    assert "Conv" in ops(static.path) and "QuantizeLinear" in ops(static.path)
    base_out = load_session(base).run(None, {"input": images})[0]
    out = load_session(static.path).run(None, {"input": images})[0]
    assert np.mean(out.argmax(1) == base_out.argmax(1)) >= 0.97
    torch_out = cnn(torch.from_numpy(images)).detach().numpy()
    np.testing.assert_allclose(base_out, torch_out, atol=1e-4)
