"""The search space and the builders of fast variants (quantized, pruned, fp16) of one model.

Every builder writes one artifact file and returns a :class:`BuiltCandidate`; none claims to be
faster: the engine measures each one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from monitor.batching import LengthGroups
from tuner.errors import ArtifactError, TunerError
from tuner.onnx_tools import (
    CPU,
    CUDA,
    TENSORRT,
    Feeds,
    InputSpec,
    RuntimeOptions,
    cpu_count,
    export_onnx,
    iter_chunks,
    load_session,
    take_rows,
)

if TYPE_CHECKING:
    import onnx
    import torch

    from tuner.smoothing import Smoothing

# "incumbent" is the serving champion entered into a run as it is: measured, never built.
Kind = Literal["fp32", "dynamic", "fused", "static", "torch_dynamic", "pruned", "fp16", "incumbent"]
OP_TYPES = {"all": None, "matmul": ["MatMul"], "matmul_conv": ["MatMul", "Gemm", "Conv"]}
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
ACTIVATION_TYPES = ("QUInt8", "QInt8")
_SHORT_TYPES = {"QUInt8": "u8", "QInt8": "s8"}
PRUNING_NOTE = (
    "unstructured magnitude pruning only zeroes weights; dense kernels do not skip zeros, "
    "so any speed-up comes from the quantization that follows"
)


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Return True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without overflow)."""
    try:
        flags = set(cpuinfo.read_text(errors="ignore").split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni"})


@dataclass(frozen=True)
class CandidateSpec:
    """One variant to build: a name, its kind, its build parameters and its execution provider."""

    name: str
    kind: Kind
    params: dict[str, Any] = field(default_factory=dict)
    provider: str = CPU

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {"name": self.name, "kind": self.kind, "provider": self.provider, **self.params}


@dataclass(frozen=True)
class Skipped:
    """A candidate that was not built, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class BuiltCandidate:
    """A built artifact: its spec, file, runtime ("onnxruntime" or "torch"), notes, build time."""

    spec: CandidateSpec
    path: Path
    runtime: str = "onnxruntime"
    notes: str = ""
    build_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSpace:
    """What the tuner may try: quantization variants, pruning, GPU variants, runtime options.

    ``threads=None`` means 1..nproc. ``spinning`` only varies for sessions with more than one
    thread, because a single-threaded session has no pool to spin.

    >>> space = SearchSpace(static_methods=("MinMax",), static_activation_types=("QUInt8",),
    ...                     static_op_types=("all",), threads=(1, 2))
    >>> [o.label() for o in space.runtime_options()]
    ['t1', 't2', 't2-spin']
    """

    fp32: bool = True
    dynamic_per_channel: tuple[bool, ...] = (True, False)
    dynamic_op_types: tuple[str, ...] = ("all", "matmul")
    dynamic_preprocess: tuple[bool, ...] = (True, False)
    dynamic_smooth: tuple[bool, ...] = (False, True)
    fused_op_types: tuple[str, ...] = ("all", "matmul")
    static_methods: tuple[str, ...] = CALIBRATION_METHODS
    static_activation_types: tuple[str, ...] = ACTIVATION_TYPES
    static_op_types: tuple[str, ...] = ("all", "matmul_conv")
    torch_dynamic: bool = True
    prune_amounts: tuple[float, ...] = (0.3,)
    gpu: bool = True
    threads: tuple[int, ...] | None = None
    spinning: tuple[bool, ...] = (False, True)
    max_batch_size: int = 256

    def __post_init__(self) -> None:
        for method in self.static_methods:
            _check_choice("static method", method, CALIBRATION_METHODS)
        for act in self.static_activation_types:
            _check_choice("activation type", act, ACTIVATION_TYPES)
        for ops in (*self.static_op_types, *self.dynamic_op_types, *self.fused_op_types):
            _check_choice("op-type set", ops, tuple(OP_TYPES))
        if any(not 0 < a < 1 for a in self.prune_amounts):
            raise TunerError(f"prune_amounts={self.prune_amounts} must lie in (0, 1)")

    def runtime_options(self) -> list[RuntimeOptions]:
        """Return every CPU runtime option in the space (threads x spinning, deduplicated)."""
        threads = self.threads or tuple(range(1, cpu_count() + 1))
        options = []
        for t in threads:
            for spin in self.spinning if t > 1 else (False,):
                options.append(RuntimeOptions(threads=t, spinning=spin))
        return list(dict.fromkeys(options))

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in self.__dict__.items()
            if not k.startswith("_")
        }


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a TunerError naming the bad value and the allowed ones."""
    if value not in allowed:
        raise TunerError(f"{what} {value!r} is unknown; use one of {list(allowed)}")


def enumerate_candidates(
    space: SearchSpace,
    *,
    has_torch_module: bool,
    providers: Sequence[str] | None = None,
    vnni: bool | None = None,
    transformer: bool | None = None,
) -> tuple[list[CandidateSpec], list[Skipped]]:
    """Return the candidate specs of ``space`` and the ones skipped, each with its reason.

    ``transformer``: the graph has attention and layer norms (:func:`is_transformer_graph`),
    so ORT's transformer fusions apply and the fused-graph candidates are tried; False lists
    them as skipped; None (graph not known) leaves them out.
    """
    vnni = cpu_has_vnni() if vnni is None else vnni
    specs: list[CandidateSpec] = []
    if space.fp32:
        specs.append(CandidateSpec("ort-fp32", "fp32", {"graph_optimization": "extended"}))
    specs += _dynamic_specs(space, reduce_range=not vnni)
    fused = _fused_specs(space, reduce_range=not vnni)
    fused_skipped = []
    if transformer is None:
        fused = []
    elif not transformer:
        reason = "not a transformer graph (no Softmax and LayerNormalization): nothing to fuse"
        fused, fused_skipped = [], [Skipped(f.name, reason) for f in fused]
    specs += fused
    specs += _static_specs(space, reduce_range=not vnni)
    torch_specs, skipped = _torch_specs(space, has_torch_module, reduce_range=not vnni)
    gpu_specs, gpu_skipped = _gpu_specs(space, providers)
    return specs + torch_specs + gpu_specs, fused_skipped + skipped + gpu_skipped


def is_transformer_graph(model: Path) -> bool:
    """Return True when the ONNX graph has Softmax and LayerNormalization nodes (attention)."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}
    return {"Softmax", "LayerNormalization"} <= ops


def _fused_specs(space: SearchSpace, *, reduce_range: bool) -> list[CandidateSpec]:
    """Return dynamic int8 specs of ORT's transformer-fused graph (Attention, SkipLayerNorm).

    The fused graph runs attention, bias, GELU and residual layer norms as single kernels,
    which a model file quantized op by op does not.
    """
    return [
        CandidateSpec(
            "fused-dynamic-s8-pc" + ("-matmul" if ops != "all" else ""),
            "fused",
            {
                "weight_type": "QInt8",
                "per_channel": True,
                "reduce_range": reduce_range,
                "op_types": ops,
            },
        )  # fmt: skip
        for ops in space.fused_op_types
    ]


def _dynamic_specs(space: SearchSpace, *, reduce_range: bool) -> list[CandidateSpec]:
    """Return dynamic int8 specs: pre-processing on/off x op-type sets x per-channel on/off,
    and the per-channel ones again with their activations smoothed (``-sq``, see
    :mod:`tuner.smoothing`): per-tensor weights would take back the outliers smoothing moves.

    ``quant_pre_process`` is what ORT recommends before quantizing, but it is measured, not
    assumed: on all-MiniLM-L6-v2 here the dynamic int8 model built from the pre-processed graph
    ran about 18 % slower than the one built from the exported graph (``-raw``).
    """
    specs = []
    for smooth in space.dynamic_smooth:
        for pre in space.dynamic_preprocess:
            for ops in space.dynamic_op_types:
                for per_channel in space.dynamic_per_channel:
                    if smooth and not per_channel:
                        continue
                    name = (
                        "dynamic-s8"
                        + ("-pc" if per_channel else "")
                        + ("-matmul" if ops != "all" else "")
                        + ("" if pre else "-raw")
                        + ("-sq" if smooth else "")
                    )
                    params = {
                        "weight_type": "QInt8",
                        "per_channel": per_channel,
                        "reduce_range": reduce_range,
                        "op_types": ops,
                        "preprocess": pre,
                    }
                    if smooth:
                        params["smooth"] = True
                    specs.append(CandidateSpec(name, "dynamic", params))
    return specs


def _static_specs(space: SearchSpace, *, reduce_range: bool) -> list[CandidateSpec]:
    """Return static QDQ specs: calibration method x activation type x op-type set."""
    specs = []
    for method in space.static_methods:
        for act in space.static_activation_types:
            for ops in space.static_op_types:
                name = f"static-{method.lower()}-{_SHORT_TYPES[act]}-{ops}"
                params = {
                    "calibration": method,
                    "activation_type": act,
                    "weight_type": "QInt8",
                    "per_channel": True,
                    "reduce_range": reduce_range,
                    "op_types": ops,
                    "nodes_to_exclude": [],
                }
                specs.append(CandidateSpec(name, "static", params))
    return specs


def _torch_specs(
    space: SearchSpace, has_torch_module: bool, *, reduce_range: bool
) -> tuple[list[CandidateSpec], list[Skipped]]:
    """Return torch dynamic int8 and prune-then-quantize specs, or why they were skipped."""
    wanted = (["torch-dynamic-s8"] if space.torch_dynamic else []) + [
        f"pruned{round(a * 100)}-dynamic-s8-pc" for a in space.prune_amounts
    ]
    if not has_torch_module:
        reason = "no torch module given; pass torch_module= to build torch-based candidates"
        return [], [Skipped(name, reason) for name in wanted]
    specs = []
    if space.torch_dynamic:
        specs.append(CandidateSpec("torch-dynamic-s8", "torch_dynamic", {"modules": ["Linear"]}))
    for amount in space.prune_amounts:
        params = {"amount": amount, "per_channel": True, "reduce_range": reduce_range}
        specs.append(CandidateSpec(f"pruned{round(amount * 100)}-dynamic-s8-pc", "pruned", params))
    return specs, []


def _gpu_specs(
    space: SearchSpace, providers: Sequence[str] | None
) -> tuple[list[CandidateSpec], list[Skipped]]:
    """Return fp32/fp16 specs for the CUDA and TensorRT providers present, skip the rest."""
    if not space.gpu:
        return [], []
    if providers is None:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    specs, skipped = [], []
    kind: Kind
    for provider, prefix in ((CUDA, "cuda"), (TENSORRT, "tensorrt")):
        for kind in ("fp32", "fp16"):
            name = f"{prefix}-{kind}"
            if provider in providers:
                specs.append(CandidateSpec(name, kind, {"graph_optimization": "all"}, provider))
            else:
                reason = (
                    f"{provider} not in onnxruntime.get_available_providers() = {list(providers)}; "
                    "install onnxruntime-gpu on a machine with CUDA to try it"
                )
                skipped.append(Skipped(name, reason))
    return specs, skipped


class ArrayDataReader:
    """Calibration data reader over in-memory arrays, in batches.

    It satisfies ORT's ``CalibrationDataReader`` protocol (``get_next``, ``rewind``, ``len``,
    ``set_range``) without importing onnxruntime until quantization runs.

    >>> import numpy as np
    >>> reader = ArrayDataReader({"x": np.zeros((5, 2), np.float32)}, batch_size=2)
    >>> [batch["x"].shape[0] for batch in reader]
    [2, 2, 1]
    """

    def __init__(self, feeds: Mapping[str, np.ndarray], batch_size: int = 16) -> None:
        self._batches = iter_chunks(feeds, batch_size)
        self._next = 0
        self._end = len(self._batches)

    def get_next(self) -> Feeds | None:
        """Return the next batch, or None when all were read."""
        if self._next >= min(self._end, len(self._batches)):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._next, self._end = 0, len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read only batches ``start_index:end_index`` next (ORT's strided calibration)."""
        self._next, self._end = start_index, end_index

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Feeds]:
        while (batch := self.get_next()) is not None:
            yield batch


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the quantization tools' prints, log lines and deprecation warnings."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def preprocess(model: Path, out: Path) -> Path:
    """Run ``quant_pre_process`` (shape inference + optimization); retry without symbolic shapes.

    MiniLM-like graphs defeat symbolic shape inference, hence the fallback. ORT's symbolic shape
    inference saves ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file into the working
    directory, so it runs in a child process whose working directory is the run's: changing
    the directory of this process would move relative paths (a SQLite URL, say) under every
    other thread of a serving process.

    Raises:
        TunerError: pre-processing failed both ways (the child's last error line is quoted).
    """
    model, out = Path(model).resolve(), Path(out).resolve()
    done = subprocess.run(
        [sys.executable, "-c", _PREPROCESS, str(model), str(out)],
        cwd=out.parent, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TunerError(f"quant_pre_process of {str(model)!r} failed: {last}")
    return out


# Run in the child by preprocess(): argv = [model, out].
_PREPROCESS = """
import logging, sys, warnings
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
from onnxruntime.quantization import quant_pre_process
model, out = sys.argv[1], sys.argv[2]
try:
    quant_pre_process(model, out)
except Exception:  # symbolic shape inference raises assorted errors
    quant_pre_process(model, out, skip_symbolic_shape=True)
"""


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm with constant weights as MatMul (+ Add) in place; return how many.

    ORT's dynamic quantization handles MatMul but not Gemm, which the exporter emits for Linear.
    """
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if (
            node.op_type != "Gemm"
            or not plain
            or attrs.get("transA", 0)
            or node.input[1] not in inits
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        name = node.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], node.name))
        if has_bias:
            add = helper.make_node(
                "Add", [product, node.input[2]], [node.output[0]], node.name + "_bias"
            )
            nodes.append(add)
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def quantize_dynamic_model(
    model: Path,
    out: Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: str = "all",
    weight_type: str = "QInt8",
    nodes_to_exclude: Sequence[str] = (),
    extra_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write a dynamic int8 model (weights int8, activations quantized at run time).

    ``nodes_to_exclude`` stay in float (mixed precision); ``extra_options`` go to ORT's
    quantizer (a fused transformer graph needs ``DefaultTensorType``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(model))
    if gemm_to_matmul(proto):
        model = out.with_suffix(".matmul.onnx")
        onnx.save(proto, str(model))
    types = OP_TYPES[op_types]
    with quiet():
        quantize_dynamic(
            str(model),
            str(out),
            op_types_to_quantize=types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=getattr(QuantType, weight_type),
            nodes_to_exclude=list(nodes_to_exclude) or None,
            extra_options=dict(extra_options or {}),
        )
    return out


def fuse_transformer(model: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """Write ORT's transformer-fused graph of ``model``; return it and the fused-op counts.

    Python fusions only (``opt_level=0``): ORT's own offline optimizations would add ops the
    quantizer cannot handle. Heads and hidden size are detected from the graph.

    Raises:
        TunerError: nothing was fused (not a BERT-like graph).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet():
        fused = optimize_model(str(model), model_type="bert", opt_level=0)
        counts = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
        fused.save_model_to_file(str(out))
    kernels = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu",
               "FastGelu", "Gelu", "EmbedLayerNormalization"}  # fmt: skip
    if not kernels & set(counts):
        raise TunerError(f"ORT's transformer optimizer fused nothing in {model.name}: {counts}")
    return out, counts


