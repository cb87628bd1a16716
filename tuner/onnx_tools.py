"""ONNX helpers for the tuner: export torch modules, open ORT sessions, inspect inputs, hash files.

torch and onnxruntime load on first use so that ``import tuner`` stays fast.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from monitor.batching import trim_padding  # noqa: F401 - re-exported for the tuner
from monitor.deploy import GRAPH_LEVELS
from monitor.deploy import session_options as runtime_session_options
from monitor.registry import file_sha256
from tuner.errors import ArtifactError, NotEnoughSamples, TunerError

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

Feeds = dict[str, np.ndarray]
Exporter = Literal["auto", "torchscript", "dynamo"]

GRAPH_OPTIMIZATION_LEVELS = tuple(GRAPH_LEVELS)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (symbolic axes as strings) and numpy dtype name."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class RuntimeOptions:
    """How a session runs: intra-op threads, spin-waiting, graph optimizations, provider.

    >>> RuntimeOptions(threads=2, spinning=True).label()
    't2-spin'
    """

    threads: int = 1
    spinning: bool = False
    graph_optimization: str = "all"
    provider: str = CPU

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise TunerError(f"threads={self.threads} is invalid; use 1 or more")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise TunerError(
                f"graph_optimization={self.graph_optimization!r} is unknown; "
                f"use one of {GRAPH_OPTIMIZATION_LEVELS}"
            )

    def label(self) -> str:
        """Return a short name such as ``t1`` or ``t2-spin`` (provider added when not CPU)."""
        name = f"t{self.threads}" + ("-spin" if self.spinning and self.threads > 1 else "")
        if self.provider != CPU:
            name += "-" + self.provider.removesuffix("ExecutionProvider").lower()
        return name

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)


def sha256_file(path: Path | str) -> str:
    """Return the hex sha256 of a file (:func:`monitor.registry.file_sha256`, streamed).

    Raises:
        ArtifactError: the file does not exist.
    """
    try:
        return file_sha256(path)
    except FileNotFoundError as exc:
        raise ArtifactError(f"artifact {str(path)!r} does not exist; rebuild it") from exc


def cpu_count() -> int:
    """Return the CPUs this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    """Build ORT SessionOptions from :class:`RuntimeOptions`: the same ones a deployment uses."""
    return cast("ort.SessionOptions", runtime_session_options(options.to_dict()))


def load_session(path: Path | str, options: RuntimeOptions | None = None) -> ort.InferenceSession:
    """Open an ORT InferenceSession on ``path`` with the given runtime options.

    Raises:
        ArtifactError: the file is missing or ORT cannot load it.
    """
    import onnxruntime as ort

    options = options or RuntimeOptions()
    if not Path(path).is_file():
        raise ArtifactError(f"ONNX model {str(path)!r} does not exist; export or rebuild it")
    available = ort.get_available_providers()
    if options.provider not in available:
        raise TunerError(
            f"provider {options.provider!r} is not available (have {available}); "
            "install the matching onnxruntime build or use CPUExecutionProvider"
        )
    providers = [options.provider] if options.provider == CPU else [options.provider, CPU]
    try:
        return ort.InferenceSession(str(path), session_options(options), providers=providers)
    except Exception as exc:  # ORT raises several private exception types
        raise ArtifactError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from exc


def describe_inputs(model: Path | str | ort.InferenceSession) -> list[InputSpec]:
    """Return the input names, shapes and numpy dtypes of a model file or session."""
    session = model if hasattr(model, "get_inputs") else load_session(model)
    specs = []
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise TunerError(f"input {arg.name!r} has unsupported type {arg.type}; use tensors")
        specs.append(InputSpec(arg.name, tuple(arg.shape), dtype))
    return specs


def output_names(model: Path | str | ort.InferenceSession) -> list[str]:
    """Return the output names of a model file or session."""
    session = model if hasattr(model, "get_outputs") else load_session(model)
    return [out.name for out in session.get_outputs()]


def as_feeds(data: Mapping[str, np.ndarray] | np.ndarray, specs: Sequence[InputSpec]) -> Feeds:
    """Turn user data (one array, or a dict by input name) into checked, typed feeds.

    Raises:
        TunerError: names do not match the model's inputs, or row counts differ.
    """
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            names = [s.name for s in specs]
            raise TunerError(f"model has inputs {names}; pass a dict keyed by those names")
        data = {specs[0].name: data}
    names = [s.name for s in specs]
    if set(data) != set(names):
        raise TunerError(f"inputs {sorted(data)} do not match the model's inputs {names}")
    feeds = {s.name: np.ascontiguousarray(data[s.name], dtype=s.dtype) for s in specs}
    rows = {name: arr.shape[0] if arr.ndim else 0 for name, arr in feeds.items()}
    if len(set(rows.values())) != 1:
        raise TunerError(f"inputs have different row counts {rows}; give each the same samples")
    return feeds


