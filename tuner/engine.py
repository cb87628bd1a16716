"""Rebuild a model's fast variants, prove they are still right, and pick the fastest.

The smart search screens every variant at the batch size where the baseline peaks under the
SLO, at one thread and at the widest runtime (all threads, spinning), keeps the few fastest that
pass the accuracy guard, batch-searches those under the runtime that screened faster, tunes
threads and spinning for the leaders at their best batch size, and re-measures close
contenders before naming a winner. ``exhaustive=True`` instead runs the full batch search for
every guard-passing variant under every runtime option.

Every variant is built from the model's source (the version a user registered) and judged
against the source's outputs. The serving champion may enter as the ``incumbent``: guarded,
screened and batch-searched the same way under its own registered runtime options, never
rebuilt and never the winner, so the caller can ask whether the winner beats what serves now.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tuner.batch_search import (
    BatchSearchResult,
    CurvePoint,
    MeasureConfig,
    measure_batch,
    search_batch_size,
)
from tuner.candidates import (
    BuildContext,
    BuiltCandidate,
    CandidateSpec,
    Kind,
    OrtRunner,
    Runner,
    SearchSpace,
    Skipped,
    build_candidate,
    dynamic_source,
    enumerate_candidates,
    is_transformer_graph,
    open_runner,
)
from tuner.errors import ArtifactError, NotEnoughSamples, TunerError
from tuner.guard import AccuracyGuard, GuardResult, Task, Tolerance
from tuner.onnx_tools import (
    CPU,
    Feeds,
    InputSpec,
    RuntimeOptions,
    as_feeds,
    describe_inputs,
    iter_chunks,
    load_session,
    make_batch,
    num_rows,
    output_names,
    sha256_file,
)

if TYPE_CHECKING:
    import torch

Objective = Literal["throughput", "latency"]
Progress = Callable[[str, int, int], None]
Data = Mapping[str, np.ndarray] | np.ndarray
MIN_CALIBRATION_ROWS = 8
MIN_HOLDOUT_ROWS = 16
# Fractions of the most damaged nodes a failing static candidate may leave in float, per retry.
RETRY_FRACTIONS = (0.1, 0.3)
# A thread count must beat the previous one by this much to be worth its extra cores.
MIN_GAIN = 0.05
# Finalists within this fraction of the best are re-measured CONFIRM_ROUNDS more times.
CLOSE_MARGIN = 0.05
CONFIRM_ROUNDS = 2
# Finalists within this fraction of the best at one thread get their runtime options tuned.
LEADER_MARGIN = 0.10


@dataclass(frozen=True)
class Trial:
    """One candidate as measured: config, artifact, speed, accuracy, verdict and reason.

    ``passed`` means the guard passed and, when its batch search ran, a batch size met the SLO.
    Latencies are at batch 1; ``throughput`` is at ``best_batch_size`` under ``config["runtime"]``.
    """

    name: str
    config: dict[str, Any]
    artifact: str | None
    sha256: str | None
    passed: bool
    reason: str
    accuracy: dict[str, float] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput: float | None = None
    best_batch_size: int | None = None
    screen: CurvePoint | None = None
    curve: tuple[CurvePoint, ...] = ()
    stage: str = "screened"

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {
            "name": self.name,
            "config": self.config,
            "artifact": self.artifact,
            "sha256": self.sha256,
            "passed": self.passed,
            "reason": self.reason,
            "accuracy": dict(self.accuracy),
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "throughput": self.throughput,
            "best_batch_size": self.best_batch_size,
            "screen": self.screen.to_dict() if self.screen else None,
            "curve": [p.to_dict() for p in self.curve],
            "stage": self.stage,
        }


INCUMBENT = "incumbent"


@dataclass(frozen=True)
class Incumbent:
    """The serving champion as a contender: its version, verified artifact and runtime."""

    version: str
    path: Path
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    # The deployment trims padding for a version whose config says so: measured the same way.
    trim_padding: Any = None


def incumbent_options(config: Mapping[str, Any]) -> RuntimeOptions:
    """The runtime options a version serves under, from its registered ``runtime`` config.

    A version registered by a user has none: a deployment then runs ORT's default intra-op
    thread count (all cores) without spinning, so that is how it is measured.
    """
    from tuner.onnx_tools import cpu_count

    runtime = dict(config.get("runtime") or {})
    return RuntimeOptions(
        threads=int(runtime.get("threads") or 0) or cpu_count(),
        spinning=bool(runtime.get("spinning", False)),
        graph_optimization=str(runtime.get("graph_optimization", "all")),
        provider=str(runtime.get("provider") or CPU),
    )


@dataclass(frozen=True)
class TuneResult:
    """Every trial (best first), the winner, the skipped candidates and how the search ran.

    ``incumbent`` is the serving champion's trial when it entered the run (it is also on the
    leaderboard, and never the winner).
    """

    leaderboard: list[Trial]
    winner: Trial | None
    skipped: list[Skipped]
    objective: str
    slo_ms: float
    mode: str
    task: str
    elapsed_s: float
    measurements: int
    screen_batch_size: int | None
    incumbent: Trial | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {
            "incumbent": self.incumbent.to_dict() if self.incumbent else None,
            "leaderboard": [t.to_dict() for t in self.leaderboard],
            "winner": self.winner.name if self.winner else None,
            "skipped": [s.to_dict() for s in self.skipped],
            "objective": self.objective,
            "slo_ms": self.slo_ms,
            "mode": self.mode,
            "task": self.task,
            "elapsed_s": self.elapsed_s,
            "measurements": self.measurements,
            "screen_batch_size": self.screen_batch_size,
        }


@dataclass
class _Entry:
    """Working state of one candidate during the search."""

    spec: CandidateSpec
    built: BuiltCandidate | None = None
    sha256: str | None = None
    guard: GuardResult | None = None
    error: str = ""
    duplicate_of: str = ""
    screen: CurvePoint | None = None
    screen_wide: tuple[RuntimeOptions, CurvePoint] | None = None
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    probes: list[dict[str, Any]] = field(default_factory=list)
    search: BatchSearchResult | None = None
    confirm: list[CurvePoint] = field(default_factory=list)
    baseline_search: BatchSearchResult | None = None  # the search that set the screening batch
    stage: str = "built"
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.guard is not None and self.guard.passed and not self.error


def tune(
    base_onnx: Path,
    *,
    calibration: Data,
    holdout: Data,
    labels: np.ndarray | None = None,
    slo_ms: float,
    objective: Objective = "throughput",
    workdir: Path,
    torch_module: torch.nn.Module | None = None,
    tolerance: Tolerance = Tolerance(),
    space: SearchSpace = SearchSpace(),
    progress: Progress | None = None,
    exhaustive: bool = False,
    task: Task | None = None,
    measure: MeasureConfig = MeasureConfig(),
    finalists: int = 3,
    screen_batch_size: int | None = None,
    incumbent: Incumbent | None = None,
    serving_clients: int | None = None,
) -> TuneResult:
    """Build, guard and measure the variants of ``base_onnx``; return the leaderboard and winner.

    ``base_onnx`` is the source model and the guard's reference: every candidate's (and the
    ``incumbent``'s) outputs on ``holdout`` are compared with its outputs under ``tolerance``.
    ``objective="throughput"`` maximizes items/s with p95 <= ``slo_ms``; ``"latency"``
    minimizes p95 at batch 1. The smart search screens at
    ``screen_batch_size`` (halved until the baseline meets the SLO), or by default at the batch
    size the baseline's own batch search picks: variants can rank differently at batch 32 than
    at the batch size they will serve at. With ``serving_clients``, the winner's serving
    configuration (threads x batch workers x batch size x delay) is then searched under that
    many concurrent single-row callers (:func:`tuner.serving_search.search_serving`) and
    returned in its config under ``serving``.

    Raises:
        NotEnoughSamples: fewer than 8 calibration or 16 held-out rows.
        TunerError: bad objective, SLO or inputs that do not match the model.
    """
    if objective not in ("throughput", "latency"):
        raise TunerError(f"objective={objective!r} is unknown; use 'throughput' or 'latency'")
    if slo_ms <= 0:
        raise TunerError(f"slo_ms={slo_ms} must be positive (milliseconds of p95 latency)")
    settings = _Settings(
        slo_ms, objective, tolerance, space, task, measure, max(1, finalists), screen_batch_size
    )
    data = _Data(calibration, holdout, labels)
    search = _Search(Path(base_onnx), Path(workdir), data, settings, torch_module, progress)
    result = search.run(exhaustive, incumbent)
    if serving_clients and result.winner is not None:
        result = search.with_serving(result, serving_clients)
    return result


@dataclass(frozen=True)
class _Settings:
    """The knobs of one tuning run."""

    slo_ms: float
    objective: Objective
    tolerance: Tolerance
    space: SearchSpace
    task: Task | None
    measure: MeasureConfig
    finalists: int
    screen_batch_size: int | None


@dataclass(frozen=True)
class _Data:
    """The samples of one tuning run, as the caller gave them."""

    calibration: Data
    holdout: Data
    labels: np.ndarray | None


class _Search:
    """One tuning run: shared context, guard, counters and the two search strategies."""

    def __init__(
        self,
        base: Path,
        workdir: Path,
        data: _Data,
        settings: _Settings,
        torch_module: torch.nn.Module | None,
        progress: Progress | None,
    ) -> None:
        self.started = time.perf_counter()
        inputs = describe_inputs(base)
        calibration = as_feeds(data.calibration, inputs)
        self.holdout = _checked(as_feeds(data.holdout, inputs), "holdout", MIN_HOLDOUT_ROWS)
        self.ctx = BuildContext(
            base,
            workdir,
            _checked(calibration, "calibration", MIN_CALIBRATION_ROWS),
            inputs,
            output_names(base),
            torch_module,
        )
        self.slo_ms, self.objective, self.space = (
            settings.slo_ms,
            settings.objective,
            settings.space,
        )
        self.measure_config, self.finalists = settings.measure, settings.finalists
        self.fixed_screen_batch = settings.screen_batch_size is not None
        wanted = settings.screen_batch_size or 1
        self.screen_batch = max(1, min(wanted, self.space.max_batch_size))
        self.progress = progress or (lambda step, done, total: None)
        self.measurements = 0
        reference = _outputs(open_runner(_base_candidate(base), RuntimeOptions()), self.holdout)
        self.trim = _trim_mask(base, inputs, self.holdout, reference)
        self.guard = AccuracyGuard(
            reference, labels=data.labels, task=settings.task, tolerance=settings.tolerance
        )
        self.incumbent: _Entry | None = None

    def run(self, exhaustive: bool, incumbent: Incumbent | None = None) -> TuneResult:
        """Run the smart or the exhaustive strategy and assemble the result."""
        import onnxruntime as ort

        if incumbent is not None:
            self.incumbent = self._incumbent_entry(incumbent)

        specs, skipped = enumerate_candidates(
            self.space,
            has_torch_module=self.ctx.torch_module is not None,
            providers=ort.get_available_providers(),
            transformer=is_transformer_graph(self.ctx.base),
        )
        with _torch_threads_restored():
            entries = self._build_all(specs)
            if exhaustive:
                entries += self._retry_all(entries)
                self._exhaustive(entries)
                self._measure_incumbent()
            else:
                self._smart(entries)
        inc = self._trial(self.incumbent) if self.incumbent is not None else None
        trials = _leaderboard([self._trial(e) for e in entries] + ([inc] if inc else []),
                              self.objective)  # fmt: skip
        winner = next(
            (t for t in trials if t is not inc and _eligible(t, self.objective, self.slo_ms)), None
        )
        return TuneResult(
            leaderboard=trials,
            winner=winner,
            skipped=skipped,
            objective=self.objective,
            slo_ms=self.slo_ms,
            mode="exhaustive" if exhaustive else "smart",
            task=self.guard.task,
            elapsed_s=time.perf_counter() - self.started,
            measurements=self.measurements,
            screen_batch_size=None if exhaustive else self.screen_batch,
            incumbent=inc,
        )

    def with_serving(self, result: TuneResult, clients: int) -> TuneResult:
        """Search the winner's serving configuration under load; put it in its config."""
        from tuner.serving_search import search_serving

        w = result.winner
        assert w is not None and w.artifact is not None
        if w.config.get("runtime_engine", "onnxruntime") != "onnxruntime":
            return result  # a deployment serves ONNX artifacts only
        found = search_serving(
            w.artifact, self.holdout, slo_ms=self.slo_ms, mask=self.trim, clients=clients,
            graph_optimization=w.config["runtime"].get("graph_optimization", "all"),
            progress=self.progress,
        )  # fmt: skip
        if found.best is None:
            return result
        serving = {**found.best.to_config(), "search": found.to_dict()}
        winner = replace(w, config={**w.config, "serving": serving})
        board = [winner if t is w else t for t in result.leaderboard]
        return replace(result, leaderboard=board, winner=winner)

    # -- building and guarding -------------------------------------------------------------

    def _build_all(self, specs: list[CandidateSpec]) -> list[_Entry]:
        """Build and guard every spec; identical artifacts are marked as duplicates."""
        entries: list[_Entry] = []
        for i, spec in enumerate(specs):
            self.progress(f"build {spec.name}", i, len(specs))
            entries.append(self._build(spec, entries))
        self.progress("build", len(specs), len(specs))
        return entries

    def _incumbent_entry(self, incumbent: Incumbent) -> _Entry:
        """The serving champion as an entry: not built, only checked against the source."""
        spec = CandidateSpec(INCUMBENT, "incumbent", {"version": incumbent.version},
                             incumbent.options.provider)  # fmt: skip
        extra = {"trim_padding": incumbent.trim_padding} if incumbent.trim_padding else {}
        built = BuiltCandidate(spec, Path(incumbent.path), extra=extra)
        entry = _Entry(spec, built, options=incumbent.options)
        self.progress(f"guard {INCUMBENT} {incumbent.version}", 0, 1)
        try:
            entry.sha256 = sha256_file(incumbent.path)
            outputs = _outputs(open_runner(built, RuntimeOptions()), self.holdout)
        except Exception as exc:  # ORT raises private types; a broken incumbent just loses
            entry.error, entry.stage = f"cannot run: {type(exc).__name__}: {exc}", "failed"
            return entry
        entry.guard, entry.stage = self.guard.check(outputs), INCUMBENT
        return entry

    def _measure_incumbent(self) -> None:
        """Screen and batch-search the incumbent like a finalist, under its own runtime."""
        e = self.incumbent
        if e is None or e.built is None or e.error:
            return
        self.progress(f"batch search {INCUMBENT}", 0, 1)
        e.screen = self._measure(e, e.options, self.screen_batch)
        e.search = self._search(e, e.options)
        e.stage = INCUMBENT

    def _build(self, spec: CandidateSpec, earlier: list[_Entry]) -> _Entry:
        """Build one candidate and check its outputs against the source's."""
        entry = _Entry(spec)
        try:
            entry.built = build_candidate(spec, self.ctx)
            entry.sha256 = sha256_file(entry.built.path)
            if self.trim and entry.built.runtime == "onnxruntime":
                extra = {**entry.built.extra, "trim_padding": self.trim}
                entry.built = replace(entry.built, extra=extra)
        except TunerError as exc:
            entry.error, entry.stage = str(exc), "failed"
            return entry
        twin = next((e for e in earlier if e.sha256 == entry.sha256 and e.guard), None)
        if twin is not None:
            entry.guard, entry.duplicate_of, entry.stage = twin.guard, twin.spec.name, "duplicate"
            return entry
        try:
            outputs = _outputs(open_runner(entry.built, RuntimeOptions()), self.holdout)
        except Exception as exc:  # ORT and torch raise private types; one bad candidate only
            entry.error, entry.stage = f"cannot run: {type(exc).__name__}: {exc}", "failed"
            return entry
        entry.guard = self.guard.check(outputs)
        return entry

    def _retry(self, entry: _Entry) -> list[_Entry]:
        """Rebuild a failing quantized candidate with its most damaged nodes left in float.

        Static candidates are ranked by comparing their QDQ tensors with the float ones;
        dynamic and fused ones, which have no QDQ pairs, by the error their quantizer would
        put on each MatMul's input and weight.
        """
        from tuner.accuracy_debug import exclusion_plans, rank_damaged_nodes, rank_dynamic_damage

        assert entry.built is not None
        p = entry.spec.params
        try:
            # Damage is measured on held-out production rows, like the traffic the model will
            # serve: the calibration rows are what produced the bad scales (an outlier there
            # ranked the wrong node first in tests). Leaving nodes in float only removes error.
            if entry.spec.kind == "static":
                ranked = rank_damaged_nodes(
                    self.ctx.preprocessed, entry.built.path, self.holdout,
                    self.ctx.workdir / "debug",
                )  # fmt: skip
            else:
                ranked = rank_dynamic_damage(
                    dynamic_source(entry.spec, self.ctx), self.holdout,
                    per_channel=p["per_channel"], reduce_range=p["reduce_range"],
                )  # fmt: skip
        except Exception as exc:  # the debug tools raise many unrelated types
            entry.note = f"accuracy debug failed: {type(exc).__name__}: {exc}"
            return []
        # Dynamic candidates first try per-row input scales on the worst MatMuls (cheaper than
        # float: on MiniLM it lifted mean cosine 0.9959 -> 0.9984 for 4 % of the speed, where
        # three MatMuls in float cost 21 %), then float.
        plans = [("nodes_to_exclude", "float", "left in float", nodes)
                 for nodes in exclusion_plans(ranked, RETRY_FRACTIONS)]  # fmt: skip
        # Per-row scales fix activation error; per-tensor weights' error needs float.
        if entry.spec.kind != "static" and p.get("per_channel", True):
            scalable = [d for d in ranked if d.op_type == "MatMul"]
            fractions = (*RETRY_FRACTIONS, 1.0)
            plans = [("per_token_nodes", "pt", "per-row scales on", nodes)
                     for nodes in exclusion_plans(scalable, fractions)] + plans  # fmt: skip
        retries: list[_Entry] = []
        for key, tag, what, nodes in plans:
            params = {**entry.spec.params, key: nodes}
            name = f"{entry.spec.name}+{tag}{len(nodes)}"
            retry = self._build(replace(entry.spec, name=name, params=params), [])
            retry.note = f"{what}: " + ", ".join(
                f"{d.node} ({d.sqnr_db:.1f} dB)" for d in ranked[: min(3, len(nodes))]
            )
            retries.append(retry)
            if retry.passed:
                break
        return retries

    def _retry_all(self, entries: list[_Entry]) -> list[_Entry]:
        """Retry every static candidate that failed the guard (exhaustive mode)."""
        failing = [e for e in entries if _retryable(e)]
        return [r for e in failing for r in self._retry(e)]

    # -- measuring ------------------------------------------------------------------------

    def _run_fn(self, entry: _Entry, options: RuntimeOptions) -> Callable[[int], object]:
        """Return a function running one batch of size b of held-out rows (batches cached)."""
        assert entry.built is not None
        runner: Runner = open_runner(entry.built, options)
        batches: dict[int, Feeds] = {}

        def run(b: int) -> object:
            if b not in batches:
                batches[b] = make_batch(self.holdout, b)
            return runner.run(batches[b])

        return run

    def _measure(self, entry: _Entry, options: RuntimeOptions, batch: int) -> CurvePoint:
        """Measure one batch size under ``options``."""
        self.measurements += 1
        return measure_batch(self._run_fn(entry, options), batch, self.measure_config)

    def _search(self, entry: _Entry, options: RuntimeOptions, start: int = 1) -> BatchSearchResult:
        """Run the batch-size search (or batch 1 only for the latency objective)."""
        run = self._run_fn(entry, options)
        if self.objective == "latency":
            self.measurements += 1
            p = measure_batch(run, 1, self.measure_config)
            ok = p.p95_ms <= self.slo_ms
            return BatchSearchResult(1 if ok else None, (p,), _latency_reason(p, self.slo_ms))
        result = search_batch_size(
            run,
            slo_ms=self.slo_ms,
            max_batch_size=self.space.max_batch_size,
            start=start,
            config=self.measure_config,
        )
        self.measurements += len(result.curve)
        return result

    def _score(self, point: CurvePoint) -> float:
        """Return a higher-is-better score of a point for the objective."""
        return point.throughput if self.objective == "throughput" else -point.p95_ms

    # -- strategies -----------------------------------------------------------------------

    def _smart(self, entries: list[_Entry]) -> None:
        """Screen all, retry promising failures, then tune runtime and batch for finalists."""
        measurable = [e for e in entries if e.built and not e.duplicate_of and not e.error]
        # The baseline that picks the screening batch must itself have passed the guard.
        self._choose_screen_batch([e for e in measurable if e.passed] or measurable)
        screened = [e for e in measurable if e.passed or _retryable(e)]
        self._screen(screened)
        entries += self._retry_promising(screened)
        passing = [e for e in entries if e.passed and e.screen and not e.duplicate_of]
        self._screen_wide(passing)
        ranked = sorted(passing, key=lambda e: self._score(self._best_screen(e)[1]), reverse=True)
        finals = ranked[: self.finalists]
        for e in ranked[self.finalists :]:
            below = f"not a finalist: screened below the top {self.finalists}"
            e.note = f"{e.note}; {below}" if e.note.startswith("left in float") else e.note or below
        for i, e in enumerate(finals):
            self.progress(f"batch search {e.spec.name}", i, len(finals))
            e.options = self._best_screen(e)[0]
            reuse = e.baseline_search if e.options == _default_options(e) else None
            e.search = reuse or self._search(e, e.options)
            e.stage = "finalist"
        leaders = self._close_contenders(finals, LEADER_MARGIN)
        for i, e in enumerate(leaders):
            self.progress(f"runtime {e.spec.name}", i, len(leaders))
            self._tune_runtime(e)
        self.progress("tune", len(finals), len(finals))
        self._measure_incumbent()
        self._confirm(finals + [e for e in [self.incumbent] if e is not None and e.search])

    def _close_contenders(self, finals: list[_Entry], margin: float) -> list[_Entry]:
        """Return the finalists whose best point is within ``margin`` of the top one."""
        best = [(e, e.search.best) for e in finals if e.search and e.search.best]
        top = max((self._score(p) for _, p in best), default=-np.inf)
        return [e for e, p in best if self._score(p) >= top - margin * abs(top)]

    def _confirm(self, finals: list[_Entry]) -> None:
        """Re-measure close contenders in turn so one noisy point cannot pick the winner."""
        close = self._close_contenders(finals, CLOSE_MARGIN)
        if len(close) < 2:
            return
        for i in range(CONFIRM_ROUNDS):
            self.progress("confirm", i, CONFIRM_ROUNDS)
            for e in close:
                assert e.search is not None and e.search.best is not None
                e.confirm.append(self._measure(e, e.options, e.search.best.batch_size))

    def _choose_screen_batch(self, entries: list[_Entry]) -> None:
        """Pick the screening batch size with the first (baseline) candidate.

        By default: the batch size where the baseline peaks under the SLO, found by its own
        batch search (kept for it as a finalist), so every variant is screened near the batch
        size it will serve at rather than at an arbitrary one (a 100 ms SLO on MiniLM and a
        5 ms SLO on a small CNN put that at 16-32 and 64-256). With a fixed size: halve it
        until the baseline meets the SLO.
        """
        if self.objective == "latency":
            self.screen_batch = 1
            return
        if not entries:
            return
        first = entries[0]
        if not self.fixed_screen_batch:
            search = self._search(first, _default_options(first))
            if search.best is not None:
                self.screen_batch = search.best.batch_size
                first.baseline_search, first.screen = search, search.best
                first.stage = "screened"
                return
        point = self._measure(first, _default_options(first), self.screen_batch)
        while point.p95_ms > self.slo_ms and self.screen_batch > 1:
            self.screen_batch //= 2
            point = self._measure(first, _default_options(first), self.screen_batch)
        first.screen, first.stage = point, "screened"

    def _screen(self, entries: list[_Entry]) -> None:
        """Measure each entry once: one thread, no spinning, the screening batch size."""
        for i, e in enumerate(entries):
            self.progress(f"screen {e.spec.name}", i, len(entries))
            if e.screen is None:
                e.screen = self._measure(e, _default_options(e), self.screen_batch)
            e.stage = "screened"
        self.progress("screen", len(entries), len(entries))

    def _screen_wide(self, entries: list[_Entry]) -> None:
        """Screen guard-passing entries again at the widest runtime option of the space.

        Variants scale differently with threads: on the digits CNN static int8 led fp32 by 50 %
        at one thread and trailed it by 10 % at two threads with spinning, so ranking by the
        one-thread screen alone dropped the eventual winner.
        """
        for i, e in enumerate(entries):
            wide = self._widest(e)
            if wide is None or e.screen_wide is not None:
                continue
            self.progress(f"screen wide {e.spec.name}", i, len(entries))
            e.screen_wide = (wide, self._measure(e, wide, self.screen_batch))

    def _widest(self, entry: _Entry) -> RuntimeOptions | None:
        """Return the option with the most threads (spinning if allowed), if above one thread."""
        options = self._options_for(entry)
        wide = max(options, key=lambda o: (o.threads, o.spinning), default=None)
        return wide if wide is not None and wide.threads > 1 else None

    def _best_screen(self, entry: _Entry) -> tuple[RuntimeOptions, CurvePoint]:
        """Return the runtime option and point of the entry's faster screen."""
        assert entry.screen is not None
        one = (_default_options(entry), entry.screen)
        wide = entry.screen_wide
        if wide is not None and _better(self._score(wide[1]), self._score(one[1]), MIN_GAIN):
            return wide  # more threads (and spinning) only for a real gain, not for noise
        return one

    def _retry_promising(self, screened: list[_Entry]) -> list[_Entry]:
        """Retry failing static candidates only if they screened about as fast as the best.

        Leaving nodes in float can only slow a candidate down, so a retry of one already slower
        than the best passing candidate cannot win.
        """
        passing = [self._score(e.screen) for e in screened if e.passed and e.screen]
        top = max(passing, default=-np.inf)
        retries = []
        for e in screened:
            if not _retryable(e) or e.screen is None:
                continue
            if not _close(self._score(e.screen), top):
                e.note = "not retried: screened slower than the best passing candidate"
                continue
            new = self._retry(e)
            self._screen([r for r in new if r.passed])
            retries += new
        return retries

    def _tune_runtime(self, entry: _Entry) -> None:
        """Probe runtime options at the entry's best batch; re-search the batch for a winner."""
        assert entry.search is not None and entry.search.best is not None
        first = entry.search.best
        options, point, entry.probes = self._probe_runtime(entry, first)
        if options == entry.options:
            return
        if self.objective == "latency":
            within = point.p95_ms <= self.slo_ms
            reason = _latency_reason(point, self.slo_ms)
            entry.options = options
            entry.search = BatchSearchResult(1 if within else None, (point,), reason)
            return
        # Start at the old best batch (a start past the SLO falls back to batch 1).
        result = self._search(entry, options, start=first.batch_size)
        if result.best is not None and self._score(result.best) > self._score(first):
            entry.options, entry.search = options, result

    def _probe_runtime(
        self, entry: _Entry, start: CurvePoint
    ) -> tuple[RuntimeOptions, CurvePoint, list[dict[str, Any]]]:
        """Climb the thread counts, each with and without spinning, at one batch size.

        Spinning is tried at every count: here two threads lost to one without it and nearly
        doubled throughput with it. The climb stops at a count that gains less than MIN_GAIN.
        """
        best, best_point = entry.options, start
        probes = [{"options": best.to_dict(), **best_point.to_dict()}]
        if entry.spec.provider != CPU:
            return best, best_point, probes
        options_by_threads: dict[int, list[RuntimeOptions]] = {}
        for o in self._options_for(entry):
            if o.threads > best.threads or (o.threads == best.threads and o != best):
                options_by_threads.setdefault(o.threads, []).append(o)
        for t in sorted(options_by_threads):
            level_best, level_point = best, best_point
            for options in options_by_threads[t]:
                point = self._measure(entry, options, start.batch_size)
                probes.append({"options": options.to_dict(), **point.to_dict()})
                if self._score(point) > self._score(level_point):
                    level_best, level_point = options, point
            if not _better(self._score(level_point), self._score(best_point), MIN_GAIN):
                break
            best, best_point = level_best, level_point
        return best, best_point, probes

    def _exhaustive(self, entries: list[_Entry]) -> None:
        """Run the full batch search for every passing candidate under every runtime option."""
        passing = [e for e in entries if e.passed and not e.duplicate_of]
        runs = [(e, o) for e in passing for o in self._options_for(e)]
        best: dict[str, tuple[float, RuntimeOptions, BatchSearchResult]] = {}
        for i, (e, options) in enumerate(runs):
            self.progress(f"search {e.spec.name} {options.label()}", i, len(runs))
            result = self._search(e, options)
            point = result.best
            score = self._score(point) if point else -np.inf
            e.probes.append(
                {"options": options.to_dict(), "best": point.to_dict() if point else None}
            )
            if e.spec.name not in best or score > best[e.spec.name][0]:
                best[e.spec.name] = (score, options, result)
        self.progress("search", len(runs), len(runs))
        for e in passing:
            _, e.options, e.search = best[e.spec.name]
            e.stage = "exhaustive"

    def _options_for(self, entry: _Entry) -> list[RuntimeOptions]:
        """Return the runtime options that apply to an entry's provider and runtime."""
        if entry.spec.provider != CPU:
            return [_default_options(entry)]
        options = self.space.runtime_options()
        if entry.built and entry.built.runtime == "torch":
            options = [o for o in options if not o.spinning]
        return options

    # -- results --------------------------------------------------------------------------

    def _trial(self, e: _Entry) -> Trial:
        """Turn an entry into a Trial with its verdict and reason."""
        search = e.search
        one = next((p for p in search.curve if p.batch_size == 1), None) if search else None
        best = search.best if search else None
        throughput = best.throughput if best else None
        p50, p95 = (one.p50_ms, one.p95_ms) if one else (None, None)
        if best and e.confirm:  # medians over the search's point and its confirmations
            points = [best, *e.confirm]
            throughput = float(np.median([p.throughput for p in points]))
            if best.batch_size == 1:
                p50 = float(np.median([p.p50_ms for p in points]))
                p95 = float(np.median([p.p95_ms for p in points]))
        return Trial(
            name=e.spec.name,
            config=self._config(e, best),
            artifact=str(e.built.path) if e.built else None,
            sha256=e.sha256,
            passed=e.passed and (search is None or best is not None),
            reason=self._reason(e),
            accuracy=dict(e.guard.metrics) if e.guard else {},
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            throughput=throughput,
            best_batch_size=best.batch_size if best else None,
            screen=e.screen,
            curve=search.curve if search else ((e.screen,) if e.screen else ()),
            stage=e.stage,
        )

    def _config(self, e: _Entry, best: CurvePoint | None) -> dict[str, Any]:
        """Return a trial's config: build parameters, runtime options, batch size, probes."""
        config: dict[str, Any] = {
            **e.spec.to_dict(),
            "runtime": e.options.to_dict(),
            "batch_size": best.batch_size if best else None,
        }
        if e.built:
            config.update(runtime_engine=e.built.runtime, build_s=round(e.built.build_s, 3))
            config.update({k: v for k, v in e.built.extra.items() if k != "inputs"})
            if e.built.notes:
                config["notes"] = e.built.notes
        if e.screen_wide is not None:
            config["screen_wide"] = {
                "options": e.screen_wide[0].to_dict(),
                **e.screen_wide[1].to_dict(),
            }
        if e.probes:
            config["runtime_probes"] = e.probes
        if e.confirm:
            config["confirmation"] = [p.to_dict() for p in e.confirm]
        return config

    def _reason(self, e: _Entry) -> str:
        """Explain the verdict with numbers."""
        if e.error:
            return e.error
        assert e.guard is not None
        parts = [("guard passed: " if e.guard.passed else "guard failed: ") + e.guard.reason]
        if e.duplicate_of:
            parts.append(f"identical artifact to {e.duplicate_of!r}; not measured again")
        if e.search is not None:
            parts.append(e.search.reason + f" ({e.options.label()})")
        if e.confirm and e.search and e.search.best:
            rates = [p.throughput for p in (e.search.best, *e.confirm)]
            parts.append(
                f"re-measured {len(e.confirm)} more times against close contenders: "
                f"median {float(np.median(rates)):.1f} items/s"
            )
        if e.note:
            parts.append(e.note)
        if e.built and e.built.notes:
            parts.append(e.built.notes)
        return "; ".join(parts)


def _default_options(entry: _Entry) -> RuntimeOptions:
    """Return one thread, no spinning, on the candidate's own provider."""
    return RuntimeOptions(provider=entry.spec.provider)


@contextlib.contextmanager
def _torch_threads_restored() -> Iterator[None]:
    """Restore torch's global thread count, which torch candidates change while measured."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    try:
        yield
    finally:
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


def _latency_reason(point: CurvePoint, slo_ms: float) -> str:
    """Explain a batch-1 latency against the SLO."""
    sign = "<=" if point.p95_ms <= slo_ms else ">"
    return f"p95 {point.p95_ms:.2f} ms at batch 1 {sign} SLO {slo_ms:g} ms"


def _close(score: float, top: float) -> bool:
    """Return True when ``score`` is within CLOSE_MARGIN of ``top`` (or beats it)."""
    return score >= top - CLOSE_MARGIN * abs(top)


def _better(score: float, than: float, gain: float) -> bool:
    """Return True when ``score`` beats ``than`` by more than ``gain`` (a fraction of it)."""
    return score > than + gain * abs(than)


def trial_runner(trial: Trial, options: RuntimeOptions | None = None) -> Runner:
    """Open a runner on a trial's artifact, under its tuned runtime options unless given.

    Raises:
        ArtifactError: the trial has no artifact (its build failed) or the file is gone.
    """
    if trial.artifact is None:
        raise ArtifactError(f"trial {trial.name!r} has no artifact; its build failed")
    config = trial.config
    kind: Kind = config["kind"]
    spec = CandidateSpec(trial.name, kind, provider=config.get("provider", CPU))
    engine = config.get("runtime_engine", "onnxruntime")
    extra = {
        "keywords": bool(config.get("keywords", False)),
        "trim_padding": config.get("trim_padding"),
    }
    built = BuiltCandidate(spec, Path(trial.artifact), engine, extra=extra)
    return open_runner(built, options or RuntimeOptions(**config["runtime"]))


def _retryable(e: _Entry) -> bool:
    """Return True for a quantized candidate that failed the guard and was not yet retried."""
    failed_guard = e.guard is not None and not e.guard.passed and not e.error
    first_try = not (e.spec.params.get("nodes_to_exclude") or e.spec.params.get("per_token_nodes"))
    quantized = e.spec.kind in ("static", "dynamic", "fused")
    return quantized and failed_guard and first_try and not e.duplicate_of


def _trim_mask(
    base: Path, inputs: list[InputSpec], holdout: Feeds, reference: np.ndarray
) -> str | None:
    """Return "attention_mask" when trimming padding per batch leaves the source's outputs
    unchanged on the held-out rows (a dynamic sequence axis, outputs that respect the mask).

    Models that return one vector per token change shape when trimmed, so they are not.
    """
    spec = next((s for s in inputs if s.name == "attention_mask"), None)
    if spec is None or len(spec.shape) != 2 or isinstance(spec.shape[1], int):
        return None
    try:
        trimmed = _outputs(OrtRunner(base, RuntimeOptions(), spec.name), holdout)
    except Exception:  # ORT raises private types: a model that cannot take it is not trimmed
        return None
    same = trimmed.shape == reference.shape and np.allclose(trimmed, reference, 1e-4, 1e-5)
    return spec.name if same else None


def _eligible(trial: Trial, objective: Objective, slo_ms: float) -> bool:
    """Return True when a trial may win: guard passed and it meets the SLO when measured."""
    if not trial.passed or trial.best_batch_size is None:
        return False
    if objective == "latency":
        return trial.latency_p95_ms is not None and trial.latency_p95_ms <= slo_ms
    return trial.throughput is not None


def _leaderboard(trials: list[Trial], objective: Objective) -> list[Trial]:
    """Order trials: winners' candidates first by objective, then screened, then the rest."""

    def key(t: Trial) -> tuple[int, int, float]:
        if objective == "latency":
            final = -(t.latency_p95_ms or np.inf) if t.best_batch_size else -np.inf
            screened = -t.screen.p95_ms if t.screen else -np.inf
        else:
            final = t.throughput if t.throughput is not None and t.best_batch_size else -np.inf
            screened = t.screen.throughput if t.screen else -np.inf
        return (int(t.passed), int(final > -np.inf), final if final > -np.inf else screened)

    return sorted(trials, key=key, reverse=True)


def _checked(feeds: Feeds, what: str, minimum: int) -> Feeds:
    """Raise NotEnoughSamples when ``feeds`` has fewer than ``minimum`` rows."""
    rows = num_rows(feeds)
    if rows < minimum:
        raise NotEnoughSamples(f"{what} has {rows} samples; pass at least {minimum}")
    return feeds


def _base_candidate(base: Path) -> BuiltCandidate:
    """Wrap the source model (the guard's reference) as a built candidate to run it."""
    load_session(base)  # fail early, with the path in the message, if it cannot load
    return BuiltCandidate(CandidateSpec("source", "fp32"), base)


def _outputs(runner: Runner, feeds: Feeds, chunk: int = 64) -> np.ndarray:
    """Return the first output of ``runner`` on all rows of ``feeds``, run in chunks."""
    return np.concatenate([runner.run(part)[0] for part in iter_chunks(feeds, chunk)])