def quantize_static_model(
    model: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    *,
    calibration_method: str = "MinMax",
    activation_type: str = "QUInt8",
    weight_type: str = "QInt8",
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: str = "all",
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Write a static QDQ int8 model calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quiet():
        quantize_static(
            str(model),
            str(out),
            ArrayDataReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=OP_TYPES[op_types],
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activation_type),
            weight_type=getattr(QuantType, weight_type),
            nodes_to_exclude=list(nodes_to_exclude) or None,
            calibrate_method=getattr(CalibrationMethod, calibration_method),
        )
    return out


def convert_fp16(model: Path, out: Path) -> Path:
    """Write an fp16 copy of ``model`` whose inputs and outputs stay fp32.

    onnx 1.23 ships no float16 converter and onnxconverter-common is not a dependency, so this
    uses the converter that ships inside onnxruntime.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with quiet():
        converted = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    # The converter appends its input casts last; sort so the file passes onnx.checker.
    OnnxModel.graph_topological_sort(converted.graph)
    onnx.save(converted, str(out))
    return out


def optimize_offline(model: Path, out: Path, level: str = "extended") -> Path:
    """Save ORT's graph-optimized version of ``model`` (fusions applied once, at build time)."""
    import onnxruntime as ort

    from tuner.onnx_tools import session_options

    so = session_options(RuntimeOptions(graph_optimization=level))
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), so, providers=[CPU])
    return out


