"""A tuning run end to end: data, candidates, guard, batch search, registry, report, records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from monitor import schema
from monitor.registry import VersionInfo, champion
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tuner import registry
from tuner.data import TuningData, dataset_file, production_data

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TuningOutcome:
    """What ``tunewatch tune`` reports: the run, the whole leaderboard and the winner."""

    run_id: int
    model: str
    base_version: str
    result: Any
    winner: VersionInfo | None
    report: str
    plot: str
    data_source: str
    speedup: float | None

    def to_dict(self) -> dict[str, Any]:
        """The stable ``--json`` form."""
        r = self.result
        winner = None
        w = serving_winner(r)
        if self.winner is not None and w is not None:
            winner = {
                "version": self.winner.version, "artifact": self.winner.artifact_path,
                "sha256": self.winner.sha256, "name": w.name, "config": self.winner.config,
                "throughput": w.throughput, "latency_p50_ms": w.latency_p50_ms,
                "latency_p95_ms": w.latency_p95_ms, "accuracy": w.accuracy,
                "batch_size": w.best_batch_size,
            }  # fmt: skip
        return {
            "run_id": self.run_id, "model": self.model, "base_version": self.base_version,
            "objective": r.objective, "slo_ms": r.slo_ms, "data": self.data_source,
            "leaderboard": [t.to_dict() for t in r.leaderboard], "winner": winner,
            "skipped": [s.to_dict() for s in r.skipped], "speedup": self.speedup,
            "report": self.report, "plot": self.plot, "elapsed_s": r.elapsed_s,
        }  # fmt: skip


def run_tuning(
    db: Database,
    settings: Settings,
    model: str,
    *,
    slo_ms: float = 50.0,
    objective: str = "throughput",
    dataset: str | None = None,
    data: TuningData | None = None,
    torch_module: Any = None,
    space: Any = None,
    tolerance: Any = None,
    measure: Any = None,
    quick: bool = False,
    window: timedelta = timedelta(days=7),
    progress: Progress | None = None,
    retune_request_id: int | None = None,
) -> TuningOutcome:
    """Tune ``model``'s champion on production samples (or ``dataset``); register the winner.

    Raises:
        NotEnoughSamples: too few stored samples (the message says how many are needed).
        ArtifactError: the champion's artifact fails its sha256 check.
    """
    from tuner.engine import tune
    from tuner.onnx_tools import describe_inputs

    base = champion(db, model)
    path = registry.verified_artifact(base)
    inputs = describe_inputs(path)
    if data is None:
        data = (
            dataset_file(dataset, inputs) if dataset
            else production_data(db, model, base.version, inputs, window=window)
        )  # fmt: skip
    run_id = _start_run(db, model, base.version, slo_ms, objective, retune_request_id)
    workdir = Path(settings.artifacts_dir).resolve() / model / "tuning" / f"run-{run_id}"
    try:
        kwargs: dict[str, Any] = quick_options() if quick else {}
        for name, value in (("space", space), ("tolerance", tolerance), ("measure", measure)):
            if value is not None:
                kwargs[name] = value
        result = tune(
            path, calibration=data.calibration, holdout=data.holdout, labels=data.labels,
            slo_ms=slo_ms, objective=objective,  # type: ignore[arg-type]
            workdir=workdir, torch_module=torch_module or _torch_module(base),
            progress=progress, **kwargs,
        )  # fmt: skip
    except Exception as exc:
        _fail_run(db, run_id, exc)
        raise
    return _finish(db, settings, run_id, base, result, workdir, data.source)


def quick_options() -> dict[str, Any]:
    """A small search for demos and smoke runs: one variant of each kind, one thread."""
    from tuner.batch_search import MeasureConfig
    from tuner.candidates import SearchSpace

    space = SearchSpace(
        dynamic_per_channel=(True,), dynamic_op_types=("all",), static_methods=("MinMax",),
        static_activation_types=("QUInt8",), static_op_types=("all",), prune_amounts=(),
        threads=(1,), spinning=(False,), max_batch_size=64,
    )  # fmt: skip
    measure = MeasureConfig(warmup_runs=1, window_runs=3, min_window_s=0.01, max_windows=4)
    return {"space": space, "measure": measure}


def _torch_module(base: VersionInfo) -> Any:
    """Rebuild a torch model registered from torch when its class is importable."""
    ref = base.config.get("torch_class")
    if not ref:
        return None
    import importlib

    module_name, _, qualname = str(ref).partition(":")
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        module = cls()
        module.load_state_dict(registry.load_torch_weights(base))
        return module.eval()
    except Exception:  # the class needs arguments or is not importable here: skip torch variants
        return None


def _start_run(
    db: Database, model: str, version: str, slo_ms: float, objective: str, request: int | None
) -> int:
    with db.session() as s:
        run = schema.TuningRun(
            model=model, base_version=version, status="running", slo_ms=slo_ms,
            objective=objective, started_at=utcnow(), retune_request_id=request, summary={},
        )  # fmt: skip
        s.add(run)
        s.flush()
        return run.id


def _fail_run(db: Database, run_id: int, exc: Exception) -> None:
    with db.session() as s:
        run = s.get(schema.TuningRun, run_id)
        if run is not None:
            run.status, run.finished_at, run.error = "failed", utcnow(), repr(exc)


def _finish(
    db: Database, settings: Settings, run_id: int, base: VersionInfo, result: Any,
    workdir: Path, source: str,
) -> TuningOutcome:  # fmt: skip
    from tuner.report import write_report

    paths = write_report(result, workdir, title=f"Tuning run {run_id}: {base.model}")
    report, plot = paths.markdown, paths.plot
    baseline = next((t for t in result.leaderboard if t.name == "ort-fp32"), None)
    winner_info = _register_winner(db, settings, run_id, base, result)
    w = serving_winner(result)
    base_tp, win_tp, speedup = speedup_over(baseline, w)
    with db.session() as s:
        run = s.get(schema.TuningRun, run_id)
        assert run is not None
        run.status, run.finished_at = "done", utcnow()
        run.winner_version = winner_info.version if winner_info else None
        run.baseline_throughput, run.winner_throughput = base_tp, win_tp
        run.speedup, run.report_path, run.plot_path = speedup, str(report), str(plot)
        run.summary = {"data": source, "elapsed_s": result.elapsed_s, "mode": result.mode,
                       "skipped": [x.to_dict() for x in result.skipped]}  # fmt: skip
        for t in result.leaderboard:
            s.add(_trial_row(run_id, t, w))
    if winner_info is not None:
        _maybe_start_experiment(db, settings, winner_info)
    return TuningOutcome(run_id, base.model, base.version, result, winner_info, str(report),
                         str(plot), source, speedup)  # fmt: skip


def _maybe_start_experiment(db: Database, settings: Settings, winner: VersionInfo) -> None:
    """Start an experiment with the winner when the model's policy says so."""
    from tuner import experiments
    from tuner.errors import TunerError

    rules = registry.policy(db, winner.model)
    if not rules.get("auto_experiment"):
        return
    try:
        experiments.start(
            db, winner.model, winner.version, share=float(rules.get("share", 0.1)),
            shadow=bool(rules.get("shadow", False)), by="policy:auto-experiment",
            min_samples=settings.experiment_min_samples,
            max_duration_s=settings.experiment_max_duration_s,
        )  # fmt: skip
    except TunerError as exc:  # e.g. an experiment is already live: the winner waits
        import logging

        logging.getLogger("tunewatch.tuning").warning(
            "not starting an experiment with %s:%s: %s", winner.model, winner.version, exc
        )


