"""Activation smoothing before dynamic int8, after SmoothQuant (Xiao et al., 2023).

Dynamic quantization gives a MatMul's whole input tensor one scale per call. Transformers'
activations carry a few outlier channels (here up to 28 against a median of 1.8 after a
layer norm), so that one scale leaves the other channels few levels. Smoothing divides each
input channel ``j`` by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies row ``j``
of the weight by it: ``(X / s) (s W) = X W`` exactly in float, but the quantization error moves
from the activations to the weights, which are quantized per channel offline.

The division is an inserted ``Mul`` per smoothed input (an input shared by Q, K and V is
smoothed once, with the largest weight row of the three). ``alpha`` is chosen per model by the
quantized model's error on the calibration rows, never on the rows the guard judges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuner.errors import TunerError
from tuner.onnx_tools import Feeds, num_rows, take_rows

ALPHAS = (0.5, 0.65, 0.8)
# Bounds on a channel's factor: beyond them a channel would lose its own precision instead.
MIN_FACTOR, MAX_FACTOR = 1e-2, 1e2
MASK = "attention_mask"
CHUNK_ROWS = 16
MAX_CHOICE_ROWS = 64


@dataclass(frozen=True)
class Smoothing:
    """The smoothed float graph chosen for one quantizer setting, and how it was chosen.

    ``errors`` maps each alpha tried (0.0: not smoothed) to the quantized model's relative
    squared error against the float source on the calibration rows.
    """

    path: Path
    alpha: float
    sites: int
    errors: dict[float, float]

    def note(self) -> str:
        """One line for the candidate's notes."""
        return (
            f"smoothed {self.sites} MatMul inputs, alpha {self.alpha:g} "
            f"(calibration error {self.errors[self.alpha]:.2%}, "
            f"unsmoothed {self.errors[0.0]:.2%})"
        )


def weighted_matmuls(model: Any) -> dict[str, list[Any]]:
    """Return MatMul nodes with a constant 2-D weight as second input, by activation input."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    sites: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in weights:
            continue
        if numpy_helper.to_array(weights[node.input[1]]).ndim == 2:
            sites.setdefault(node.input[0], []).append(node)
    return sites


def channel_maxima(model: Any, names: Sequence[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """Return ``max |x_j|`` per last-axis channel of each tensor ``names`` over ``feeds``.

    Rows run in chunks; where a tensor has the attention mask's (batch, sequence) axes only
    the real tokens count, since padding never reaches the outputs.
    """
    from tuner.onnx_tools import exposing_session

    session, wanted = exposing_session(model, names)
    maxima: dict[str, np.ndarray] = {}
    for start in range(0, num_rows(feeds), CHUNK_ROWS):
        part = take_rows(feeds, slice(start, start + CHUNK_ROWS))
        values = dict(zip(wanted, session.run(wanted, part), strict=True)) if wanted else {}
        values.update({n: part[n] for n in names if n not in wanted and n in part})
        mask = part.get(MASK)
        for name, value in values.items():
            x = np.abs(np.asarray(value, dtype=np.float32))
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[np.asarray(mask) != 0]
            peak = x.reshape(-1, x.shape[-1]).max(axis=0) if x.size else None
            if peak is not None:
                maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
    return maxima


def smooth_graph(source: Path, out: Path, maxima: Mapping[str, np.ndarray], alpha: float) -> int:
    """Write ``source`` with every weighted MatMul input smoothed by ``alpha``; return how many.

    The float outputs do not change (up to rounding). Gemm with constant weights is rewritten
    as MatMul first, as the dynamic quantizer would.
    """
    import onnx
    from onnx import helper, numpy_helper

    from tuner.candidates import gemm_to_matmul

    model = onnx.load(str(source))
    gemm_to_matmul(model)
    weights = {init.name: init for init in model.graph.initializer}
    order = list(model.graph.node)
    smoothed = 0
    for x, nodes in weighted_matmuls(model).items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]).astype(np.float32) for n in nodes]
        a = maxima.get(x)
        if a is None or any(w.shape[0] != a.shape[0] for w in arrays):
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        s = np.maximum(a, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
        s = np.clip(s, MIN_FACTOR, MAX_FACTOR).astype(np.float32)
        inverse, y = f"{x}_smooth_inverse", f"{x}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / s, inverse))
        mul = helper.make_node("Mul", [x, inverse], [y], name=f"{x}_smooth")
        for node, w in zip(nodes, arrays, strict=True):
            scaled = f"{node.input[1]}_smoothed_{smoothed}"
            model.graph.initializer.append(numpy_helper.from_array(w * s[:, None], scaled))
            node.input[0], node.input[1] = y, scaled
        order.insert(min(order.index(n) for n in nodes), mul)
        smoothed += 1
    used = {name for node in order for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.node[:]
    model.graph.node.extend(order)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(out))
    return smoothed


def relative_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Squared error of ``outputs`` over the squared norm of ``reference`` (float outputs)."""
    num = den = 0.0
    for r, o in zip(reference, outputs, strict=True):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r64.dtype.kind == "f" and r64.shape == o64.shape:
            num += float(np.sum((o64 - r64) ** 2))
            den += float(np.sum(r64**2))
    return num / den if den else 0.0