def prune_module(module: torch.nn.Module, amount: float) -> tuple[torch.nn.Module, float]:
    """Return a copy with ``amount`` of each Linear/Conv weight zeroed by L1 magnitude, sparsity."""
    import torch
    from torch.nn.utils import prune

    pruned = copy.deepcopy(module).eval()
    zeros = total = 0
    for layer in pruned.modules():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d):
            prune.l1_unstructured(layer, "weight", amount=amount)
            prune.remove(layer, "weight")
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return pruned, zeros / max(total, 1)


def quantize_torch_dynamic(module: torch.nn.Module) -> torch.nn.Module:
    """Return a copy with Linear layers dynamically quantized to int8 by torch.ao."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still works
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(module).eval(), {torch.nn.Linear}, dtype=torch.qint8
        )


class BuildContext:
    """Everything builders share: base model, workdir, calibration data, torch module, names."""

    def __init__(
        self,
        base: Path,
        workdir: Path,
        calibration: Feeds,
        inputs: Sequence[InputSpec],
        outputs: Sequence[str],
        torch_module: torch.nn.Module | None = None,
        max_calibration_rows: int = 128,
    ) -> None:
        self.base = Path(base)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        rows = min(max_calibration_rows, len(next(iter(calibration.values()))))
        self.calibration = take_rows(calibration, slice(0, rows))
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.torch_module = torch_module
        self._preprocessed: Path | None = None
        self._fused: Path | None = None
        self.fused_counts: dict[str, int] = {}
        self._smoothed: dict[tuple[Any, ...], Smoothing] = {}

    @property
    def preprocessed(self) -> Path:
        """Return the base model after ``quant_pre_process``, built once."""
        if self._preprocessed is None:
            self._preprocessed = preprocess(self.base, self.workdir / "base.pre.onnx")
        return self._preprocessed

    @property
    def fused(self) -> Path:
        """Return ORT's transformer-fused base model, built once."""
        if self._fused is None:
            self._fused, self.fused_counts = fuse_transformer(
                self.base, self.workdir / "base.fused.onnx"
            )
        return self._fused

    def smoothed(self, params: Mapping[str, Any]) -> Smoothing:
        """Return the smoothed float graph for a dynamic spec's quantizer settings, built once.

        The alpha is chosen by the quantized model's error on the calibration rows; a
        mixed-precision retry of the same settings gets the same graph, so its node names
        and ranking hold.
        """
        from tuner.smoothing import choose_smoothing

        pre = bool(params.get("preprocess", True))
        keys = ("per_channel", "reduce_range", "op_types", "weight_type")
        key = (pre, *(params[k] for k in keys))
        if key not in self._smoothed:

            def quantize(source: Path, out: Path) -> Path:
                return quantize_dynamic_model(
                    source, out, per_channel=params["per_channel"],
                    reduce_range=params["reduce_range"], op_types=params["op_types"],
                    weight_type=params["weight_type"],
                )  # fmt: skip

            label = "-".join(str(k) for k in key).lower()
            self._smoothed[key] = choose_smoothing(
                self.preprocessed if pre else self.base,
                self.workdir / f"smooth-{label}",
                self.calibration,
                quantize,
            )
        return self._smoothed[key]

    def artifact(self, name: str, suffix: str = ".onnx") -> Path:
        """Return the path of a candidate's artifact."""
        return self.workdir / f"{name}{suffix}"

    def export(self, module: torch.nn.Module, path: Path) -> Path:
        """Export a torch module with the base model's input/output names and dynamic axes."""
        sample = take_rows(self.calibration, slice(0, 2))
        axes = {
            spec.name: {i: f"{spec.name}_{i}" for i, d in enumerate(spec.shape) if i and _sym(d)}
            for spec in self.inputs
        }
        return export_onnx(module, sample, path, output_names=self.outputs, dynamic_axes=axes)


