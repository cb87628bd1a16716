"""Find the batch size with the most throughput whose p95 latency stays within a budget.

Doubling finds the region, bisection refines it; both stop once two steps in a row gain less
than ``min_gain``. Every point is measured until stable, warm-up runs excluded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tuner.errors import TunerError

RunBatch = Callable[[int], object]
Clock = Callable[[], float]


@dataclass(frozen=True)
class MeasureConfig:
    """How long and how often one batch size is measured.

    A window is at least ``window_runs`` runs and ``min_window_s`` seconds. A point is stable when
    the throughput of the last ``stable_windows`` windows spreads less than ``max_spread``
    (max - min over median); measuring stops there or after ``max_windows`` windows.
    """

    warmup_runs: int = 2
    window_runs: int = 5
    min_window_s: float = 0.1
    stable_windows: int = 3
    max_windows: int = 8
    max_spread: float = 0.10

    def __post_init__(self) -> None:
        if self.window_runs < 1 or self.stable_windows < 1:
            raise TunerError("window_runs and stable_windows must be >= 1")
        if self.max_windows < self.stable_windows:
            raise TunerError(
                f"max_windows={self.max_windows} < stable_windows={self.stable_windows}; "
                "raise max_windows"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)


@dataclass(frozen=True)
class CurvePoint:
    """One measured batch size: latency percentiles, throughput and whether it was stable."""

    batch_size: int
    p50_ms: float
    p95_ms: float
    throughput: float
    stable: bool
    runs: int
    spread: float

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)


@dataclass(frozen=True)
class BatchSearchResult:
    """The chosen batch size (None when even the smallest misses the SLO) and every point."""

    best_batch_size: int | None
    curve: tuple[CurvePoint, ...]
    reason: str

    @property
    def best(self) -> CurvePoint | None:
        """Return the curve point of the chosen batch size."""
        return next((p for p in self.curve if p.batch_size == self.best_batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {
            "best_batch_size": self.best_batch_size,
            "curve": [p.to_dict() for p in self.curve],
            "reason": self.reason,
        }


def measure_batch(
    run: RunBatch,
    batch_size: int,
    config: MeasureConfig = MeasureConfig(),
    clock: Clock = time.perf_counter,
) -> CurvePoint:
    """Measure ``run(batch_size)`` in windows until throughput is stable; warm-up excluded."""
    for _ in range(config.warmup_runs):
        run(batch_size)
    windows: list[list[float]] = []
    spread = float("inf")
    while len(windows) < config.max_windows:
        windows.append(_measure_window(run, batch_size, config, clock))
        if len(windows) >= config.stable_windows:
            spread = _spread(windows[-config.stable_windows :], batch_size)
            if spread < config.max_spread:
                break
    latencies = np.concatenate([np.asarray(w) for w in windows[-config.stable_windows :]])
    return CurvePoint(
        batch_size=batch_size,
        p50_ms=float(np.percentile(latencies, 50) * 1e3),
        p95_ms=float(np.percentile(latencies, 95) * 1e3),
        throughput=float(batch_size * len(latencies) / max(latencies.sum(), 1e-12)),
        stable=spread < config.max_spread,
        runs=int(latencies.size),
        spread=float(spread) if np.isfinite(spread) else 1.0,
    )


def _measure_window(
    run: RunBatch, batch_size: int, config: MeasureConfig, clock: Clock
) -> list[float]:
    """Time runs until the window has enough runs and enough seconds."""
    latencies: list[float] = []
    start = clock()
    while len(latencies) < config.window_runs or clock() - start < config.min_window_s:
        before = clock()
        run(batch_size)
        latencies.append(clock() - before)
    return latencies


def _spread(windows: list[list[float]], batch_size: int) -> float:
    """Return (max - min) / median of the windows' throughputs."""
    rates = [batch_size * len(w) / max(sum(w), 1e-12) for w in windows]
    return float((max(rates) - min(rates)) / max(float(np.median(rates)), 1e-12))


