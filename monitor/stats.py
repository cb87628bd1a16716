"""Latency regression statistics: a rank test gated by the size of the shift.

A canary judge that flags every statistically significant change drowns its users in
alarms once windows hold thousands of calls, because tiny, harmless shifts become
significant. So :func:`compare_latencies` asks two questions of a recent window against a
baseline: is recent latency stochastically larger (one-sided Mann-Whitney U), and is the
whole confidence interval of the slowdown beyond a tolerance (Hodges-Lehmann shift of log
latency for the median, a bootstrap interval for p95)? Only "yes" to both flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import stats

from monitor.errors import ConfigError, InsufficientData

FloatArray = npt.NDArray[np.float64]

MIN_LATENCY_MS = 1e-3  # a 0 ms reading (clock resolution) must still have a logarithm
P95 = 0.95
N_BOOTSTRAP = 2000


@dataclass(frozen=True)
class RankShift:
    """One-sided Mann-Whitney test of ``y > x`` and the Hodges-Lehmann shift of ``y - x``.

    ``ci`` is the two-sided ``1 - 2 * alpha`` distribution-free interval, so its lower end is
    the one-sided ``1 - alpha`` lower confidence bound that matches the test.
    """

    u_statistic: float
    p_value: float
    shift: float
    ci: tuple[float, float]


@dataclass(frozen=True)
class ShiftResult:
    """Verdict of a recent latency window against a baseline window.

    Ratios are recent / baseline: 1.25 means 25 % slower. Intervals are two-sided
    ``1 - 2 * alpha`` (90 % at the default ``alpha``); their lower ends are the one-sided
    bounds the verdict uses.
    """

    status: str
    regressed: bool
    n_baseline: int
    n_recent: int
    p_value: float | None
    u_statistic: float | None
    median_ratio: float | None
    median_ci: tuple[float, float] | None
    p95_baseline: float | None
    p95_recent: float | None
    p95_ratio: float | None
    p95_ci: tuple[float, float] | None
    tolerance: float
    alpha: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable fields (intervals become lists)."""
        return _with_list_intervals(asdict(self))


