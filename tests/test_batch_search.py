"""Batch-size search: on a simulated clock (exact) and on a real ORT session (SLO respected)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tuner_fixtures import export, load_digits_split, trained_mlp

from tuner.batch_search import MeasureConfig, measure_batch, search_batch_size
from tuner.errors import TunerError
from tuner.onnx_tools import load_session, make_batch

FAST = MeasureConfig(warmup_runs=1, window_runs=3, min_window_s=0.0, max_windows=4)


class SimulatedModel:
    """A model whose batch of b takes ``latency(b)`` seconds on a clock it advances itself."""

    def __init__(self, latency: Callable[[int], float]) -> None:
        self.latency = latency
        self.now = 0.0
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, b: int) -> None:
        self.calls.append(b)
        self.now += self.latency(b)


def test_doubles_then_bisects_towards_the_slo() -> None:
    # 10 ms fixed cost + 0.1 ms per item: throughput grows with b, p95 crosses 20 ms past b = 100.
    model = SimulatedModel(lambda b: 0.010 + 0.0001 * b)
    result = search_batch_size(model.run, slo_ms=20, config=FAST, clock=model.clock)
    sizes = [p.batch_size for p in result.curve]
    # Doubling up to 128 (past the SLO), then 96 (within, +25 %), 112 and 104 (both past it).
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 96, 104, 112, 128]
    assert result.best_batch_size == 96
    best = result.best
    assert best is not None and best.p95_ms <= 20
    feasible = [p for p in result.curve if p.p95_ms <= 20]
    assert best.throughput == max(p.throughput for p in feasible)
    assert "two bisection steps gained < 5%" in result.reason and "SLO 20 ms" in result.reason


def test_bisection_stops_when_refining_gains_little() -> None:
    # 2 ms + 0.5 ms per item: batch 32 takes 18 ms; 36 would add only 1 % throughput.
    model = SimulatedModel(lambda b: 0.002 + 0.0005 * b)
    result = search_batch_size(model.run, slo_ms=20, config=FAST, clock=model.clock)
    assert [p.batch_size for p in result.curve][-3:] == [40, 48, 64]
    assert result.best_batch_size == 32


def test_resumes_from_a_known_good_batch_but_still_measures_batch_one() -> None:
    model = SimulatedModel(lambda b: 0.010 + 0.0001 * b)
    result = search_batch_size(model.run, slo_ms=20, start=64, config=FAST, clock=model.clock)
    assert [p.batch_size for p in result.curve] == [1, 64, 96, 104, 112, 128]
    assert result.best_batch_size == 96
    past_slo = search_batch_size(model.run, slo_ms=12, start=64, config=FAST, clock=model.clock)
    assert past_slo.curve[1].batch_size == 2  # batch 64 missed the SLO: doubled from 1 instead


def test_stops_doubling_after_two_steps_that_gain_under_5_percent() -> None:
    # Throughput saturates from batch 4 on (fixed cost per item dominates).
    model = SimulatedModel(lambda b: 0.001 * b if b >= 4 else 0.004)
    result = search_batch_size(model.run, slo_ms=1000, config=FAST, clock=model.clock)
    assert [p.batch_size for p in result.curve] == [1, 2, 4, 8, 16]
    assert result.best_batch_size == 4
    assert "two doublings gained < 5%" in result.reason


def test_picks_the_smallest_batch_within_5_percent_of_the_most_throughput() -> None:
    # items/s: 250, 400, 667, 800, then a flat top: 1000 at 16, 1020 at 32, 1040 at 64.
    ms = {1: 4.0, 2: 5.0, 4: 6.0, 8: 10.0, 16: 16.0, 32: 32 / 1.020, 64: 64 / 1.040}
    model = SimulatedModel(lambda b: ms[b] / 1000)
    result = search_batch_size(model.run, slo_ms=1000, config=FAST, clock=model.clock)
    assert [p.batch_size for p in result.curve] == [1, 2, 4, 8, 16, 32, 64]
    assert result.best_batch_size == 16
    assert result.best is not None and result.best.throughput == pytest.approx(1000, rel=1e-6)
    assert "smallest batch within 5% of the most measured (1040.0 items/s at batch 64)" in (
        result.reason
    )


def test_reports_when_even_batch_one_misses_the_slo() -> None:
    model = SimulatedModel(lambda b: 0.05)
    result = search_batch_size(model.run, slo_ms=10, config=FAST, clock=model.clock)
    assert result.best_batch_size is None and result.best is None
    assert result.reason == "p95 50.00 ms at batch 1 exceeds the SLO 10 ms"


def test_respects_the_max_batch_size() -> None:
    model = SimulatedModel(lambda b: 0.001 + 0.0001 * b)
    result = search_batch_size(
        model.run, slo_ms=1000, max_batch_size=48, min_gain=0.0, config=FAST, clock=model.clock
    )
    assert max(p.batch_size for p in result.curve) == 48
    assert result.best_batch_size == 48 and "max batch size 48" in result.reason


def test_warmup_is_excluded_and_stable_points_stop_early() -> None:
    latencies = iter([1.0, 1.0] + [0.01] * 100)  # two slow warm-up runs, then steady
    model = SimulatedModel(lambda b: next(latencies))
    config = MeasureConfig(warmup_runs=2, window_runs=4, min_window_s=0.0, max_windows=8)
    point = measure_batch(model.run, 1, config, clock=model.clock)
    assert point.p95_ms == pytest.approx(10.0)
    assert point.stable and point.runs == 12  # three windows of four, no more
    assert len(model.calls) == 2 + 12


def test_unstable_points_are_flagged_after_the_window_cap() -> None:
    rng = np.random.default_rng(0)
    model = SimulatedModel(lambda b: float(rng.choice([0.001, 0.004])))
    config = MeasureConfig(warmup_runs=0, window_runs=2, min_window_s=0.0, max_windows=5)
    point = measure_batch(model.run, 1, config, clock=model.clock)
    assert not point.stable and point.spread >= 0.10
    assert len(model.calls) == 10  # capped at five windows


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(TunerError, match="max_windows=2 < stable_windows=3"):
        MeasureConfig(max_windows=2)
    with pytest.raises(TunerError, match="slo_ms=0"):
        search_batch_size(lambda b: None, slo_ms=0)


def test_real_session_chosen_batch_meets_the_slo(tmp_path: Path) -> None:
    digits = load_digits_split()
    path = export(trained_mlp(digits), digits.x_holdout, tmp_path / "mlp.onnx")
    session = load_session(path)
    feeds = {"input": digits.x_holdout}
    batches = {b: make_batch(feeds, b) for b in (1, 2, 4, 8, 16, 32, 64)}

    def run(b: int) -> object:
        return session.run(None, batches.get(b) or make_batch(feeds, b))

    # An SLO no busy machine can miss at batch 1 (a small MLP runs in microseconds).
    result = search_batch_size(run, slo_ms=50.0, max_batch_size=64, config=FAST)
    best = result.best
    assert best is not None and best.p95_ms <= 50.0
    assert all(p.runs >= 3 and p.throughput > 0 for p in result.curve)
    # The answer is the smallest batch within 5 % of the most throughput within the SLO.
    top = max(p.throughput for p in result.curve if p.p95_ms <= 50.0)
    near = [p.batch_size for p in result.curve if p.p95_ms <= 50.0 and p.throughput >= 0.95 * top]
    assert best.batch_size == min(near)
