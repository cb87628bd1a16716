"""Real ONNX models for serving tests: a light and a heavy model that give the same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IN, OUT = 16, 4
WEIGHTS = np.random.default_rng(7).normal(size=(IN, OUT)).astype(np.float32)


def tiny_onnx(path: Path | str, scale: float = 1.0) -> Path:
    """A 4 -> 3 MatMul model (``scale`` makes versions differ); returns its path."""
    from onnx import TensorProto, helper

    weights = (np.arange(12, dtype=np.float32) * scale).tolist()
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], weights)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    return _save(graph, Path(path))


def light_model(path: Path) -> Path:
    """``y = x @ W``: a few microseconds a call."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [IN, OUT], WEIGHTS.flatten())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "light",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])],
        [w],
    )
    return _save(graph, path)


def heavy_model(path: Path, width: int = 384, layers: int = 3) -> Path:
    """``y = x @ W + 0 * sum(deep(x))``: the same answers, a lot more arithmetic per call."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [IN, OUT], WEIGHTS.flatten())]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"])]
    prev, dim = "x", IN
    for i in range(layers):
        w = rng.normal(size=(dim, width)).astype(np.float32) / np.sqrt(dim)
        inits.append(helper.make_tensor(f"D{i}", TensorProto.FLOAT, [dim, width], w.flatten()))
        nodes.append(helper.make_node("MatMul", [prev, f"D{i}"], [f"h{i}"]))
        prev, dim = f"h{i}", width
    inits.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    inits.append(helper.make_tensor("axes", TensorProto.INT64, [1], [1]))
    nodes += [
        helper.make_node("ReduceSum", [prev, "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["y0", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])],
        inits,
    )
    return _save(graph, path)


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # type: ignore[arg-type]
    model.ir_version = 9
    onnx.save(model, str(path))
    return path