def mann_whitney_hl(x: npt.ArrayLike, y: npt.ArrayLike, alpha: float = 0.05) -> RankShift:
    """Test whether ``y`` tends to exceed ``x`` and estimate by how much (Hodges-Lehmann).

    The p-value is scipy's one-sided ``mannwhitneyu(y, x, alternative="greater")``. The shift
    is the median of all pairwise differences ``y_j - x_i``; its interval is the Moses
    distribution-free one: the ``k``-th smallest and ``k``-th largest pairwise differences,
    with ``k`` from the normal approximation of U's null distribution (continuity corrected,
    no tie correction, which only widens the interval when values tie). It inverts the same
    test, so ``ci[0] > 0`` agrees with ``p_value < alpha``. Pairwise differences are never
    materialised: order statistics are found by bisection with sorted counting, O((n + m)
    log(n + m)) per step, so 5,000 x 5,000 inputs stay cheap. Pass log values to get a
    multiplicative shift.

    Raises:
        InsufficientData: ``x`` or ``y`` is empty.

    >>> r = mann_whitney_hl([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0, 7.0])
    >>> r.shift, r.ci, round(r.p_value, 3)
    (2.0, (0.0, 4.0), 0.057)
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    ys = np.sort(np.asarray(y, dtype=np.float64))
    if xs.size == 0 or ys.size == 0:
        raise InsufficientData(
            f"mann_whitney_hl needs two non-empty samples, got {xs.size} and {ys.size}"
        )
    test = stats.mannwhitneyu(ys, xs, alternative="greater")
    p_value = float(test.pvalue) if np.isfinite(test.pvalue) else 1.0  # all values tied
    k_lo, k_hi = _moses_ranks(xs.size, ys.size, alpha)
    n_pairs = xs.size * ys.size
    k_mid = [(n_pairs + 1) // 2, n_pairs // 2 + 1]  # one rank when odd, the middle two when even
    lo, mid1, mid2, hi = _pairwise_order_stats(xs, ys, [k_lo, *k_mid, k_hi])
    return RankShift(float(test.statistic), p_value, (mid1 + mid2) / 2.0, (lo, hi))


def compare_latencies(
    baseline: npt.ArrayLike,
    recent: npt.ArrayLike,
    *,
    tolerance: float = 0.10,
    alpha: float = 0.05,
    min_samples: int = 50,
    baseline_weights: npt.ArrayLike | None = None,
    recent_weights: npt.ArrayLike | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> ShiftResult:
    """Decide whether ``recent`` latencies (ms) regressed against ``baseline``.

    Rule: ``regressed`` is true when the one-sided Mann-Whitney test of "recent slower" has
    ``p < alpha`` AND either the lower end of the median-ratio interval or the lower end of the
    p95-ratio interval exceeds ``1 + tolerance``. The median ratio is ``exp`` of the
    Hodges-Lehmann shift of log latency (see :func:`mann_whitney_hl`); the p95 ratio's interval
    is a percentile bootstrap (``N_BOOTSTRAP`` resamples, seeded by ``seed``). A window with
    fewer than ``min_samples`` calls gives ``status="insufficient_data"`` and no verdict.

    ``*_weights`` are integer counts per value, e.g. histogram bucket values and counts from
    per-interval aggregates; they mean the same as repeating each value that many times.
    Each window is thinned to at most ``max_points`` values at evenly spaced ranks of its
    weighted distribution, which keeps quantiles, bounds the cost and is deterministic; the
    tests then treat the thinned sample as ``max_points`` draws, which is conservative.
    Non-finite and negative values are dropped; 0 ms counts as ``MIN_LATENCY_MS``.

    Raises:
        ConfigError: a setting or a weights array is invalid.

    >>> rng = np.random.default_rng(1)
    >>> base = rng.lognormal(np.log(50), 0.3, 2000)
    >>> r = compare_latencies(base, rng.lognormal(np.log(65), 0.3, 2000))
    >>> r.regressed, round(r.median_ratio, 2)
    (True, 1.3)
    >>> compare_latencies(base, [51.0, 52.0]).reason
    'insufficient data: 2 of 50 rows in the recent window'
    """
    _check_settings(tolerance, alpha, min_samples, max_points)
    base, n_base = _thin(baseline, baseline_weights, max_points, "baseline")
    rec, n_rec = _thin(recent, recent_weights, max_points, "recent")
    short = [(n, name) for n, name in ((n_base, "baseline"), (n_rec, "recent")) if n < min_samples]
    if short:
        reason = (
            f"insufficient data: {short[0][0]} of {min_samples} rows in the {short[0][1]} window"
        )
        return _no_verdict(n_base, n_rec, tolerance, alpha, reason)
    shift = mann_whitney_hl(np.log(base), np.log(rec), alpha)
    p95_ratios = _bootstrap_quantile(rec, P95, seed) / _bootstrap_quantile(base, P95, seed + 1)
    p95_lo, p95_hi = np.quantile(p95_ratios, [alpha, 1.0 - alpha])
    p95_base, p95_rec = _order_quantile(base, P95), _order_quantile(rec, P95)
    median_ci = (math.exp(shift.ci[0]), math.exp(shift.ci[1]))
    p95_ci = (float(p95_lo), float(p95_hi))
    regressed, reason = _verdict(shift.p_value, median_ci, p95_ci, tolerance, alpha)
    return ShiftResult(
        status="ok",
        regressed=regressed,
        n_baseline=n_base,
        n_recent=n_rec,
        p_value=shift.p_value,
        u_statistic=shift.u_statistic,
        median_ratio=math.exp(shift.shift),
        median_ci=median_ci,
        p95_baseline=p95_base,
        p95_recent=p95_rec,
        p95_ratio=p95_rec / p95_base,
        p95_ci=p95_ci,
        tolerance=tolerance,
        alpha=alpha,
        reason=reason,
    )


def _check_settings(tolerance: float, alpha: float, min_samples: int, max_points: int) -> None:
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 10.0):
        raise ConfigError(
            f"tolerance={tolerance!r} is invalid: use a fraction in [0, 10), e.g. 0.10"
        )
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 0.5):
        raise ConfigError(f"alpha={alpha!r} is invalid: use a probability in (0, 0.5), e.g. 0.05")
    if not (isinstance(min_samples, int) and min_samples >= 5):
        raise ConfigError(f"min_samples={min_samples!r} is invalid: use an integer >= 5")
    if not (isinstance(max_points, int) and max_points >= min_samples):
        raise ConfigError(
            f"max_points={max_points!r} is invalid: use an integer >= min_samples ({min_samples})"
        )


def _thin(
    values: npt.ArrayLike, weights: npt.ArrayLike | None, max_points: int, name: str
) -> tuple[FloatArray, int]:
    """Sorted sample of at most ``max_points`` values with the window's quantiles, and its size."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    counts = _counts(weights, vals.size, name)
    keep = np.isfinite(vals) & (vals >= 0.0)
    vals, counts = np.maximum(vals[keep], MIN_LATENCY_MS), counts[keep]
    order = np.argsort(vals, kind="stable")
    vals, counts = vals[order], counts[order]
    total = int(counts.sum())
    if total <= max_points:
        return np.repeat(vals, counts), total
    # The value at the middle of each of max_points equal slices of the (weighted) ranks:
    # identical to thinning the expanded raw sample, without ever expanding it.
    ranks = (np.arange(max_points) + 0.5) * (total / max_points)
    return vals[np.searchsorted(np.cumsum(counts), ranks, side="right")], total


