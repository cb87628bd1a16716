"""The physical limit of one core: peak MAC throughput (bench/peak/peak.c) and MACs per item.

``probe()`` compiles peak.c with gcc (once per bench run, into bench/out/peak) and runs it;
``graph_macs()`` counts the multiply-accumulates of one item from an ONNX graph's MatMul,
Gemm and Conv nodes after shape inference. Their ratio is the most items per second one core
can compute: a measured throughput above it means more than one core did the work.

    .venv/bin/python bench/peak/ceiling.py [model.onnx]
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
BUILD = HERE.parent / "out" / "peak"
FP32_KERNELS = ("fp32_fma_avx512", "fp32_fma_avx2")
INT8_KERNELS = ("int8_vnni_avx512", "int8_avx512bw", "int8_avx2")


def probe(seconds: float = 0.2) -> dict[str, dict[str, float]]:
    """Compile and run the peak probe; return GMAC/s per kernel (by wall and by CPU time).

    Raises:
        RuntimeError: gcc is missing or the probe failed (the message quotes its error).
    """
    BUILD.mkdir(parents=True, exist_ok=True)
    binary = BUILD / "peak"
    cc = subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(HERE / "peak.c")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if cc.returncode != 0:
        raise RuntimeError(f"gcc could not build bench/peak/peak.c: {cc.stderr.strip()[-300:]}")
    done = subprocess.run([str(binary), str(seconds)], capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def peaks(result: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Return the best fp32 and int8 GMAC/s of one core and the kernels that gave them.

    The CPU-time figure is used: on a shared machine wall time includes other processes' turns
    on the core, which says nothing about the core's limit.
    """
    out: dict[str, Any] = {}
    for kind, kernels in (("fp32", FP32_KERNELS), ("int8", INT8_KERNELS)):
        found = [(result[k]["gmacs_cpu"], k) for k in kernels if k in result]
        gmacs, kernel = max(found) if found else (float("nan"), "none")
        out[kind] = {"gmacs": gmacs, "kernel": kernel}
    return out


def graph_macs(model: Path | str, feeds: Mapping[str, np.ndarray]) -> float:
    """Return the MACs of one item (row) of ``feeds`` through the MatMul/Gemm/Conv nodes.

    Shapes come from ONNX shape inference with the inputs fixed to one row; a tensor it cannot
    resolve (reshapes of attention heads, say) is measured instead: the graph runs once in ORT,
    unoptimized, on that row with the tensor exposed as an output. Quantized graphs count the
    same way through MatMulInteger / ConvInteger / QLinearMatMul.
    """
    import onnx

    proto = onnx.load(str(model))
    one = {k: np.ascontiguousarray(np.asarray(v)[:1]) for k, v in feeds.items()}
    for inp in proto.graph.input:
        if inp.name in one:
            for dim, size in zip(inp.type.tensor_type.shape.dim, one[inp.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = _shapes(inferred)
    wanted = {
        name
        for node in inferred.graph.node
        if node.op_type in MATMULS or node.op_type in CONVS
        for name in (*node.input, *node.output)
        if name and name not in shapes
    }
    if wanted:
        shapes.update(_run_shapes(inferred, sorted(wanted), one))
    return float(sum(_node_macs(node, shapes) for node in inferred.graph.node))


def _run_shapes(
    model: Any, names: list[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Return the shapes of ``names`` by running the graph once in ORT, unoptimized."""
    from tuner.onnx_tools import exposing_session

    session, wanted = exposing_session(model, names)
    values = dict(zip(wanted, session.run(wanted, dict(feeds)), strict=True)) if wanted else {}
    values.update({n: feeds[n] for n in names if n not in wanted and n in feeds})
    return {n: tuple(np.asarray(v).shape) for n, v in values.items()}


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Return every tensor's static shape (initializers, inputs, inferred values)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


MATMULS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1)}
CONVS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def _node_macs(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> float:
    """Return one node's MACs (0 for ops that are not matrix products or convolutions)."""
    if node.op_type in MATMULS:
        a_i, b_i = MATMULS[node.op_type]
        a, b = _shape(node, a_i, shapes), _shape(node, b_i, shapes)
        if node.op_type == "Gemm":
            attrs = {x.name: x.i for x in node.attribute}
            m, k = (a[1], a[0]) if attrs.get("transA") else a
            n = b[0] if attrs.get("transB") else b[1]
            return float(m * k * n)
        a2, b2 = (1, *a) if len(a) == 1 else a, (*b, 1) if len(b) == 1 else b
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
        return float(np.prod(batch, dtype=np.float64) * a2[-2] * a2[-1] * b2[-1])
    if node.op_type in CONVS:
        w = _shape(node, CONVS[node.op_type], shapes)
        out = _shape_of(node.output[0], node, shapes)
        return float(np.prod(out, dtype=np.float64) * np.prod(w[1:], dtype=np.float64))
    return 0.0


def _shape(node: Any, index: int, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Return the static shape of a node's input."""
    return _shape_of(node.input[index], node, shapes)


def _shape_of(name: str, node: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Return a tensor's static shape or raise naming the node."""
    if name not in shapes:
        raise ValueError(f"shape of {name!r} (node {node.name!r}, {node.op_type}) is unknown")
    return shapes[name]


def ceiling_items_per_s(gmacs: float, macs_per_item: float, threads: int = 1) -> float:
    """Return the most items/s ``threads`` cores at ``gmacs`` each could compute."""
    return gmacs * 1e9 * threads / max(macs_per_item, 1.0)


def main() -> None:
    """Print the probe's result, and the ceilings of a model when one is given."""
    result = probe()
    print(json.dumps(result, indent=2))
    best = peaks(result)
    print(json.dumps(best))
    if len(sys.argv) > 1:
        import onnx

        proto = onnx.load(sys.argv[1])
        feeds = {}
        for inp in proto.graph.input:
            dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
            feeds[inp.name] = np.zeros(dims, np.int64)
        macs = graph_macs(sys.argv[1], feeds)
        print(f"{macs / 1e6:.1f} M MACs per item; ceilings per core: "
              f"fp32 {ceiling_items_per_s(best['fp32']['gmacs'], macs):.0f} items/s, "
              f"int8 {ceiling_items_per_s(best['int8']['gmacs'], macs):.0f} items/s")  # fmt: skip


if __name__ == "__main__":
    main()
