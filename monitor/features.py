"""Turn sampled model inputs and outputs into stored rows (runs on the writer thread).

Tabular inputs (a DataFrame, or a 2-D array with few columns) keep their named columns.
Tensors become per-row summary features (mean, std, min, max, L2 norm) plus the raw row (up to
``raw_row_max_bytes``), so drift can be computed and calibration sets rebuilt from real traffic.
Outputs become a summary: top class and confidence, an embedding's norm, or the value.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SUMMARY_FEATURES = ("mean", "std", "min", "max", "l2")
OUTPUT_KINDS = ("auto", "classes", "embedding", "scalar")
MAX_STORED_PROBS = 128  # class-score outputs this wide or narrower keep their probabilities


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


_WHOLE = 1 << 62  # as many rows as an array has


def snapshot(value: Any, max_rows: int) -> Any:
    """A private copy of the first ``max_rows`` rows of a sampled value (runs on the call path).

    Only sampled calls pay for it, and never for more rows than can be stored, so a caller
    that reuses its buffers cannot change what the writer reads later.
    """
    if isinstance(value, np.ndarray):
        return value[:max_rows].copy() if value.ndim else value.copy()
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {k: snapshot(v, max_rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and hasattr(value[0], "shape"):
            # A list of row arrays (a batch) or of outputs (ORT's run): each array is kept
            # whole, since its rows are not the call's rows; only the list is capped.
            return [snapshot(v, _WHOLE) for v in value[:max_rows]]
        # Strings and numbers are immutable; nothing else in a list is ever stored.
        return list(value[:max_rows])
    if hasattr(value, "clone") and hasattr(value, "detach"):  # torch.Tensor
        tensor = value.detach()  # no autograd record of the slice
        return (tensor[:max_rows] if tensor.dim() else tensor).clone()
    if hasattr(value, "iloc") and hasattr(value, "copy"):  # pandas
        return value.iloc[:max_rows].copy()
    if hasattr(value, "__array__"):
        arr = np.array(value)
        return arr[:max_rows] if arr.ndim else arr
    return value


def sample_rows(
    inputs: Mapping[str, Any],
    outputs: Any,
    *,
    max_rows: int,
    tabular_max_columns: int = 64,
    raw_row_max_bytes: int = 8 << 20,
    output_kind: str = "auto",
    feature_names: Sequence[str] | None = None,
) -> list[RowSample]:
    """Rows to store for one call (at most ``max_rows``; only those are ever converted)."""
    if not inputs or max_rows <= 0:
        return []
    primary = next(iter(inputs.values()))
    total = _rows_of(primary)
    kind, feats = _input_features(primary, tabular_max_columns, feature_names, max_rows)
    n = len(feats)
    raws = _raw_rows(inputs, n, raw_row_max_bytes)
    outs = output_summaries(outputs, total, output_kind, max_rows=n)
    return [
        RowSample(kind, feats[i], outs[i] if outs is not None else None, raws[i]) for i in range(n)
    ]


def _rows_of(primary: Any) -> int:
    if isinstance(primary, str):
        return 1
    if hasattr(primary, "columns") and hasattr(primary, "to_dict"):
        return len(primary)
    shape = getattr(primary, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    if isinstance(primary, (list, tuple)):
        return len(primary)
    return 1


def _input_features(
    primary: Any, max_cols: int, names: Sequence[str] | None, max_rows: int
) -> tuple[str, list[dict[str, Any]]]:
    if hasattr(primary, "columns") and hasattr(primary, "to_dict"):  # pandas DataFrame
        records = primary.iloc[:max_rows].to_dict(orient="records")
        return "tabular", [{str(k): _scalar(v) for k, v in r.items()} for r in records]
    if isinstance(primary, (list, tuple)) and primary and isinstance(primary[0], str):
        return "text", [{"chars": len(s), "words": len(s.split())} for s in primary[:max_rows]]
    if isinstance(primary, str):
        return "text", [{"chars": len(primary), "words": len(primary.split())}]
    arr = to_numpy(primary)
    if arr is None:
        return "unknown", []
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    arr = arr[:max_rows]
    if arr.ndim == 2 and arr.shape[1] <= max_cols:
        cols = list(names) if names and len(names) == arr.shape[1] else None
        cols = cols or [f"x{j}" for j in range(arr.shape[1])]
        if arr.dtype.kind in "iuf" and np.isfinite(arr).all():  # plain numbers: no per-value work
            values = arr.astype(np.float64)
            if arr.dtype.kind == "f" and arr.dtype.itemsize <= 4:
                values = _float32_digits(values)
            return "tabular", [dict(zip(cols, row)) for row in values.tolist()]
        return "tabular", [dict(zip(cols, map(_scalar, row))) for row in arr.tolist()]
    return "tensor", _summaries(arr.reshape(arr.shape[0], -1))


def _float32_digits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to 9 significant digits: the same float32 again, and a short JSON
    number ("0.850624204" rather than "0.8506242036819458", a third cheaper to encode)."""
    nonzero = x != 0
    exponent = np.floor(np.log10(np.abs(x), where=nonzero, out=np.zeros_like(x)))
    scale = 10.0 ** (8 - exponent)
    return np.where(nonzero, np.round(x * scale) / scale, x)


