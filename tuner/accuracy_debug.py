"""Find the nodes that static quantization damages most, so a retry can leave them in float.

Runs the float and the QDQ model on the same samples with every intermediate tensor exposed
(onnxruntime.quantization.qdq_loss_debug), scores each node by the worst signal-to-quantization
noise ratio (SQNR, dB) among its quantized inputs and dense weights, and ranks the lowest first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuner.candidates import ArrayDataReader, quiet
from tuner.onnx_tools import take_rows

WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


@dataclass(frozen=True)
class NodeDamage:
    """One node's damage: the lowest SQNR (dB) among its inputs and the tensor responsible."""

    node: str
    op_type: str
    sqnr_db: float
    tensor: str

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)


def rank_damaged_nodes(
    float_model: Path,
    qdq_model: Path,
    feeds: Mapping[str, np.ndarray],
    workdir: Path,
    *,
    max_rows: int = 8,
) -> list[NodeDamage]:
    """Return the float model's nodes ordered from most to least damaged by quantization.

    ``float_model`` must be the model that was quantized (same tensor and node names).
    """
    import onnx

    workdir.mkdir(parents=True, exist_ok=True)
    sample = take_rows(feeds, slice(0, max_rows))
    activation_sqnr = _activation_sqnr(float_model, qdq_model, sample, workdir)
    weight_sqnr = _weight_sqnr(float_model, qdq_model)
    ranked = []
    for node in onnx.load(str(float_model)).graph.node:
        # Only dense weights count: a Gather table shares its output's range, so rows the
        # calibration never reads look ruined while the outputs are fine.
        scores = {**activation_sqnr, **(weight_sqnr if node.op_type in WEIGHTED_OPS else {})}
        inputs = [(scores[name], name) for name in node.input if name in scores]
        if inputs and node.name:
            sqnr, tensor = min(inputs)
            ranked.append(NodeDamage(node.name, node.op_type, sqnr, tensor))
    return sorted(ranked, key=lambda d: d.sqnr_db)


