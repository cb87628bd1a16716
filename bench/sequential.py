"""The mSPRT error-rate test under repeated looks: false alarms and samples to a decision.

Run from the repository root: ``.venv/bin/python bench/sequential.py`` (about a minute on two
cores) or ``--quick`` (seconds, coarser). Every simulated A/B test looks at its cumulative
counts every ``STEP`` calls per arm up to ``HORIZON``; the mSPRT is
:mod:`monitor.sequential`'s, vectorised over simulations (a cross-check against
``ErrorRateTest`` runs first). Prints Markdown; bench/README.md records a run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import numpy.typing as npt
from scipy import stats

from monitor.sequential import ErrorRateTest, difference_variance, mixture_log_lr

ALPHA = 0.05
POWER = 0.8
STEP = 100
HORIZON = 20_000
MIN_SAMPLES = 100  # ErrorRateTest's default
TAUS = (0.005, 0.01, 0.02)
NULL_RATES = (0.001, 0.01, 0.05, 0.2)
BASE_RATE = 0.01
PLANNED_RATE = 0.02  # the fixed-horizon test is sized for 1 % vs 2 %
ALT_RATES = (0.015, 0.02, 0.03)
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Looks:
    """Cumulative counts of ``sims`` simulated tests at every look (shape sims x looks)."""

    n: IntArray
    errors_a: IntArray
    errors_b: IntArray


def simulate(rate_a: float, rate_b: float, sims: int, seed: int) -> Looks:
    """Binomial increments per look, accumulated: the counts a dashboard would read."""
    rng = np.random.default_rng(seed)
    looks = HORIZON // STEP
    ea = rng.binomial(STEP, rate_a, size=(sims, looks)).cumsum(axis=1)
    eb = rng.binomial(STEP, rate_b, size=(sims, looks)).cumsum(axis=1)
    return Looks(STEP * np.arange(1, looks + 1), ea, eb)


def msprt_rejects(looks: Looks, tau: float) -> BoolArray:
    """Where the mSPRT's always-valid p-value is <= ALPHA (once true, it stays decided)."""
    d = (looks.errors_b - looks.errors_a) / looks.n
    v = difference_variance(looks.n, looks.errors_a, looks.n, looks.errors_b)
    reject = mixture_log_lr(d, v, tau) >= math.log(1.0 / ALPHA)
    return np.asarray(reject & (looks.n >= MIN_SAMPLES))


def z_rejects(looks: Looks) -> BoolArray:
    """Where a fixed-horizon two-sided pooled z-test at ALPHA rejects, read at that look."""
    pooled = (looks.errors_a + looks.errors_b) / (2.0 * looks.n)
    se = np.sqrt(pooled * (1.0 - pooled) * 2.0 / looks.n)
    diff = np.abs(looks.errors_b - looks.errors_a) / looks.n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.nan_to_num(diff / se) > stats.norm.ppf(1.0 - ALPHA / 2.0))


def fixed_horizon_n(rate_a: float, rate_b: float, power: float = POWER) -> int:
    """Calls per arm for a two-sided two-proportion z-test at ALPHA with ``power``."""
    za, zb = stats.norm.ppf(1.0 - ALPHA / 2.0), stats.norm.ppf(power)
    mean = (rate_a + rate_b) / 2.0
    spread = za * math.sqrt(2.0 * mean * (1.0 - mean)) + zb * math.sqrt(
        rate_a * (1.0 - rate_a) + rate_b * (1.0 - rate_b)
    )
    return math.ceil((spread / (rate_b - rate_a)) ** 2)


def z_power(rate_a: float, rate_b: float, n: int) -> float:
    """Power of that z-test with ``n`` calls per arm (normal approximation)."""
    za = stats.norm.ppf(1.0 - ALPHA / 2.0)
    mean = (rate_a + rate_b) / 2.0
    se0 = math.sqrt(2.0 * mean * (1.0 - mean) / n)
    se1 = math.sqrt((rate_a * (1.0 - rate_a) + rate_b * (1.0 - rate_b)) / n)
    return float(stats.norm.cdf((abs(rate_b - rate_a) - za * se0) / se1))