def choose_smoothing(
    source: Path,
    workdir: Path,
    calibration: Feeds,
    quantize: Callable[[Path, Path], Path],
    alphas: Sequence[float] = ALPHAS,
) -> Smoothing:
    """Smooth ``source`` at each alpha, quantize each with ``quantize(float, out)``, and
    return the one whose quantized outputs are closest to the float source's on the
    calibration rows (first ``MAX_CHOICE_ROWS``).

    Raises:
        TunerError: the graph has no MatMul with a constant weight to smooth.
    """
    import onnx

    from tuner.candidates import gemm_to_matmul

    model = onnx.load(str(source))
    gemm_to_matmul(model)
    sites = weighted_matmuls(model)
    if not sites:
        raise TunerError(f"{source.name} has no MatMul with a constant weight: nothing to smooth")
    workdir.mkdir(parents=True, exist_ok=True)
    maxima = channel_maxima(model, sorted(sites), calibration)
    rows = take_rows(calibration, slice(0, MAX_CHOICE_ROWS))
    reference = _run(source, rows)
    errors = {0.0: relative_error(reference, _run(quantize(source, workdir / "plain.onnx"), rows))}
    best: tuple[float, Path, int] | None = None
    for alpha in alphas:
        path = workdir / f"alpha{alpha:g}.onnx"
        count = smooth_graph(source, path, maxima, alpha)
        errors[alpha] = relative_error(
            reference, _run(quantize(path, path.with_suffix(".q.onnx")), rows)
        )
        if best is None or errors[alpha] < errors[best[0]]:
            best = (alpha, path, count)
    assert best is not None
    return Smoothing(best[1], best[0], best[2], errors)


def _run(path: Path, feeds: Feeds) -> list[np.ndarray]:
    """Run ``path`` on ``feeds`` in one single-threaded ORT session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [
        np.asarray(o) for o in session.run(None, {k: v for k, v in feeds.items() if k in names})
    ]


def per_token_graph(source: Path, out: Path, nodes: Sequence[str]) -> int:
    """Write ``source`` with per-row input scales on the MatMuls named ``nodes``; return how many.

    Dynamic quantization gives a whole input tensor one scale, so one token with a large value
    (a sentence's first, often) leaves every other token few levels; smoothing moves channel
    outliers, not token ones. Each named MatMul's input is divided by its own per-row absolute
    maximum, and the product is multiplied back: ``x W = d * ((x / d) W)`` with ``d`` per row,
    exact in float, and every row then fills the int8 range. Costs an Abs, a ReduceMax, a Div
    and a Mul per node, elementwise.
    """
    import onnx
    from onnx import helper, numpy_helper

    from tuner.candidates import gemm_to_matmul

    model = onnx.load(str(source))
    gemm_to_matmul(model)
    wanted = set(nodes)
    eps, axes = "per_token_epsilon", "per_token_axes"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1e-12, np.float32), eps))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    out_nodes: list[Any] = []
    scaled = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in wanted:
            out_nodes.append(node)
            continue
        x, y, tag = node.input[0], node.output[0], f"{node.name}_per_token"
        absolute, peak, d, xs, ys = (f"{tag}_{s}" for s in ("abs", "max", "scale", "in", "out"))
        out_nodes += [
            helper.make_node("Abs", [x], [absolute], name=f"{tag}_abs"),
            helper.make_node("ReduceMax", [absolute, axes], [peak], name=f"{tag}_max", keepdims=1)
            if opset >= 18
            else helper.make_node(
                "ReduceMax", [absolute], [peak], name=f"{tag}_max", axes=[-1], keepdims=1
            ),
            helper.make_node("Max", [peak, eps], [d], name=f"{tag}_floor"),
            helper.make_node("Div", [x, d], [xs], name=f"{tag}_div"),
        ]
        node.input[0], node.output[0] = xs, ys
        out_nodes += [node, helper.make_node("Mul", [ys, d], [y], name=f"{tag}_restore")]
        scaled += 1
    missing = wanted - {n.name for n in model.graph.node}
    if missing:
        raise TunerError(f"no MatMul named {sorted(missing)[:3]} in {source.name}")
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    onnx.save(model, str(out))
    return scaled