def _activation_sqnr(
    float_model: Path, qdq_model: Path, sample: Mapping[str, np.ndarray], workdir: Path
) -> dict[str, float]:
    """Return the SQNR of each quantized activation: its value before vs after its QDQ pair."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    activations = []
    for model, tag in ((float_model, "float"), (qdq_model, "qdq")):
        augmented = workdir / f"{model.stem}.{tag}.debug.onnx"
        with quiet():
            modify_model_output_intermediate_tensors(str(model), str(augmented))
            activations.append(collect_activations(str(augmented), ArrayDataReader(sample)))
        augmented.unlink(missing_ok=True)
    matching = create_activation_matching(activations[1], activations[0])
    errors = compute_activation_error(matching, err_func=_sqnr)
    return {name: _finite(err["qdq_err"]) for name, err in errors.items()}


def _weight_sqnr(float_model: Path, qdq_model: Path) -> dict[str, float]:
    """Return the SQNR of each quantized weight against its float original."""
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_weight_error,
        create_weight_matching,
    )

    with quiet():
        matching = create_weight_matching(str(float_model), str(qdq_model))
    errors = compute_weight_error(matching, err_func=_sqnr)
    return {name: _finite(v) for name, v in errors.items()}


def _sqnr(reference: Any, noisy: Any) -> float:
    """Return the SQNR in dB of arrays or lists of arrays; +inf for an all-zero reference.

    ORT's helper fails on 0-d weights and scores zeros against zeros as 0 dB, which would blame
    every node downstream of the real culprit.
    """
    ref, out = _flat(reference), _flat(noisy)
    eps = float(np.finfo(np.float32).eps)
    signal = float(np.linalg.norm(ref))
    if signal < eps:
        return float("inf")
    return 20 * math.log10(signal / max(float(np.linalg.norm(ref - out)), eps))


def _flat(value: Any) -> np.ndarray:
    """Return one float64 vector from an array or a list of arrays."""
    if isinstance(value, list | tuple):
        return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in value])
    return np.asarray(value, dtype=np.float64).ravel()


def _finite(value: float) -> float:
    """Map NaN (an all-zero tensor) to +inf so it never ranks as damaged."""
    return float("inf") if math.isnan(value) else float(value)


def exclusion_plans(ranked: Sequence[NodeDamage], fractions: Sequence[float]) -> list[list[str]]:
    """Return growing lists of the worst nodes, one per fraction, each longer than the last.

    >>> damage = [NodeDamage(f"n{i}", "MatMul", float(i), "t") for i in range(4)]
    >>> exclusion_plans(damage, (0.1, 0.3, 0.5))
    [['n0'], ['n0', 'n1'], ['n0', 'n1', 'n2']]
    """
    plans: list[list[str]] = []
    for fraction in fractions:
        count = max(len(plans[-1]) + 1 if plans else 1, math.ceil(len(ranked) * fraction))
        if count > len(ranked):
            break
        plans.append([d.node for d in ranked[:count]])
    return plans


def rank_dynamic_damage(
    float_model: Path,
    feeds: Mapping[str, np.ndarray],
    *,
    per_channel: bool,
    reduce_range: bool,
    max_rows: int = 16,
) -> list[NodeDamage]:
    """Rank the MatMuls dynamic int8 would damage most, most damaged first.

    Dynamic quantization leaves no QDQ pairs to compare, so each MatMul with a constant weight
    is replayed the way the quantizer runs it, on its real inputs from ``feeds``: the input as
    ``DynamicQuantizeLinear`` makes it (uint8, asymmetric, one scale for the whole tensor), the
    weight as int8 symmetric (per column with ``per_channel``, 7 bits with ``reduce_range``).
    A node's score is the SQNR (dB) of its product against the float product: what reaches
    the next layer, so a weight outlier that only multiplies zeros still shows its damage.
    """
    import onnx
    from onnx import numpy_helper

    from tuner.candidates import gemm_to_matmul

    model = onnx.load(str(float_model))
    gemm_to_matmul(model)  # as the quantizer does: Linear layers export as Gemm
    weights = {init.name: init for init in model.graph.initializer}
    nodes = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name and len(n.input) == 2 and n.input[1] in weights
    ]
    activations = _intermediates(model, sorted({n.input[0] for n in nodes}), feeds, max_rows)
    ranked = []
    for n in nodes:
        w = numpy_helper.to_array(weights[n.input[1]]).astype(np.float32)
        wq = _fake_int8_weight(w, per_channel, reduce_range)
        x = activations.get(n.input[0])
        if x is None or w.ndim != 2:
            sqnr, tensor = _sqnr(w, wq), n.input[1]
        else:
            sqnr, tensor = _sqnr(x @ w, _fake_uint8_dynamic(x) @ wq), n.output[0]
        ranked.append(NodeDamage(n.name, n.op_type, _finite(sqnr), tensor))
    return sorted(ranked, key=lambda d: d.sqnr_db)


def _intermediates(
    model: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray], max_rows: int
) -> dict[str, np.ndarray]:
    """Return float values of graph tensors ``names`` on the first rows of ``feeds``."""
    from tuner.onnx_tools import exposing_session

    session, wanted = exposing_session(model, names)
    sample = take_rows(feeds, slice(0, max_rows))
    values = dict(zip(wanted, session.run(wanted, sample), strict=True)) if wanted else {}
    values.update({n: sample[n] for n in names if n not in wanted and n in sample})
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def _fake_uint8_dynamic(x: np.ndarray) -> np.ndarray:
    """Quantize-dequantize like ``DynamicQuantizeLinear``: uint8, range widened to hold 0."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _fake_int8_weight(w: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    """Quantize-dequantize a MatMul weight (K, N) as symmetric int8, per column if asked."""
    qmax = 63 if reduce_range else 127
    peak = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.where(peak > 0, peak / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale
