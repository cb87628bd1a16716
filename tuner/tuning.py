"""A tuning run end to end: data, candidates, guard, batch search, registry, report, records.

Candidates are always built from the model's source (the version a user registered) and judged
against the source's outputs on fresh production rows. The serving champion enters as the
``incumbent``; a winner is registered only when it beats the incumbent's objective by
``min_gain`` or the incumbent no longer passes the guard. Otherwise the run's outcome is
``no_change`` with the reason in words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from monitor import schema
from monitor.registry import VersionInfo, champion, source_of
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tuner import registry
from tuner.data import TuningData, dataset_file, production_data, request_since

Progress = Callable[[str, int, int], None]
# A winner must beat the incumbent's objective by this fraction to be worth an experiment.
MIN_GAIN = 0.05
# Interleaved rounds of the winner against the incumbent before a gain is believed.
HEAD_TO_HEAD_ROUNDS = 5
REGISTERED, NO_CHANGE = "registered", "no_change"


@dataclass(frozen=True)
class TuningOutcome:
    """What ``tunewatch tune`` reports: the run, the whole leaderboard, the winner, the outcome.

    ``outcome`` is ``registered`` (``winner`` is the new candidate version) or ``no_change``
    (``winner`` is None; ``reason`` says why). ``base_version`` is the source candidates were
    built from; ``incumbent`` describes the champion measured in the same run.
    """

    run_id: int
    model: str
    base_version: str
    result: Any
    winner: VersionInfo | None
    report: str
    plot: str
    data_source: str
    speedup: float | None
    outcome: str = REGISTERED
    reason: str = ""
    incumbent: dict[str, Any] | None = None
    data_windows: tuple[dict[str, Any], ...] = ()

    @property
    def source_version(self) -> str:
        """The registered version every candidate was built from."""
        return self.base_version

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
            "source_version": self.source_version, "outcome": self.outcome,
            "reason": self.reason, "incumbent": self.incumbent,
            "objective": r.objective, "slo_ms": r.slo_ms, "data": self.data_source,
            "data_windows": list(self.data_windows),
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
    since: datetime | None = None,
    progress: Progress | None = None,
    retune_request_id: int | None = None,
    min_gain: float = MIN_GAIN,
    serving_clients: int | None = None,
) -> TuningOutcome:
    """Rebuild ``model``'s fast variants from its source; register a winner that beats the champion.

    Rows come from production samples of every version of the source (or ``dataset``): from
    ``since`` onward when given, else from the event behind ``retune_request_id``'s window
    onward, else the last ``window``.

    Raises:
        NotEnoughSamples: too few stored samples (the message says how many are needed).
        ArtifactError: the source's or the champion's artifact fails its sha256 check.
        TunerError: ``min_gain`` is negative.
    """
    import onnxruntime as ort

    from tuner.engine import Incumbent, incumbent_options, tune
    from tuner.errors import TunerError
    from tuner.onnx_tools import describe_inputs

    if min_gain < 0:
        raise TunerError(f"min_gain={min_gain} must be 0 or more (0.05 = 5 % faster)")
    current = champion(db, model)
    source = source_of(db, current)
    # What was hashed is what gets loaded: the run works on copies of the verified bytes.
    source_bytes = registry.verified_bytes(source)
    incumbent_bytes = registry.verified_bytes(current)
    inputs = describe_inputs(ort.InferenceSession(source_bytes, providers=["CPUExecutionProvider"]))
    if since is None and retune_request_id is not None:
        since = request_since(db, retune_request_id)
    if data is None:
        data = (
            dataset_file(dataset, inputs) if dataset
            else production_data(db, model, current.version, inputs, window=window, since=since)
        )  # fmt: skip
    run_id = _start_run(db, model, source.version, slo_ms, objective, retune_request_id)
    workdir = Path(settings.artifacts_dir).resolve() / model / "tuning" / f"run-{run_id}"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "source.onnx"
    path.write_bytes(source_bytes)
    (workdir / "incumbent.onnx").write_bytes(incumbent_bytes)
    incumbent = Incumbent(current.version, workdir / "incumbent.onnx",
                          incumbent_options(current.config),
                          current.config.get("trim_padding"))  # fmt: skip
    try:
        kwargs: dict[str, Any] = quick_options() if quick else {}
        tolerance = tolerance if tolerance is not None else registry.tolerance(db, model)
        # serving_clients: the winner's serving configuration is searched under that many
        # concurrent callers and registered in its config (serving_defaults).
        for name, value in (("space", space), ("tolerance", tolerance), ("measure", measure),
                            ("serving_clients", serving_clients)):  # fmt: skip
            if value is not None:
                kwargs[name] = value
        result = tune(
            path, calibration=data.calibration, holdout=data.holdout, labels=data.labels,
            slo_ms=slo_ms, objective=objective,  # type: ignore[arg-type]
            workdir=workdir, torch_module=torch_module or _torch_module(source),
            progress=progress, incumbent=incumbent, **kwargs,
        )  # fmt: skip
    except Exception as exc:
        _fail_run(db, run_id, exc)
        raise
    from tuner.onnx_tools import as_feeds

    holdout = as_feeds(data.holdout, inputs)
    run = _Run(run_id, source, current, data, min_gain, holdout, kwargs.get("measure"))
    return _finish(db, settings, run, result, workdir)


@dataclass(frozen=True)
class _Run:
    """What a finished search is judged and recorded with."""

    run_id: int
    source: VersionInfo
    incumbent: VersionInfo
    data: TuningData
    min_gain: float
    holdout: Any  # the held-out rows as the model's feeds
    measure: Any  # the search's MeasureConfig (None: the defaults)


def judge(
    winner: Any, incumbent: Any, objective: str, min_gain: float,
    ratios: Sequence[float] = (),
) -> tuple[str, str]:  # fmt: skip
    """Return (outcome, reason): does ``winner`` replace the ``incumbent`` trial?

    A winner is registered when it beats the incumbent's objective by ``min_gain`` (throughput,
    or the inverse of p95 latency), or when the incumbent fails the guard on today's data and
    the winner passes it. ``ratios`` from :func:`head_to_head`, when given, decide the gain by
    their median instead of the two trials' single figures.
    """
    if winner is None:
        return NO_CHANGE, "no candidate passed the guard and the SLO"
    if incumbent is None:
        return REGISTERED, f"{winner.name} passed the guard (no incumbent measured)"
    if not incumbent.passed:
        parts = incumbent.reason.split("; ")
        guard_passed = parts[0].startswith("guard passed")
        why = parts[-1] if guard_passed and incumbent.best_batch_size is None else parts[0]
        return REGISTERED, (
            f"the incumbent fails on today's data ({why}) and {winner.name} passes the guard"
        )
    ratio = float(np.median(ratios)) if len(ratios) else _gain(winner, incumbent, objective)
    what = "throughput" if objective == "throughput" else "speed (1 / p95 latency at batch 1)"
    if ratio is None:
        return NO_CHANGE, f"the incumbent's {what} could not be compared with {winner.name}'s"
    verdict = f"best candidate {winner.name} is x{ratio:.2f} the incumbent's {what}"
    rounds = (f" (median of {len(ratios)} interleaved rounds: x{min(ratios):.2f} to "
              f"x{max(ratios):.2f})" if len(ratios) else "")  # fmt: skip
    if ratio >= 1 + min_gain - 1e-9:
        return REGISTERED, f"{verdict} (needs x{1 + min_gain:.2f}){rounds}"
    return NO_CHANGE, f"{verdict}; needs x{1 + min_gain:.2f}{rounds}"


def head_to_head(
    winner: Any, incumbent: Any, holdout: Any, objective: str, *,
    rounds: int = HEAD_TO_HEAD_ROUNDS, config: Any = None,
) -> list[float]:  # fmt: skip
    """Measure the winner and the incumbent in turn; return the winner's ratio per round.

    Each trial's figure comes from its own stage of the search, minutes apart: on a busy
    machine two such figures of one and the same model differed by 8 %, enough to pass a 5 %
    gain. Adjacent measurements share the machine's state, so their ratio is the evidence
    (higher is better: the throughput ratio, or for latency the smaller of the incumbent's p95
    and p50 over the winner's at batch 1).
    """
    from tuner.batch_search import MeasureConfig, measure_batch
    from tuner.engine import trial_runner
    from tuner.onnx_tools import make_batch

    config = config or MeasureConfig()
    runs = []
    for trial in (winner, incumbent):
        runner = trial_runner(trial)
        batch = 1 if objective == "latency" else int(trial.best_batch_size or 1)
        feeds = make_batch(holdout, batch)
        runs.append((lambda _b, r=runner, f=feeds: r.run(f), batch))
    ratios = []
    for i in range(rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        points = {k: measure_batch(runs[k][0], runs[k][1], config) for k in order}
        w, inc = points[0], points[1]
        if objective == "throughput":
            ratios.append(w.throughput / inc.throughput)
        else:  # faster in the typical call too: a p95 alone swings with the neighbours' load
            ratios.append(min(inc.p95_ms / w.p95_ms, inc.p50_ms / w.p50_ms))
    return ratios


def _gain(winner: Any, incumbent: Any, objective: str) -> float | None:
    """The winner's objective as a multiple of the incumbent's (higher is better)."""
    if objective == "throughput":
        a, b = incumbent.throughput, winner.throughput
    else:
        a, b = winner.latency_p95_ms, incumbent.latency_p95_ms
    if not a or not b:
        return None
    return float(b) / float(a)


def objective_value(trial: Any, objective: str) -> float | None:
    """A trial's figure for the objective: items/s, or p95 ms at batch 1."""
    return trial.throughput if objective == "throughput" else trial.latency_p95_ms


def incumbent_summary(trial: Any, version: str, objective: str) -> dict[str, Any]:
    """The incumbent as ``tune --json`` reports it: fidelity on today's data and its speed."""
    return {
        "version": version, "fidelity": dict(trial.accuracy) if trial else {},
        "passed": bool(trial.passed) if trial else False,
        "reason": trial.reason if trial else "not measured",
        "throughput": trial.throughput if trial else None,
        "latency_p50_ms": trial.latency_p50_ms if trial else None,
        "latency_p95_ms": trial.latency_p95_ms if trial else None,
        "batch_size": trial.best_batch_size if trial else None,
        "objective": objective_value(trial, objective) if trial else None,
    }  # fmt: skip


def quick_options() -> dict[str, Any]:
    """A small search for demos and smoke runs: one variant of each kind, one thread."""
    from tuner.batch_search import MeasureConfig
    from tuner.candidates import SearchSpace

    space = SearchSpace(
        dynamic_per_channel=(True,), dynamic_op_types=("all",), dynamic_smooth=(False,),
        static_methods=("MinMax",),
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


def _finish(db: Database, settings: Settings, r: _Run, result: Any, workdir: Path) -> TuningOutcome:
    from tuner.report import RunContext, write_report

    w = serving_winner(result)
    inc = result.incumbent
    ratios: list[float] = []
    if w is not None and inc is not None and inc.passed and _gain(w, inc, result.objective):
        ratios = head_to_head(w, inc, r.holdout, result.objective, config=r.measure)
    outcome, reason = judge(w, inc, result.objective, r.min_gain, ratios)
    incumbent = incumbent_summary(result.incumbent, r.incumbent.version, result.objective)
    context = RunContext(outcome, reason, r.source.version, incumbent, r.data.source,
                         r.data.windows)  # fmt: skip
    paths = write_report(
        result, workdir, title=f"Tuning run {r.run_id}: {r.source.model}", context=context
    )
    report, plot = paths.markdown, paths.plot
    baseline = next((t for t in result.leaderboard if t.name == "ort-fp32"), None)
    winner_info = (
        _register_winner(db, settings, r.run_id, r.source, result) if outcome == REGISTERED
        else None
    )  # fmt: skip
    base_tp, win_tp, speedup = speedup_over(baseline, w)
    with db.session() as s:
        run = s.get(schema.TuningRun, r.run_id)
        assert run is not None
        run.status, run.finished_at, run.outcome = "done", utcnow(), outcome
        run.winner_version = winner_info.version if winner_info else None
        run.baseline_throughput, run.winner_throughput = base_tp, win_tp
        run.speedup, run.report_path, run.plot_path = speedup, str(report), str(plot)
        labelled = len(r.data.labels) if r.data.labels is not None else 0
        run.summary = {"data": r.data.source, "data_windows": list(r.data.windows),
                       "labelled_holdout_rows": labelled,
                       "elapsed_s": result.elapsed_s, "mode": result.mode,
                       "outcome": outcome, "reason": reason, "incumbent": incumbent,
                       "source_version": r.source.version,
                       "skipped": [x.to_dict() for x in result.skipped]}  # fmt: skip
        for t in result.leaderboard:
            s.add(_trial_row(r.run_id, t, w if winner_info else None))
    if winner_info is not None:
        _maybe_start_experiment(db, settings, winner_info)
    return TuningOutcome(r.run_id, r.source.model, r.source.version, result, winner_info,
                         str(report), str(plot), r.data.source, speedup, outcome, reason,
                         incumbent, r.data.windows)  # fmt: skip


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
         and t.config.get("kind") != "incumbent"
         and t.config.get("runtime_engine", "onnxruntime") == "onnxruntime"),
        None,
    )  # fmt: skip


def serving_defaults(trial: Any, slo_ms: float) -> dict[str, Any]:
    """Dynamic-batching settings a deployment of ``trial`` uses unless told otherwise.

    ``max_delay_ms``: a batch may wait to fill for as long as its own run takes, and never so
    long that waiting plus the measured p95 of a full batch exceeds the SLO. ``batch_workers``:
    as many concurrent batches as the tuned intra-op threads leave cores for. A configuration
    searched under load (``serving``) is carried as measured, ``trim_group_rows`` included.
    """
    from tuner.onnx_tools import cpu_count

    serving = trial.config.get("serving")
    if serving:  # measured under concurrent load: tune(serving_clients=...)
        runtime = {**trial.config.get("runtime", {}), **serving["runtime"]}
        keys = ("batch_size", "max_delay_ms", "batch_workers")
        measured: dict[str, Any] = {"runtime": runtime, **{k: serving[k] for k in keys}}
        if "trim_group_rows" in serving:  # searched only for a model with an attention mask
            measured["trim_group_rows"] = serving["trim_group_rows"]
        return measured
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
