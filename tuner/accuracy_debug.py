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