def _counts(weights: npt.ArrayLike | None, size: int, name: str) -> npt.NDArray[np.int64]:
    if weights is None:
        return np.ones(size, dtype=np.int64)
    raw = np.asarray(weights, dtype=np.float64).ravel()
    if raw.size != size:
        raise ConfigError(
            f"{name}_weights has {raw.size} counts for {size} values: pass one per value"
        )
    bad = ~np.isfinite(raw) | (raw < 0) | (raw != np.round(raw))
    if bad.any():
        raise ConfigError(
            f"{name}_weights contains {float(raw[bad][0])!r}: use non-negative integer counts"
        )
    return raw.astype(np.int64)


def _moses_ranks(n: int, m: int, alpha: float) -> tuple[int, int]:
    """1-based ranks of the pairwise differences bounding the ``1 - 2 * alpha`` interval."""
    z = stats.norm.ppf(1.0 - alpha)
    sd = math.sqrt(n * m * (n + m + 1) / 12.0)
    # Too-small samples cannot reach the level: fall back to the range of the differences.
    k = max(1, math.floor(n * m / 2.0 - z * sd - 0.5) + 1)
    return k, n * m + 1 - k


def _pairwise_order_stats(xs: FloatArray, ys: FloatArray, ranks: list[int]) -> list[float]:
    """The ``k``-th smallest of ``ys[j] - xs[i]`` for each 1-based ``k`` (both inputs sorted)."""
    k = np.asarray(ranks, dtype=np.int64)
    lo = np.full(k.shape, ys[0] - xs[-1] - 1.0)
    hi = np.full(k.shape, ys[-1] - xs[0] + 1.0)  # margins keep rounding from losing extremes
    c_lo, c_hi = np.zeros_like(k), np.full(k.shape, xs.size * ys.size)
    budget = 4 * (xs.size + ys.size)  # few enough candidates to enumerate and sort
    for _ in range(200):
        narrow = (c_hi - c_lo <= budget) | (hi - lo <= 1e-12 * (1.0 + np.abs(hi)))
        if narrow.all():
            break
        mid = (lo + hi) / 2.0
        c_mid = _count_at_most(xs, ys, mid)
        up = c_mid >= k  # invariant: count(lo) < k <= count(hi)
        hi, c_hi = np.where(up, mid, hi), np.where(up, c_mid, c_hi)
        lo, c_lo = np.where(up, lo, mid), np.where(up, c_lo, c_mid)
    return [_select_between(xs, ys, *args) for args in zip(lo, hi, k - c_lo, c_hi - c_lo)]


def _count_at_most(xs: FloatArray, ys: FloatArray, d: FloatArray) -> npt.NDArray[np.int64]:
    """How many pairwise differences ``ys[j] - xs[i]`` are <= each threshold in ``d``."""
    below = np.searchsorted(xs, ys[None, :] - d[:, None], side="left")
    return np.asarray(xs.size * ys.size - below.sum(axis=1), dtype=np.int64)


def _select_between(
    xs: FloatArray, ys: FloatArray, lo: float, hi: float, rank: int, n_between: int
) -> float:
    """The ``rank``-th smallest pairwise difference in ``(lo, hi]``."""
    if n_between > 4 * (xs.size + ys.size):
        return float(hi)  # a tie: every difference left in (lo, hi] equals hi
    start = np.searchsorted(xs, ys - hi, side="left")
    stop = np.searchsorted(xs, ys - lo, side="left")
    lengths = stop - start
    if lengths.sum() == 0:
        return float(hi)
    j = np.repeat(np.arange(ys.size), lengths)
    i = np.arange(lengths.sum()) + np.repeat(start - np.cumsum(lengths) + lengths, lengths)
    diffs = np.sort(ys[j] - xs[i])
    return float(diffs[min(max(rank - 1, 0), diffs.size - 1)])