def cross_check(seed: int) -> str:
    """The vectorised mSPRT and ErrorRateTest stop at the same look on 20 simulated tests."""
    looks = simulate(BASE_RATE, PLANNED_RATE, 20, seed)
    vectorised = msprt_rejects(looks, 0.01)
    agree = 0
    for i in range(20):
        test = ErrorRateTest(alpha=ALPHA, tau=0.01, min_samples=MIN_SAMPLES)
        decided = [
            test.update(int(n), int(a), int(n), int(b)).decision != "continue"
            for n, a, b in zip(looks.n, looks.errors_a[i], looks.errors_b[i])
        ]
        first = np.argmax(vectorised[i]) if vectorised[i].any() else -1
        agree += (decided.index(True) if any(decided) else -1) == first
    return f"Cross-check: vectorised mSPRT and `ErrorRateTest` stop at the same look in {agree}/20."


def type_one_error(sims: int, seed: int) -> str:
    """False-alarm rates under equal error rates, looking every STEP calls."""
    head = " | ".join(f"mSPRT tau={t}" for t in TAUS)
    rows = [
        f"| error rate | {head} | z-test, peek every look | z-test, read once at {HORIZON:,} |",
        "|---" * (3 + len(TAUS)) + "|",
    ]
    for k, rate in enumerate(NULL_RATES):
        looks = simulate(rate, rate, sims, seed + k)
        cells = [f"{msprt_rejects(looks, tau).any(axis=1).mean():.4f}" for tau in TAUS]
        z = z_rejects(looks)
        rows.append(
            f"| {rate:.1%} | {' | '.join(cells)} | {z.any(axis=1).mean():.4f} "
            f"| {z[:, -1].mean():.4f} |"
        )
    return "\n".join(rows)


def samples_to_decision(sims: int, seed: int) -> str:
    """Calls per arm until the mSPRT decides, against fixed-horizon sample sizes."""
    planned = fixed_horizon_n(BASE_RATE, PLANNED_RATE)
    rows = [
        "| challenger rate | tau | mSPRT power by 20k | mean n (cap 20k) | median n "
        "| 80th pct n | fixed n, 80 % power | fixed n, the mSPRT's power | power of fixed "
        f"n={planned:,} (sized for 1 % vs 2 %) |",
        "|---" * 9 + "|",
    ]
    for k, rate_b in enumerate(ALT_RATES):
        looks = simulate(BASE_RATE, rate_b, sims, seed + 100 + k)
        for tau in TAUS:
            stop = _stopping_n(msprt_rejects(looks, tau), looks.n)
            decided = np.isfinite(stop)
            capped = np.where(decided, stop, HORIZON)
            p80 = np.quantile(np.where(decided, stop, np.inf), POWER)
            rows.append(
                f"| {rate_b:.1%} | {tau} | {decided.mean():.3f} | {capped.mean():,.0f} "
                f"| {np.median(capped):,.0f} | {_fmt_n(p80)} "
                f"| {fixed_horizon_n(BASE_RATE, rate_b):,} "
                f"| {fixed_horizon_n(BASE_RATE, rate_b, min(decided.mean(), 0.999)):,} "
                f"| {z_power(BASE_RATE, rate_b, planned):.2f} |"
            )
    return "\n".join(rows)


def _stopping_n(reject: BoolArray, n: IntArray) -> npt.NDArray[np.float64]:
    """Calls per arm at the first rejecting look; inf where the test never decided."""
    first = np.argmax(reject, axis=1)
    return np.where(reject.any(axis=1), n[first].astype(np.float64), np.inf)


def _fmt_n(x: float) -> str:
    return f"{x:,.0f}" if np.isfinite(x) else f"> {HORIZON:,}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}; {os.cpu_count()} CPUs (nproc), {cpu}; Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 instead of 20,000 sims")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    sims = 1000 if args.quick else 20_000
    print(f"## mSPRT (bench/sequential.py{' --quick' if args.quick else ''})\n\n{machine()}\n")
    print(
        f"{sims:,} simulated tests per row; a look every {STEP} calls per arm up to "
        f"{HORIZON:,}; alpha {ALPHA}; mSPRT min_samples {MIN_SAMPLES}.\n"
    )
    print(cross_check(args.seed) + "\n")
    sections = [
        (
            "False alarms under repeated looks (equal rates)",
            lambda: type_one_error(sims, args.seed),
        ),
        (
            f"Calls per arm to a decision (champion {BASE_RATE:.0%})",
            lambda: samples_to_decision(sims, args.seed),
        ),
    ]
    for title, run in sections:
        start = time.perf_counter()
        body = run()
        print(f"### {title} ({time.perf_counter() - start:.0f} s)\n\n{body}\n", flush=True)


if __name__ == "__main__":
    main()