def _sym(dim: int | str | None) -> bool:
    """Return True for a symbolic (dynamic) axis."""
    return not isinstance(dim, int)


def build_candidate(spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
    """Build the artifact of ``spec``; raise ArtifactError naming the candidate if it fails."""
    started = time.perf_counter()
    try:
        path, runtime, notes, extra = _BUILDERS[spec.kind](spec, ctx)
    except TunerError:
        raise
    except Exception as exc:  # quantizers and exporters raise many unrelated types
        raise ArtifactError(f"building {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
    return BuiltCandidate(spec, path, runtime, notes, time.perf_counter() - started, extra)


BuildOutput = tuple[Path, str, str, dict[str, Any]]


def _build_fp32(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """Offline-optimize the base model on CPU; copy it unchanged for GPU providers."""
    out = ctx.artifact(spec.name)
    if spec.provider == CPU:
        return (
            optimize_offline(ctx.base, out, spec.params["graph_optimization"]),
            "onnxruntime",
            "",
            {},
        )
    shutil.copyfile(ctx.base, out)
    return out, "onnxruntime", "", {}


def _build_dynamic(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """Dynamic int8 from the pre-processed, exported, smoothed or transformer-fused graph.

    The fused graph needs ``DefaultTensorType`` set: without it the quantizer stops, since the
    com.microsoft ops' outputs have no inferred type.
    """
    import onnx

    p = spec.params
    fused = spec.kind == "fused"
    out = quantize_dynamic_model(
        _per_token(spec, ctx, dynamic_source(spec, ctx)),
        ctx.artifact(spec.name),
        per_channel=p["per_channel"],
        reduce_range=p["reduce_range"],
        op_types=p["op_types"],
        weight_type=p["weight_type"],
        nodes_to_exclude=p.get("nodes_to_exclude", ()),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else None,
    )
    smooth = ctx.smoothed(p).note() if p.get("smooth") else ""
    counts = f"fused ops {ctx.fused_counts}" if fused else ""
    notes = "; ".join(filter(None, [smooth, _float_note(p), counts]))
    return out, "onnxruntime", notes, {}


def dynamic_source(spec: CandidateSpec, ctx: BuildContext) -> Path:
    """Return the float graph a dynamic or fused candidate is quantized from."""
    if spec.kind == "fused":
        return ctx.fused
    if spec.params.get("smooth"):
        return ctx.smoothed(spec.params).path
    return ctx.preprocessed if spec.params.get("preprocess", True) else ctx.base


def _per_token(spec: CandidateSpec, ctx: BuildContext, source: Path) -> Path:
    """Return ``source``, or its copy with per-row input scales on ``per_token_nodes``."""
    nodes = spec.params.get("per_token_nodes")
    if not nodes:
        return source
    from tuner.smoothing import per_token_graph

    out = ctx.artifact(spec.name, ".per-token.float.onnx")
    per_token_graph(source, out, nodes)
    return out


def _float_note(params: Mapping[str, Any]) -> str:
    """Say how many nodes a mixed-precision candidate keeps in float or scales per row."""
    excluded = params.get("nodes_to_exclude") or ()
    scaled = params.get("per_token_nodes") or ()
    notes = [f"{len(excluded)} most damaged nodes left in float"] if excluded else []
    notes += [f"per-row input scales on the {len(scaled)} most damaged MatMuls"] if scaled else []
    return "; ".join(notes)


def _build_static(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """Static QDQ int8 calibrated on the calibration samples."""
    p = spec.params
    out = quantize_static_model(
        ctx.preprocessed,
        ctx.artifact(spec.name),
        ctx.calibration,
        calibration_method=p["calibration"],
        activation_type=p["activation_type"],
        weight_type=p["weight_type"],
        per_channel=p["per_channel"],
        reduce_range=p["reduce_range"],
        op_types=p["op_types"],
        nodes_to_exclude=p.get("nodes_to_exclude", ()),
    )
    return out, "onnxruntime", "", {}


def _build_torch_dynamic(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """torch.ao dynamic int8 saved as TorchScript.

    torch 2.13 cannot export ``quantized::linear_dynamic`` to ONNX (neither exporter), so this
    candidate runs in torch.
    """
    import torch

    if ctx.torch_module is None:
        raise TunerError(f"{spec.name!r} needs a torch module; pass torch_module=")
    quantized = quantize_torch_dynamic(ctx.torch_module)
    sample = {k: torch.from_numpy(v) for k, v in take_rows(ctx.calibration, slice(0, 2)).items()}
    keywords = _use_keywords(ctx.torch_module, sample)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if keywords:
            traced = torch.jit.trace(quantized, example_kwarg_inputs=sample, strict=False)
        else:
            traced = torch.jit.trace(quantized, tuple(sample.values()), strict=False)
    out = ctx.artifact(spec.name, ".pt")
    torch.jit.save(traced, str(out))
    notes = "runs in torch: torch 2.13 cannot export dynamically quantized Linear to ONNX"
    return out, "torch", notes, {"keywords": keywords, "inputs": [s.name for s in ctx.inputs]}


def _use_keywords(module: torch.nn.Module, sample: Mapping[str, Any]) -> bool:
    """Return True when the input names are parameters of ``module.forward``."""
    import inspect

    return set(sample) <= set(inspect.signature(module.forward).parameters)


def _build_pruned(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """L1-prune Linear/Conv weights in torch, export, then dynamic-quantize per channel."""
    if ctx.torch_module is None:
        raise TunerError(f"{spec.name!r} needs a torch module; pass torch_module=")
    p = spec.params
    pruned, sparsity = prune_module(ctx.torch_module, p["amount"])
    fp32 = ctx.export(pruned, ctx.artifact(spec.name + ".fp32"))
    pre = preprocess(fp32, ctx.artifact(spec.name + ".pre"))
    out = quantize_dynamic_model(
        pre, ctx.artifact(spec.name), per_channel=p["per_channel"], reduce_range=p["reduce_range"]
    )
    return out, "onnxruntime", PRUNING_NOTE, {"weight_sparsity": round(sparsity, 4)}


def _build_fp16(spec: CandidateSpec, ctx: BuildContext) -> BuildOutput:
    """fp16 weights and compute with fp32 inputs/outputs, for GPU providers."""
    return convert_fp16(ctx.base, ctx.artifact(spec.name)), "onnxruntime", "", {}


_BUILDERS = {
    "fp32": _build_fp32,
    "dynamic": _build_dynamic,
    "fused": _build_dynamic,
    "static": _build_static,
    "torch_dynamic": _build_torch_dynamic,
    "pruned": _build_pruned,
    "fp16": _build_fp16,
}


class Runner(Protocol):
    """Something that runs a batch of feeds and returns the outputs as numpy arrays."""

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Run one batch."""
        ...


# Rows per length group when a batch with an attention mask is split by real length.
GROUP_ROWS = 8


class OrtRunner:
    """Runs an ONNX artifact in an ORT session.

    When ``trim`` names the attention mask, a batch of at least ``2 * GROUP_ROWS`` rows is
    sorted by real length and run in groups of ``GROUP_ROWS``, each trimmed to its longest row
    (:func:`tuner.onnx_tools.trim_padding`), and the outputs come back in the caller's order:
    the model computes the sentences' tokens, not the padding. Smaller batches are trimmed
    whole. With more than one thread the groups run at once, one single-threaded run per core
    (:class:`monitor.batching.LengthGroups`), as a deployment of the same config runs them.
    """

    def __init__(self, path: Path, options: RuntimeOptions, trim: str | None = None) -> None:
        self.trim = trim
        self.groups: LengthGroups | None = None
        if trim:
            self.groups = LengthGroups(
                lambda threads: load_session(path, replace(
                    options, threads=threads, spinning=options.spinning and threads > 1)),
                trim, GROUP_ROWS, options.threads,
            )  # fmt: skip
        else:
            self.session = load_session(path, options)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Run one batch."""
        if self.groups is not None:
            return self.groups(feeds)
        return [np.asarray(out) for out in self.session.run(None, feeds)]


class TorchRunner:
    """Runs a TorchScript artifact with a fixed number of intra-op threads."""

    def __init__(self, built: BuiltCandidate, options: RuntimeOptions) -> None:
        import torch

        # TorchScript archives hold tensors and TorchScript code, not arbitrary pickled objects.
        self.module = torch.jit.load(str(built.path)).eval()
        self.keywords = bool(built.extra.get("keywords"))
        self.threads = options.threads

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Run one batch."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.module(**tensors) if self.keywords else self.module(*tensors.values())
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.detach().numpy() for o in outs]


def open_runner(built: BuiltCandidate, options: RuntimeOptions) -> Runner:
    """Return a runner for ``built`` under ``options`` (the candidate's provider wins)."""
    if built.runtime == "torch":
        return TorchRunner(built, options)
    if built.spec.provider != CPU:
        options = RuntimeOptions(threads=options.threads, provider=built.spec.provider)
    return OrtRunner(built.path, options, built.extra.get("trim_padding"))