def _order_quantile(sorted_x: FloatArray, q: float) -> float:
    """The ``q`` quantile as the ``ceil(q * n)``-th smallest value (the inverted CDF)."""
    return float(sorted_x[max(1, math.ceil(q * sorted_x.size)) - 1])


def _bootstrap_quantile(sorted_x: FloatArray, q: float, seed: int) -> FloatArray:
    """``N_BOOTSTRAP`` draws of the ``q`` quantile of a resample of ``sorted_x``."""
    n = sorted_x.size
    k = max(1, math.ceil(q * n))
    # A resample's k-th smallest value is <= x_(j) exactly when at least k of its n draws land
    # at or below x_(j), a Binomial(n, j / n) event. Sampling that distribution directly is
    # the exact bootstrap of the order statistic at O(n) cost instead of O(N_BOOTSTRAP * n).
    cdf = stats.binom.sf(k - 1, n, np.arange(1, n + 1) / n)
    draws = np.random.default_rng(seed).random(N_BOOTSTRAP)
    return sorted_x[np.minimum(np.searchsorted(cdf, draws, side="left"), n - 1)]


def _verdict(
    p_value: float,
    median_ci: tuple[float, float],
    p95_ci: tuple[float, float],
    tolerance: float,
    alpha: float,
) -> tuple[bool, str]:
    """The regression flag and a sentence saying why."""
    limit = 1.0 + tolerance
    level = f"{100 * (1 - 2 * alpha):.0f}%"
    median_txt = f"median x{median_ci[0]:.3f}-{median_ci[1]:.3f}"
    p95_txt = f"p95 x{p95_ci[0]:.3f}-{p95_ci[1]:.3f}"
    if p_value >= alpha:
        return False, f"not significant: Mann-Whitney p={p_value:.3g} >= alpha={alpha}"
    beyond = [txt for txt, ci in ((median_txt, median_ci), (p95_txt, p95_ci)) if ci[0] > limit]
    if beyond:
        return True, (
            f"regression: {' and '.join(beyond)} ({level} CI) wholly above x{limit:.2f}; "
            f"Mann-Whitney p={p_value:.3g}"
        )
    return False, (
        f"within tolerance: {median_txt}, {p95_txt} ({level} CI) not wholly above "
        f"x{limit:.2f} although Mann-Whitney p={p_value:.3g}"
    )


def _no_verdict(
    n_base: int, n_rec: int, tolerance: float, alpha: float, reason: str
) -> ShiftResult:
    return ShiftResult(
        status="insufficient_data",
        regressed=False,
        n_baseline=n_base,
        n_recent=n_rec,
        p_value=None,
        u_statistic=None,
        median_ratio=None,
        median_ci=None,
        p95_baseline=None,
        p95_recent=None,
        p95_ratio=None,
        p95_ci=None,
        tolerance=tolerance,
        alpha=alpha,
        reason=reason,
    )


# --- one two-sided verdict of a challenger against a champion ---------------------------


