"""Latency regression verdicts on simulated log-normal latency windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor import sketch
from monitor.errors import ConfigError, InsufficientData
from monitor.stats import (
    compare_latencies,
    format_effect,
    format_p,
    latency_effect,
    mann_whitney_hl,
)


def lognormal(median_ms: float, sigma: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(median_ms), sigma, n)


def test_clear_30_percent_slowdown_is_flagged() -> None:
    result = compare_latencies(lognormal(50, 0.3, 3000, 1), lognormal(65, 0.3, 3000, 2))
    assert result.status == "ok"
    assert result.regressed
    assert result.median_ratio == pytest.approx(1.3, abs=0.03)
    assert result.median_ci is not None and result.median_ci[0] > 1.1
    assert result.p_value is not None and result.p_value < 1e-10
    assert result.reason.startswith("regression: median")


def test_2_percent_shift_is_significant_but_within_tolerance() -> None:
    base = lognormal(50, 0.1, 20000, 3)
    result = compare_latencies(base, lognormal(51, 0.1, 20000, 4))
    assert result.p_value is not None and result.p_value < 0.05
    assert not result.regressed
    assert result.median_ci is not None and result.median_ci[1] < 1.1
    assert result.reason.startswith("within tolerance")


def test_same_distribution_is_not_flagged() -> None:
    result = compare_latencies(lognormal(50, 0.6, 2000, 5), lognormal(50, 0.6, 2000, 6))
    assert not result.regressed
    assert result.median_ci is not None and result.median_ci[0] < 1.0 < result.median_ci[1]


def test_tail_only_slowdown_is_flagged_by_p95() -> None:
    rng = np.random.default_rng(7)
    recent = lognormal(50, 0.2, 5000, 8)
    slow = rng.random(recent.size) < 0.10  # one call in ten takes three times as long
    recent[slow] *= 3.0
    result = compare_latencies(lognormal(50, 0.2, 5000, 9), recent)
    assert result.regressed
    assert result.median_ci is not None and result.median_ci[0] < 1.1
    assert result.p95_ci is not None and result.p95_ci[0] > 1.5
    assert "p95" in result.reason and "median" not in result.reason.split(";")[0]


@pytest.mark.parametrize(
    ("n_base", "n_recent", "reason"),
    [
        (3000, 12, "insufficient data: 12 of 50 rows in the recent window"),
        (0, 3000, "insufficient data: 0 of 50 rows in the baseline window"),
    ],
)
def test_small_window_gives_insufficient_data(n_base: int, n_recent: int, reason: str) -> None:
    result = compare_latencies(lognormal(50, 0.3, n_base, 1), lognormal(90, 0.3, n_recent, 2))
    assert result.status == "insufficient_data"
    assert not result.regressed
    assert result.reason == reason
    assert (result.n_baseline, result.n_recent) == (n_base, n_recent)
    assert result.p_value is None and result.median_ratio is None


def histogram(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values rounded to 2 % log buckets, as bucket values and counts."""
    buckets = np.round(np.log(samples) / np.log(1.02))
    index, counts = np.unique(buckets, return_counts=True)
    return 1.02**index, counts


def test_histogram_counts_agree_with_expanded_raw_values() -> None:
    # Bucket values and counts, as per-interval aggregates hand them over, well past max_points.
    base_values, base_counts = histogram(lognormal(50, 0.3, 12000, 10))
    recent_values, recent_counts = histogram(lognormal(65, 0.3, 9000, 11))
    weighted = compare_latencies(
        base_values, recent_values, baseline_weights=base_counts, recent_weights=recent_counts
    )
    raw = compare_latencies(
        np.repeat(base_values, base_counts), np.repeat(recent_values, recent_counts)
    )
    assert weighted.to_dict() == raw.to_dict()
    assert (weighted.n_baseline, weighted.n_recent) == (12000, 9000)
    assert weighted.regressed
    assert weighted.median_ratio == pytest.approx(1.3, abs=0.03)