def _trial_row(run_id: int, t: Any, winner: Any) -> schema.TuningTrial:
    return schema.TuningTrial(
        run_id=run_id, name=t.name, config=t.config, artifact_path=t.artifact,
        batch_size=t.best_batch_size, p50_ms=t.latency_p50_ms, p95_ms=t.latency_p95_ms,
        throughput=t.throughput, accuracy=dict(t.accuracy), passed=t.passed, reason=t.reason,
        curve={"points": [p.to_dict() for p in t.curve]},
        is_winner=winner is not None and t.name == winner.name,
    )  # fmt: skip


def speedup_over(baseline: Any, winner: Any) -> tuple[float | None, float | None, float | None]:
    """(baseline items/s, winner items/s, ratio) measured alike: both at the screening batch
    size with one thread (every candidate is screened), else both at their best batch size."""
    if baseline is None or winner is None:
        return None, None, None
    a, b = baseline.screen, winner.screen
    if a is not None and b is not None and a.throughput and b.throughput:
        return a.throughput, b.throughput, round(b.throughput / a.throughput, 3)
    if baseline.throughput and winner.throughput:
        ratio = round(winner.throughput / baseline.throughput, 3)
        return baseline.throughput, winner.throughput, ratio
    return None, None, None


def serving_winner(result: Any) -> Any:
    """The best passing trial that ONNX Runtime serves (deployments run ONNX artifacts)."""
    if result.winner is None:
        return None
    if result.winner.config.get("runtime_engine", "onnxruntime") == "onnxruntime":
        return result.winner
    return next(
        (t for t in result.leaderboard if t.passed and t.artifact and t.throughput
         and t.config.get("runtime_engine", "onnxruntime") == "onnxruntime"),
        None,
    )  # fmt: skip


def serving_defaults(trial: Any, slo_ms: float) -> dict[str, Any]:
    """Dynamic-batching settings a deployment of ``trial`` uses unless told otherwise.

    ``max_delay_ms``: a batch may wait to fill for as long as its own run takes, and never so
    long that waiting plus the measured p95 of a full batch exceeds the SLO. ``batch_workers``:
    as many concurrent batches as the tuned intra-op threads leave cores for.
    """
    from tuner.onnx_tools import cpu_count

    threads = int(trial.config.get("runtime", {}).get("threads", 1) or 1)
    out: dict[str, Any] = {"batch_workers": max(1, cpu_count() // threads)}
    point = next((p for p in trial.curve if p.batch_size == trial.best_batch_size), None)
    if point is not None and trial.best_batch_size > 1:
        out["max_delay_ms"] = round(max(0.0, min(point.p95_ms, slo_ms - point.p95_ms)), 3)
    return out


def _register_winner(
    db: Database, settings: Settings, run_id: int, base: VersionInfo, result: Any
) -> VersionInfo | None:
    w = serving_winner(result)
    if w is None:
        return None
    version = f"{base.version}-t{run_id}"
    metrics = {"throughput": w.throughput, "latency_p50_ms": w.latency_p50_ms,
               "latency_p95_ms": w.latency_p95_ms, "accuracy": w.accuracy,
               "tuning_run": run_id}  # fmt: skip
    config = {**w.config, **serving_defaults(w, result.slo_ms), "candidate": w.name,
              "tuning_run": run_id}  # fmt: skip
    return registry.register(
        base.model,
        Path(w.artifact),
        version=version,
        parent_version=base.version,
        config=config,
        metrics=metrics,
        status="candidate",
        db=db,
        settings=settings,
    )