@dataclass(frozen=True)
class LatencyEffect:
    """One verdict on a challenger's latency against the champion's, in one direction.

    ``median_ratio`` is challenger / champion (below 1: faster) with a two-sided ``1 - alpha``
    interval (95 % at the default ``alpha``), as is ``p95_ratio``; ``p_value`` is the
    two-sided Mann-Whitney p-value, so ``direction`` is ``faster`` or ``slower`` exactly when
    ``p_value < alpha``, and ``no_difference`` otherwise. ``regressed``: slower with the whole
    median or p95 interval above ``1 + tolerance``. ``improved``: faster with the whole median
    interval below ``1 / (1 + margin)``. ``reason`` says it in one line, e.g. ``challenger
    faster: median x1.36 [1.35, 1.38], p50 3.10 -> 2.28 ms, Mann-Whitney p < 1e-100``.
    """

    status: str  # ok | insufficient_data
    direction: str  # faster | slower | no_difference | insufficient_data
    regressed: bool
    improved: bool
    n_champion: int
    n_challenger: int
    p_value: float | None
    median_ratio: float | None
    median_ci: tuple[float, float] | None
    p50_champion: float | None
    p50_challenger: float | None
    p95_champion: float | None
    p95_challenger: float | None
    p95_ratio: float | None
    p95_ci: tuple[float, float] | None
    confidence: float
    tolerance: float
    margin: float
    alpha: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable fields (intervals become lists), with ``effect``: the
        median factor and its interval in the verdict's direction (see :meth:`effect`)."""
        out = _with_list_intervals(asdict(self))
        eff = self.effect()
        out["effect"] = {"estimate": eff[1], "ci": list(eff[2])} if eff else None
        return out

    def effect(self) -> tuple[str, float, tuple[float, float]] | None:
        """The median effect in the verdict's direction: ``("faster", 1.36, (1.35, 1.38))``.

        A faster challenger's factor is champion / challenger, so it always reads as "x > 1".
        """
        if self.median_ratio is None or self.median_ci is None:
            return None
        factor, ci = directed(self.median_ratio, self.median_ci, self.direction == "faster")
        return ("faster" if self.direction == "faster" else "slower"), factor, ci


def latency_effect(
    champion: npt.ArrayLike,
    challenger: npt.ArrayLike,
    *,
    tolerance: float = 0.10,
    margin: float = 0.0,
    alpha: float = 0.05,
    min_samples: int = 50,
    max_points: int = 5000,
    seed: int = 0,
) -> LatencyEffect:
    """Compare a challenger's latencies (ms) with the champion's: one direction, one interval.

    The same Hodges-Lehmann shift and Moses interval as :func:`compare_latencies`, two-sided
    at level ``1 - alpha`` (each one-sided test at ``alpha / 2``), so the error-rate and
    fidelity tests, at ``1 - alpha`` too, are read at one confidence level. Pass per-call
    latencies, or :func:`monitor.sketch.interpolated` histograms: tied values (raw bucket
    representatives) put the estimate on an interval bound.

    Raises:
        ConfigError: a setting is invalid.

    >>> rng = np.random.default_rng(1)
    >>> e = latency_effect(rng.lognormal(np.log(3.1), 0.2, 2000),
    ...                    rng.lognormal(np.log(2.3), 0.2, 2000))
    >>> e.direction, e.improved, e.reason.split(":")[0]
    ('faster', True, 'challenger faster')
    """
    _check_settings(tolerance, alpha, min_samples, max_points)
    if not (isinstance(margin, (int, float)) and 0.0 <= margin < 10.0):
        raise ConfigError(f"margin={margin!r} is invalid: use a fraction in [0, 10), e.g. 0.0")
    base, n_base = _thin(champion, None, max_points, "champion")
    new, n_new = _thin(challenger, None, max_points, "challenger")
    empty = LatencyEffect(
        "insufficient_data", "insufficient_data", False, False, n_champion=n_base,
        n_challenger=n_new, p_value=None, median_ratio=None, median_ci=None, p50_champion=None,
        p50_challenger=None, p95_champion=None, p95_challenger=None, p95_ratio=None,
        p95_ci=None, confidence=1.0 - alpha, tolerance=tolerance, margin=margin, alpha=alpha,
        reason="",
    )  # fmt: skip
    short = [(n, arm) for n, arm in ((n_base, "champion"), (n_new, "challenger"))
             if n < min_samples]  # fmt: skip
    if short:
        n, arm = short[0]
        return replace(
            empty, reason=f"insufficient data: {n:,} of {min_samples:,} calls in the {arm} arm"
        )
    shift = mann_whitney_hl(np.log(base), np.log(new), alpha / 2.0)
    p_faster = float(stats.mannwhitneyu(new, base, alternative="less").pvalue)
    p_value = min(1.0, 2.0 * min(shift.p_value, p_faster if np.isfinite(p_faster) else 1.0))
    ratio, ci = math.exp(shift.shift), (math.exp(shift.ci[0]), math.exp(shift.ci[1]))
    boot = _bootstrap_quantile(new, P95, seed) / _bootstrap_quantile(base, P95, seed + 1)
    p95_ci = tuple(float(v) for v in np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0]))
    # Quantiles shown come from every call, not the thinned sample, so they match a table
    # of the same calls (``np.quantile(..., method="inverted_cdf")``).
    (p50_base, p95_base), (p50_new, p95_new) = (
        _full_quantiles(x, (0.5, P95)) for x in (champion, challenger)
    )
    direction = "no_difference" if p_value >= alpha else ("slower" if ratio > 1.0 else "faster")
    limit = 1.0 + tolerance
    regressed = direction == "slower" and (ci[0] > limit or p95_ci[0] > limit)
    improved = direction == "faster" and ci[1] < 1.0 / (1.0 + margin)
    effect = replace(
        empty, status="ok", direction=direction, regressed=regressed, improved=improved,
        p_value=p_value, median_ratio=ratio, median_ci=ci,
        p50_champion=p50_base, p50_challenger=p50_new,
        p95_champion=p95_base, p95_challenger=p95_new, p95_ratio=p95_new / p95_base,
        p95_ci=(p95_ci[0], p95_ci[1]),
    )  # fmt: skip
    return replace(effect, reason=_effect_reason(effect))