def _summaries(rows: np.ndarray) -> list[dict[str, Any]]:
    """Per-row summary features, vectorised over chunks of about a million values."""
    if rows.shape[1] == 0:
        return [dict.fromkeys(SUMMARY_FEATURES) for _ in range(rows.shape[0])]
    step = max(1, (1 << 20) // rows.shape[1])
    out: list[dict[str, Any]] = []
    for start in range(0, rows.shape[0], step):
        x = rows[start : start + step].astype(np.float64, copy=False)
        stats = (x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1),
                 np.sqrt(np.einsum("ij,ij->i", x, x)))  # fmt: skip
        columns = [[_scalar(v) for v in s.tolist()] for s in stats]
        out.extend(dict(zip(SUMMARY_FEATURES, values)) for values in zip(*columns))
    return out


def _scalar(v: Any) -> Any:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return None if math.isnan(f) or math.isinf(f) else f
    if v is None:
        return None
    return str(v)


def _raw_rows(inputs: Mapping[str, Any], n: int, max_bytes: int) -> list[bytes | None]:
    """Each row's arrays as ``.npz``; None for all rows when one would exceed ``max_bytes``."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            arr: np.ndarray | None = np.asarray(value, dtype=str)
        else:
            arr = to_numpy(value)
        if arr is None or arr.ndim == 0 or arr.shape[0] < n or arr.dtype == object:
            return [None] * n
        arrays[name] = arr
    per_row = sum(a[0].nbytes for a in arrays.values()) if n else 0
    if per_row > max_bytes:
        return [None] * n
    return list(pack_rows(arrays, n))


def pack_rows(arrays: Mapping[str, np.ndarray], n: int) -> list[bytes]:
    """Row ``i`` of each array as one ``.npz`` each, for ``i < n``.

    The format of :func:`monitor.storage.pack_arrays` (read by ``unpack_arrays``), about three
    times faster for many rows: each array's ``.npy`` header is built once.
    """
    headers: dict[str, tuple[str, bytes]] = {}
    for name, a in arrays.items():
        buf = io.BytesIO()
        spec = {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                "shape": a.shape[1:]}  # fmt: skip
        np.lib.format.write_array_header_1_0(buf, spec)
        headers[name] = (name + ".npy", buf.getvalue())
    out = []
    for i in range(n):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, a in arrays.items():
                entry, header = headers[name]
                z.writestr(entry, header + a[i : i + 1].tobytes())  # C order, full dtype
        out.append(buf.getvalue())
    return out


def output_summaries(
    outputs: Any, n_rows: int, kind: str = "auto", *, max_rows: int | None = None
) -> list[dict[str, Any]] | None:
    """Per-row output summaries (of the first ``max_rows`` rows), or None when the output
    does not line up with the ``n_rows`` rows of the input."""
    first = _first_array(outputs)
    if first is None or first.dtype == object:
        return None
    if first.ndim == 0:
        return [{"value": _scalar(first.item())}] if n_rows == 1 else None
    if first.shape[0] != n_rows:
        return None
    arr = first[:max_rows].astype(np.float64, copy=False)
    flat = arr.reshape(arr.shape[0], -1)
    told = kind != "auto"
    kind = _output_kind(flat, kind)
    if kind == "scalar":
        # An explicit output_kind="scalar" marks the values as quantities: realized
        # performance then treats whole numbers (counts) as a regression, not class labels.
        mark = {"kind": "scalar"} if told else {}
        return [{"value": _scalar(v), **mark} for v in flat[:, 0].tolist()]
    if kind == "embedding":
        return [{"norm": _scalar(v)} for v in np.linalg.norm(flat, axis=1).tolist()]
    probs = _as_probabilities(flat)
    top = probs.argmax(axis=1)
    if probs.shape[1] > MAX_STORED_PROBS:
        return [{"top_class": int(c), "confidence": _scalar(probs[i, c])}
                for i, c in enumerate(top)]  # fmt: skip
    # The whole probability vector, so realized log loss can be computed once labels arrive.
    vectors = np.round(probs, 6).tolist()
    return [
        {"top_class": int(c), "confidence": _scalar(probs[i, c]), "probs": vectors[i]}
        for i, c in enumerate(top)
    ]


def _first_array(outputs: Any) -> np.ndarray | None:
    if isinstance(outputs, Mapping):
        outputs = next(iter(outputs.values()), None)
    if isinstance(outputs, (bool, int, float, np.number)):  # a number is a 0-d output
        return np.asarray(float(outputs))
    if isinstance(outputs, (list, tuple)) and outputs:
        if all(isinstance(v, (bool, int, float, np.number)) for v in outputs):
            return np.asarray(outputs, dtype=np.float64)
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
