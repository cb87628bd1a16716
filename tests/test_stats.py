"""Latency regression verdicts on simulated log-normal latency windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.errors import ConfigError, InsufficientData
from monitor.stats import compare_latencies, mann_whitney_hl


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