def test_weights_below_max_points_equal_repeated_values() -> None:
    values = lognormal(50, 0.3, 300, 11)
    counts = np.random.default_rng(12).integers(0, 4, values.size)
    recent = lognormal(60, 0.3, 500, 13)
    weighted = compare_latencies(values, recent, baseline_weights=counts)
    assert weighted.to_dict() == compare_latencies(np.repeat(values, counts), recent).to_dict()


def test_bad_values_are_dropped_not_fatal() -> None:
    base = np.concatenate([lognormal(50, 0.3, 500, 14), [np.nan, np.inf, -1.0]])
    result = compare_latencies(base, np.concatenate([lognormal(50, 0.3, 500, 15), [0.0]]))
    assert result.status == "ok"
    assert (result.n_baseline, result.n_recent) == (500, 501)


def test_result_is_json_serialisable() -> None:
    result = compare_latencies(lognormal(50, 0.3, 500, 16), lognormal(70, 0.3, 500, 17))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["regressed"] is True
    assert isinstance(data["median_ci"], list) and len(data["median_ci"]) == 2


def test_hodges_lehmann_matches_brute_force() -> None:
    rng = np.random.default_rng(18)
    x, y = rng.normal(0, 1, 41), rng.normal(0.8, 1, 37)
    result = mann_whitney_hl(x, y)
    diffs = np.sort((y[None, :] - x[:, None]).ravel())
    assert result.shift == pytest.approx(np.median(diffs))
    # Moses interval: the k-th smallest and k-th largest differences, k from U's normal approx.
    n_pairs = x.size * y.size
    sd = np.sqrt(n_pairs * (x.size + y.size + 1) / 12)
    k = int(np.floor(n_pairs / 2 - 1.6448536 * sd - 0.5)) + 1
    assert result.ci == (diffs[k - 1], diffs[n_pairs - k])
    assert result.p_value < 0.05