def search_batch_size(
    run: RunBatch,
    *,
    slo_ms: float,
    max_batch_size: int = 256,
    min_gain: float = 0.05,
    start: int = 1,
    config: MeasureConfig = MeasureConfig(),
    clock: Clock = time.perf_counter,
) -> BatchSearchResult:
    """Return the batch size with the most throughput whose p95 latency is <= ``slo_ms``.

    Doubles from ``start`` (1 by default) until the SLO is missed, ``max_batch_size`` is reached
    or two doublings in a row gain less than ``min_gain``; then bisects between the last batch
    within the SLO and the first one past it, with the same two-small-steps stop. Batch 1 is
    always measured, for its latency; a ``start`` past the SLO falls back to 1. The answer is
    the smallest measured batch within ``min_gain`` of the most throughput measured: on a flat
    curve a bigger batch buys only noise and costs latency.
    """
    if slo_ms <= 0 or max_batch_size < 1:
        raise TunerError(f"slo_ms={slo_ms} and max_batch_size={max_batch_size} must be positive")
    curve: dict[int, CurvePoint] = {}

    def point(b: int) -> CurvePoint:
        if b not in curve:
            curve[b] = measure_batch(run, b, config, clock)
        return curve[b]

    first = point(1)
    if first.p95_ms > slo_ms:
        reason = f"p95 {first.p95_ms:.2f} ms at batch 1 exceeds the SLO {slo_ms:g} ms"
        return BatchSearchResult(None, _sorted(curve), reason)
    origin = first
    if 1 < start <= max_batch_size and point(start).p95_ms <= slo_ms:
        origin = point(start)
    best, bracket, stop = _double(point, origin, slo_ms, max_batch_size, min_gain)
    best = first if first.throughput > best.throughput else best
    if bracket is not None:
        best, stop = _bisect(point, best, bracket, slo_ms, min_gain)
    chosen = _knee(curve.values(), best, slo_ms, min_gain)
    reason = (
        f"batch {chosen.batch_size}: {chosen.throughput:.1f} items/s, p95 {chosen.p95_ms:.2f} ms "
        f"<= SLO {slo_ms:g} ms; stopped: {stop}"
    )
    if chosen is not best:
        reason += (
            f"; the smallest batch within {min_gain:.0%} of the most measured "
            f"({best.throughput:.1f} items/s at batch {best.batch_size})"
        )
    return BatchSearchResult(chosen.batch_size, _sorted(curve), reason)


def _knee(
    points: Iterable[CurvePoint], best: CurvePoint, slo_ms: float, min_gain: float
) -> CurvePoint:
    """Return the smallest batch within ``min_gain`` of the best throughput, within the SLO.

    On a flat curve the top point differs from its neighbours by less than the measurement
    noise of a shared machine; a bigger batch only adds latency and memory for that, so the
    same threshold that stops the search (gains under ``min_gain`` do not count) picks the
    batch size.
    """
    near = [
        p for p in points if p.p95_ms <= slo_ms and p.throughput >= best.throughput * (1 - min_gain)
    ]
    return min(near, key=lambda p: p.batch_size, default=best)


def _double(
    point: Callable[[int], CurvePoint],
    first: CurvePoint,
    slo_ms: float,
    max_batch_size: int,
    min_gain: float,
) -> tuple[CurvePoint, tuple[int, int] | None, str]:
    """Double the batch size; return the best point, (last within SLO, first past it), why."""
    best, small_steps, b = first, 0, first.batch_size
    while b < max_batch_size:
        previous, b = b, min(2 * b, max_batch_size)
        p = point(b)
        if p.p95_ms > slo_ms:
            return best, (previous, b), f"batch {b} exceeds the SLO"
        small_steps = small_steps + 1 if p.throughput < best.throughput * (1 + min_gain) else 0
        best = p if p.throughput > best.throughput else best
        if small_steps >= 2:
            return best, None, f"two doublings gained < {min_gain:.0%}"
    return best, None, f"reached max batch size {max_batch_size}"


def _bisect(
    point: Callable[[int], CurvePoint],
    best: CurvePoint,
    bracket: tuple[int, int],
    slo_ms: float,
    min_gain: float,
) -> tuple[CurvePoint, str]:
    """Bisect between the largest batch within the SLO and the first past it."""
    (lo, hi), small_steps = bracket, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = point(mid)
        gained = p.p95_ms <= slo_ms and p.throughput >= best.throughput * (1 + min_gain)
        if p.p95_ms <= slo_ms:
            lo = mid
            best = p if p.throughput > best.throughput else best
        else:
            hi = mid
        small_steps = 0 if gained else small_steps + 1
        if small_steps >= 2:
            return best, f"two bisection steps gained < {min_gain:.0%}"
    return best, f"bisection converged: batch {hi} exceeds the SLO"


def _sorted(curve: dict[int, CurvePoint]) -> tuple[CurvePoint, ...]:
    """Return the curve ordered by batch size."""
    return tuple(curve[b] for b in sorted(curve))