def _full_quantiles(values: npt.ArrayLike, qs: tuple[float, ...]) -> list[float]:
    x = np.asarray(values, dtype=np.float64).ravel()
    x = np.maximum(x[np.isfinite(x) & (x >= 0.0)], MIN_LATENCY_MS)
    return [float(v) for v in np.quantile(x, qs, method="inverted_cdf")]


def format_effect(value: float, ci: tuple[float, float]) -> str:
    """``x1.36 [1.35, 1.38]``, with as many decimals as keep the estimate off the bounds.

    >>> format_effect(1.3612, (1.3549, 1.3771))
    'x1.36 [1.35, 1.38]'
    >>> format_effect(1.3612, (1.3571, 1.3649))
    'x1.361 [1.357, 1.365]'
    """
    for digits in (2, 3, 4):
        lo, mid, hi = (f"{v:.{digits}f}" for v in (ci[0], value, ci[1]))
        if lo != mid != hi:
            break
    return f"x{mid} [{lo}, {hi}]"


def format_p(p: float) -> str:
    """``p=0.041``, ``p=3.2e-07``, or ``p < 1e-100`` below what a float test can resolve."""
    if p < 1e-100:
        return "p < 1e-100"
    return f"p={p:.2g}" if p >= 1e-3 else f"p={p:.1e}"


def directed(
    ratio: float, ci: tuple[float, float], faster: bool
) -> tuple[float, tuple[float, float]]:
    """A challenger / champion ratio and its interval as the text reads them: inverted for a
    faster challenger, so "x1.36" means 36 % faster."""
    if faster:
        return 1.0 / ratio, (1.0 / ci[1], 1.0 / ci[0])
    return ratio, (ci[0], ci[1])


def _effect_reason(e: LatencyEffect) -> str:
    eff = e.effect()
    assert eff is not None and e.p_value is not None
    label, factor, ci = eff
    head = {"faster": "challenger faster", "slower": "challenger slower",
            "no_difference": "no significant difference"}[e.direction]  # fmt: skip
    if e.direction == "slower" and not e.regressed:
        head += f", within the x{1 + e.tolerance:.2f} tolerance"
    elif e.regressed:
        head += f", beyond the x{1 + e.tolerance:.2f} tolerance"
    noun = "median" if e.direction != "no_difference" else "median ratio"
    if e.direction == "no_difference":
        factor, ci = e.median_ratio or 1.0, e.median_ci or (1.0, 1.0)
    p95 = f"p95 {e.p95_champion:.3g} -> {e.p95_challenger:.3g} ms"
    if e.p95_ratio is not None and e.p95_ci is not None:  # the tail's own interval
        p95 += f" ({format_effect(*directed(e.p95_ratio, e.p95_ci, e.direction == 'faster'))})"
    return (
        f"{head}: {noun} {format_effect(factor, ci)} ({100 * e.confidence:.0f} % CI), "
        f"p50 {e.p50_champion:.3g} -> {e.p50_challenger:.3g} ms, {p95}, "
        f"Mann-Whitney {format_p(e.p_value)}"
    )


def _with_list_intervals(out: dict[str, object]) -> dict[str, object]:
    """``median_ci`` and ``p95_ci`` tuples as lists, for JSON."""
    for key in ("median_ci", "p95_ci"):
        value = out.get(key)
        if isinstance(value, tuple):
            out[key] = list(value)
    return out