def exposing_session(model: Any, names: Sequence[str]) -> tuple[Any, list[str]]:
    """An unoptimized single-threaded session of ``model`` (an ``onnx.ModelProto``) that also
    outputs the graph tensors ``names``; returns it and the names it can output (graph inputs
    are not outputs: read them from the feeds)."""
    import onnx
    import onnxruntime as ort

    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in inputs]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, wanted


def num_rows(feeds: Mapping[str, np.ndarray]) -> int:
    """Return the number of samples (first axis) in a feeds dict."""
    return int(next(iter(feeds.values())).shape[0])


def take_rows(feeds: Mapping[str, np.ndarray], index: np.ndarray | slice) -> Feeds:
    """Return the same rows of every input."""
    return {name: np.ascontiguousarray(arr[index]) for name, arr in feeds.items()}


def make_batch(feeds: Mapping[str, np.ndarray], batch_size: int) -> Feeds:
    """Return ``batch_size`` rows, repeating the samples when there are fewer of them."""
    rows = num_rows(feeds)
    if rows == 0:
        raise NotEnoughSamples("no samples to build a batch from; pass at least one")
    return take_rows(feeds, np.arange(batch_size) % rows)


def iter_chunks(feeds: Mapping[str, np.ndarray], size: int) -> list[Feeds]:
    """Split feeds into consecutive chunks of at most ``size`` rows."""
    rows = num_rows(feeds)
    return [take_rows(feeds, slice(i, i + size)) for i in range(0, rows, size)]


def export_onnx(
    module: torch.nn.Module,
    sample_inputs: Mapping[str, np.ndarray | torch.Tensor],
    path: Path | str,
    *,
    output_names: Sequence[str] = ("output",),
    opset: int = 17,
    exporter: Exporter = "auto",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export ``module`` to one self-contained ONNX file with a dynamic batch axis.

    Inputs are named after the keys of ``sample_inputs``; when those names are parameters of
    ``module.forward`` they are passed as keywords (a MiniLM wrapper), else positionally in order
    (a CNN whose ``forward(x)`` is exported as ``input``). ``exporter="auto"`` uses the
    TorchScript exporter (fast, proven on CNNs and MiniLM here) and falls back to the dynamo
    exporter if it fails. ``dynamic_axes`` adds axes beyond the batch (e.g. sequence length).

    Raises:
        TunerError: every exporter failed; the message carries each error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs, names = _export_arguments(module, sample_inputs)
    axes = {name: {0: "batch", **dict((dynamic_axes or {}).get(name, {}))} for name in names}
    out_axes = {name: {0: "batch"} for name in output_names}
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",)}
    errors = []
    for kind in order.get(exporter, ("dynamo",)):
        try:
            export = _export_torchscript if kind == "torchscript" else _export_dynamo
            export(module, args, kwargs, path, names, list(output_names), axes, out_axes, opset)
            return path
        except Exception as exc:  # exporters raise many unrelated types
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")
    raise TunerError(f"cannot export {type(module).__name__} to ONNX; " + " | ".join(errors))


def _export_arguments(
    module: torch.nn.Module, sample_inputs: Mapping[str, np.ndarray | torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """Return positional args, keyword args and input names in the order the exporter sees."""
    import torch

    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in sample_inputs.items()}
    params = list(inspect.signature(module.forward).parameters)
    if set(tensors) <= set(params):
        # The exporter names inputs in signature order, so order the names the same way.
        names = [p for p in params if p in tensors]
        return (), {name: tensors[name] for name in names}, names
    names = list(tensors)
    return tuple(tensors[name] for name in names), {}, names


def _export_torchscript(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    out_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Export with the TorchScript-based exporter (``dynamo=False``)."""
    import torch

    export_args: tuple[Any, ...] = args + (kwargs,) if kwargs else args
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            export_args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={**axes, **out_axes},
            opset_version=opset,
            dynamo=False,
        )


def _export_dynamo(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]],
    out_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Export with the dynamo exporter, weights kept inside the one file."""
    import torch

    dims: dict[str, Any] = {}
    shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in ax.items()}
        for name, ax in axes.items()
    }
    dynamic_shapes: Any = shapes if kwargs else tuple(shapes[name] for name in input_names)
    # The dynamo exporter prints progress lines; keep the caller's stdout clean.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            kwargs=kwargs or None,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=max(opset, 18),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
