"""Turn sampled model inputs and outputs into stored rows (runs on the writer thread).

Tabular inputs (a DataFrame, or a 2-D array with few columns) keep their named columns.
Tensors become per-row summary features (mean, std, min, max, L2 norm) plus the raw row when
it is small, so drift can be computed and calibration sets rebuilt from real traffic.
Outputs become a summary: top class and confidence, an embedding's norm, or the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.storage import pack_arrays

SUMMARY_FEATURES = ("mean", "std", "min", "max", "l2")
OUTPUT_KINDS = ("auto", "classes", "embedding", "scalar")


@dataclass(frozen=True)
class RowSample:
    """One input row ready to store."""

    input_kind: str
    features: dict[str, Any]
    outputs: dict[str, Any] | None
    raw: bytes | None


def to_numpy(value: Any) -> np.ndarray | None:
    """Convert a torch tensor / array-like to numpy without copying when possible."""
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # torch.Tensor
        return np.asarray(detach().cpu().numpy())
    if hasattr(value, "__array__") and not hasattr(value, "columns"):
        return np.asarray(value)
    return None


def named_inputs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Name a call's inputs: a feed dict keeps its names, positionals become ``arg0``..."""
    if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
        return dict(args[0])
    named = {f"arg{i}": a for i, a in enumerate(args)}
    named.update(kwargs)
    return named


def sample_rows(
    inputs: Mapping[str, Any],
    outputs: Any,
    *,
    max_rows: int,
    tabular_max_columns: int = 64,
    raw_max_values: int = 4096,
    output_kind: str = "auto",
    feature_names: Sequence[str] | None = None,
) -> list[RowSample]:
    """Rows to store for one call (at most ``max_rows``)."""
    if not inputs or max_rows <= 0:
        return []
    primary = next(iter(inputs.values()))
    kind, feats = _input_features(primary, tabular_max_columns, feature_names)
    n = min(len(feats), max_rows)
    raws = _raw_rows(inputs, n, raw_max_values)
    outs = output_summaries(outputs, len(feats), output_kind)
    return [
        RowSample(kind, feats[i], outs[i] if outs is not None else None, raws[i]) for i in range(n)
    ]


def _input_features(
    primary: Any, max_cols: int, names: Sequence[str] | None
) -> tuple[str, list[dict[str, Any]]]:
    if hasattr(primary, "columns") and hasattr(primary, "to_dict"):  # pandas DataFrame
        records = primary.to_dict(orient="records")
        return "tabular", [{str(k): _scalar(v) for k, v in r.items()} for r in records]
    if isinstance(primary, (list, tuple)) and primary and isinstance(primary[0], str):
        return "text", [{"chars": len(s), "words": len(s.split())} for s in primary]
    if isinstance(primary, str):
        return "text", [{"chars": len(primary), "words": len(primary.split())}]
    arr = to_numpy(primary)
    if arr is None:
        return "unknown", []
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim == 2 and arr.shape[1] <= max_cols:
        cols = list(names) if names and len(names) == arr.shape[1] else None
        cols = cols or [f"x{j}" for j in range(arr.shape[1])]
        return "tabular", [dict(zip(cols, map(_scalar, row))) for row in arr.tolist()]
    return "tensor", [_summary(row) for row in arr.reshape(arr.shape[0], -1)]


def _summary(row: np.ndarray) -> dict[str, Any]:
    x = row.astype(np.float64, copy=False)
    if x.size == 0:
        return dict.fromkeys(SUMMARY_FEATURES)
    stats = (x.mean(), x.std(), x.min(), x.max(), float(np.sqrt(np.dot(x, x))))
    return {k: _scalar(v) for k, v in zip(SUMMARY_FEATURES, stats)}


def _scalar(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return None if math.isnan(f) or math.isinf(f) else f
    if v is None:
        return None
    return str(v)


def _raw_rows(inputs: Mapping[str, Any], n: int, limit: int) -> list[bytes | None]:
    arrays: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            arr: np.ndarray | None = np.asarray(value, dtype=str)
        else:
            arr = to_numpy(value)
        if arr is None or arr.ndim == 0 or arr.shape[0] < n or arr.dtype == object:
            return [None] * n
        arrays[name] = arr
    per_row = sum(int(np.prod(a.shape[1:], dtype=np.int64)) for a in arrays.values())
    if per_row > limit:
        return [None] * n
    return [pack_arrays({k: a[i] for k, a in arrays.items()}) for i in range(n)]


def output_summaries(outputs: Any, n_rows: int, kind: str = "auto") -> list[dict[str, Any]] | None:
    """Per-row output summaries, or None when the output does not line up with the rows."""
    first = _first_array(outputs)
    if first is None:
        return None
    arr = first.astype(np.float64, copy=False) if first.dtype != object else None
    if arr is None:
        return None
    if arr.ndim == 0:
        return [{"value": _scalar(arr)}] * n_rows if n_rows == 1 else None
    if arr.shape[0] != n_rows:
        return None
    flat = arr.reshape(n_rows, -1)
    kind = _output_kind(flat, kind)
    if kind == "scalar":
        return [{"value": _scalar(v)} for v in flat[:, 0]]
    if kind == "embedding":
        return [{"norm": _scalar(v)} for v in np.linalg.norm(flat, axis=1)]
    probs = _as_probabilities(flat)
    top = probs.argmax(axis=1)
    return [{"top_class": int(c), "confidence": _scalar(probs[i, c])} for i, c in enumerate(top)]


def _first_array(outputs: Any) -> np.ndarray | None:
    if isinstance(outputs, Mapping):
        outputs = next(iter(outputs.values()), None)
    elif isinstance(outputs, (list, tuple)) and outputs and not isinstance(outputs[0], float):
        arr = to_numpy(outputs[0])
        if arr is not None and arr.ndim >= 1:
            return arr
    return to_numpy(outputs) if outputs is not None else None


def _output_kind(flat: np.ndarray, kind: str) -> str:
    if kind != "auto":
        return kind
    if flat.shape[1] == 1:
        return "scalar"
    return "embedding" if flat.shape[1] >= 128 else "classes"


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    rows_sum_to_one = np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    if rows_sum_to_one and scores.min() >= 0:
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
