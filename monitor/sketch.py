"""Log-bucketed latency histograms with a bounded relative error (the DDSketch mapping).

A latency ``x`` ms falls in bucket ``ceil(log(x) / log(gamma))``; reporting a bucket by
``2 * gamma**i / (gamma + 1)`` makes every quantile accurate to within ``RELATIVE_ERROR``
(1 %) of the true value. Buckets merge by adding counts, so per-interval histograms from many
processes combine exactly into any coarser window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

RELATIVE_ERROR = 0.01
GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
MIN_MS = 1e-6  # 1 ns; anything smaller shares the lowest bucket


def bucket_of(ms: float) -> int:
    """Bucket index of a latency in milliseconds.

    >>> bucket_of(1.0), bucket_of(100.0) > bucket_of(99.0)
    (0, True)
    """
    return math.ceil(math.log(max(ms, MIN_MS)) * _INV_LOG_GAMMA)


def buckets_of(ms: np.ndarray) -> np.ndarray:
    """Bucket indexes of many latencies at once (same mapping as :func:`bucket_of`)."""
    return np.ceil(np.log(np.maximum(ms, MIN_MS)) * _INV_LOG_GAMMA).astype(np.int64)


def bucket_value(index: int) -> float:
    """The representative latency (ms) of a bucket: within 1 % of every value in it."""
    return 2.0 * GAMMA**index / (GAMMA + 1.0)


def merge(histograms: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Add bucket counts of several histograms."""
    out: dict[int, int] = {}
    for hist in histograms:
        for k, v in hist.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return out


def quantiles(hist: Mapping[int, int], qs: Iterable[float]) -> list[float]:
    """Quantiles (e.g. 0.5, 0.95, 0.99) of a histogram, in ms; NaN for an empty one.

    >>> h = {bucket_of(v): 1 for v in (1.0, 2.0, 3.0, 4.0, 5.0)}
    >>> [round(q, 1) for q in quantiles(h, [0.5, 1.0])]
    [3.0, 5.0]
    """
    qs = list(qs)
    if not hist:
        return [math.nan] * len(qs)
    keys = np.array(sorted(hist), dtype=np.int64)
    cum = np.cumsum([hist[int(k)] for k in keys])
    total = cum[-1]
    out = []
    for q in qs:
        rank = max(1, math.ceil(q * total))
        idx = int(np.searchsorted(cum, rank))
        out.append(bucket_value(int(keys[min(idx, len(keys) - 1)])))
    return out


def expand(hist: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Representative values and their counts, for weighted statistics."""
    keys = sorted(hist)
    values = np.array([bucket_value(int(k)) for k in keys], dtype=float)
    return values, np.array([hist[k] for k in keys], dtype=np.int64)


def interpolated(hist: Mapping[int, int], max_points: int | None = None) -> np.ndarray:
    """A sorted sample that spreads each bucket's calls evenly (in log space) across it.

    Bucket ``i`` holds latencies in ``(GAMMA**(i-1), GAMMA**i]``. Treating the histogram as
    log-uniform within each bucket and reading it at evenly spaced ranks gives one distinct
    value per call (or per ``max_points`` slice), so rank statistics and their intervals are
    not stuck on shared bucket values (ties put estimates on interval bounds).

    >>> h = {bucket_of(2.0): 4}
    >>> v = interpolated(h)
    >>> len(set(v.round(6))), bool(all(abs(v / 2.0 - 1) < 2 * RELATIVE_ERROR))
    (4, True)
    """
    keys = np.array(sorted(k for k, c in hist.items() if c > 0), dtype=np.int64)
    if keys.size == 0:
        return np.empty(0, dtype=float)
    counts = np.array([hist[int(k)] for k in keys], dtype=np.float64)
    cum = np.cumsum(counts)
    total = int(cum[-1])
    n = total if max_points is None else min(total, max_points)
    ranks = (np.arange(n) + 0.5) * (total / n)
    idx = np.minimum(np.searchsorted(cum, ranks, side="right"), keys.size - 1)
    frac = (ranks - (cum[idx] - counts[idx])) / counts[idx]
    return np.exp((keys[idx] - 1 + frac) / _INV_LOG_GAMMA)