def test_hodges_lehmann_needs_data() -> None:
    with pytest.raises(InsufficientData, match="got 0 and 3"):
        mann_whitney_hl([], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": -0.1}, "tolerance=-0.1"),
        ({"alpha": 0.7}, "alpha=0.7"),
        ({"min_samples": 1}, "min_samples=1"),
        ({"max_points": 10}, "max_points=10"),
        ({"baseline_weights": [1, 2]}, "baseline_weights has 2 counts for 100 values"),
        ({"recent_weights": [-1] * 100}, r"recent_weights contains -1\.0"),
        ({"recent_weights": [0.5] * 100}, r"recent_weights contains 0\.5"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    values = lognormal(50, 0.3, 100, 19)
    with pytest.raises(ConfigError, match=match):
        compare_latencies(values, values, **kwargs)  # type: ignore[arg-type]


# --- one two-sided verdict per comparison (experiments, promotions) ---------------------


def _hist(values: np.ndarray) -> dict[int, int]:
    keys, counts = np.unique(sketch.buckets_of(values), return_counts=True)
    return {int(k): int(c) for k, c in zip(keys, counts)}


def test_a_faster_challenger_reads_as_one_speed_up_with_its_interval() -> None:
    champion, challenger = lognormal(3.1, 0.2, 20000, 20), lognormal(2.3, 0.2, 20000, 21)
    effect = latency_effect(champion, challenger)
    assert (effect.status, effect.direction, effect.improved, effect.regressed) == (
        "ok", "faster", True, False
    )  # fmt: skip
    label, factor, (lo, hi) = effect.effect() or ("", 0.0, (0.0, 0.0))
    assert label == "faster" and lo < factor < hi and factor == pytest.approx(3.1 / 2.3, rel=0.02)
    p95_lo, p95_hi = effect.p95_ci or (1.0, 1.0)
    p95_speed_up = (1 / p95_hi, 1 / p95_lo)  # as the text reads it: champion / challenger
    assert effect.reason == (
        f"challenger faster: median {format_effect(factor, (lo, hi))} (95 % CI), "
        f"p50 {effect.p50_champion:.3g} -> {effect.p50_challenger:.3g} ms, "
        f"p95 {effect.p95_champion:.3g} -> {effect.p95_challenger:.3g} ms "
        f"({format_effect(1 / (effect.p95_ratio or 1.0), p95_speed_up)}), "
        "Mann-Whitney p < 1e-100"
    )
    assert p95_speed_up[0] < 1 / (effect.p95_ratio or 1.0) < p95_speed_up[1]
    assert json.loads(json.dumps(effect.to_dict()))["median_ci"] == list(effect.median_ci or ())


@pytest.mark.parametrize(
    ("median", "tolerance", "direction", "regressed", "head"),
    [
        (4.0, 0.10, "slower", True, "challenger slower, beyond the x1.10 tolerance: median x1.2"),
        (3.2, 0.10, "slower", False, "challenger slower, within the x1.10 tolerance: median x1.0"),
        (3.1, 0.10, "no_difference", False, "no significant difference: median ratio x"),
    ],
)
def test_slower_and_equal_challengers_get_one_direction(
    median: float, tolerance: float, direction: str, regressed: bool, head: str
) -> None:
    effect = latency_effect(
        lognormal(3.1, 0.2, 20000, 22), lognormal(median, 0.2, 20000, 23), tolerance=tolerance
    )
    assert (effect.direction, effect.regressed, effect.improved) == (direction, regressed, False)
    assert effect.reason.startswith(head), effect.reason
    if direction == "no_difference":
        assert effect.p_value is not None and effect.p_value >= 0.025  # each side at alpha / 2
    else:
        assert effect.p_value is not None and effect.p_value < 0.05


def test_too_few_calls_is_its_own_verdict_never_ok() -> None:
    effect = latency_effect(lognormal(3.1, 0.2, 500, 24), lognormal(3.1, 0.2, 22, 25))
    assert (effect.status, effect.direction, effect.regressed, effect.improved) == (
        "insufficient_data", "insufficient_data", False, False
    )  # fmt: skip
    assert effect.reason == "insufficient data: 22 of 50 calls in the challenger arm"
    assert effect.effect() is None


def test_interpolated_histograms_keep_the_estimate_inside_its_interval() -> None:
    champion, challenger = lognormal(3.1, 0.05, 26000, 26), lognormal(2.3, 0.05, 26000, 27)
    truth = latency_effect(champion, challenger)
    h_champ, h_chall = _hist(champion), _hist(challenger)
    # Bucket representatives tie: every pairwise difference is a multiple of the bucket width,
    # so the estimate lands on an interval bound (the "x1.751 [1.751, 1.786]" of issue 12).
    (v1, c1), (v2, c2) = sketch.expand(h_champ), sketch.expand(h_chall)
    tied = latency_effect(np.repeat(v1, c1), np.repeat(v2, c2))
    assert tied.median_ratio in (tied.median_ci or ())
    spread = latency_effect(sketch.interpolated(h_champ), sketch.interpolated(h_chall))
    lo, hi = spread.median_ci or (0.0, 0.0)
    assert lo < (spread.median_ratio or 0.0) < hi
    assert spread.median_ratio == pytest.approx(truth.median_ratio, rel=0.01)
    assert (spread.n_champion, spread.n_challenger) == (26000, 26000)


def test_interpolated_sample_has_the_histograms_counts_and_quantiles() -> None:
    values = lognormal(50, 0.4, 3001, 28)
    hist = _hist(values)
    sample = sketch.interpolated(hist)
    assert sample.size == 3001 and np.all(np.diff(sample) > 0)
    for q in (0.05, 0.5, 0.95):
        assert np.quantile(sample, q) == pytest.approx(np.quantile(values, q), rel=0.02)
    assert sketch.interpolated(hist, max_points=100).size == 100
    assert sketch.interpolated({}).size == 0


def test_effects_print_with_enough_decimals_to_leave_the_bounds() -> None:
    assert format_effect(1.3612, (1.3549, 1.3771)) == "x1.36 [1.35, 1.38]"
    assert format_effect(1.3612, (1.3571, 1.3649)) == "x1.361 [1.357, 1.365]"
    assert format_p(2e-300) == "p < 1e-100" and format_p(0.0412) == "p=0.041"
