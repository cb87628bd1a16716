"""Quality and cost of the detectors: latency regressions and data drift.

Run from the repository root: ``.venv/bin/python bench/detection.py`` (a few minutes on two
cores) or ``--quick`` (under a minute, coarse). Prints Markdown tables; every number is
measured in this process. ``bench/README.md`` records a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from scipy import stats

from monitor.drift import DriftResult, compute_drift
from monitor.stats import compare_latencies

MEDIAN_MS = 50.0
N_NUMERIC = 20
CATEGORIES = ["a", "b", "c", "d"]
CAT_PROBS = [0.4, 0.3, 0.2, 0.1]
CAT_PROBS_SHIFTED = [0.32, 0.3, 0.22, 0.16]
RULES = (
    "BH (default)",
    "BH at alpha 0.01",
    "Bonferroni",
    "uncorrected, any column",
    "uncorrected, share >= 0.5 (preset rule)",
)


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    streams: int
    calls_per_window: int
    baseline_windows: int
    max_windows: int
    drift_null_trials: int
    drift_shift_trials: int
    drift_rows: int
    cost_rows: int
    cost_repeats: int


FULL = Config(150, 1000, 4, 8, 100, 40, 1000, 50_000, 3)
QUICK = Config(30, 1000, 4, 8, 20, 10, 1000, 50_000, 1)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# --- latency -------------------------------------------------------------------------------


def latency_stream(
    rng: np.random.Generator, sigma: float, factor: float, tolerance: float, cfg: Config
) -> list[bool]:
    """Flags of successive 15-minute windows after a change, against the hour before it.

    A shifted stream stops at its first flag (that is its delay); a stable one runs them all.
    """
    n = cfg.calls_per_window
    baseline = rng.lognormal(np.log(MEDIAN_MS), sigma, cfg.baseline_windows * n)
    flags = []
    for window in range(cfg.max_windows):
        recent = rng.lognormal(np.log(MEDIAN_MS * factor), sigma, n)
        flags.append(
            compare_latencies(baseline, recent, tolerance=tolerance, seed=window).regressed
        )
        if flags[-1] and factor != 1.0:
            break
    return flags


def bench_latency(cfg: Config) -> str:
    scenarios = [(1.0, 0.10), (1.10, 0.10), (1.20, 0.10), (1.30, 0.10), (1.0, 0.05), (1.10, 0.05)]
    rows = []
    for sigma in (0.1, 0.3, 0.6):
        for factor, tolerance in scenarios:
            rng = np.random.default_rng(int(sigma * 1000 + factor * 100 + tolerance * 10_000))
            streams = [
                latency_stream(rng, sigma, factor, tolerance, cfg) for _ in range(cfg.streams)
            ]
            rows.append(_latency_row(sigma, factor, tolerance, streams))
    header = [
        "sigma",
        "shift",
        "tolerance",
        "streams",
        "detected within 8 windows",
        "median delay (windows)",
        "false alarms per window",
        "streams with any false alarm",
    ]
    return table(header, rows)


def _latency_row(
    sigma: float, factor: float, tolerance: float, streams: list[list[bool]]
) -> list[object]:
    shift = f"+{100 * (factor - 1):.0f} %" if factor != 1.0 else "none (stable)"
    head: list[object] = [sigma, shift, f"{100 * tolerance:.0f} %", len(streams)]
    if factor == 1.0:
        windows = [flag for s in streams for flag in s]
        any_flag = sum(any(s) for s in streams) / len(streams)
        return head + [
            "-",
            "-",
            f"{sum(windows)}/{len(windows)} = {pct(sum(windows) / len(windows))}",
            pct(any_flag),
        ]
    detected = [s for s in streams if s[-1]]
    delay = f"{statistics.median(len(s) for s in detected):g}" if detected else "-"
    return head + [pct(len(detected) / len(streams)), delay, "-", "-"]


# --- drift, synthetic ----------------------------------------------------------------------


def drift_frame(
    rng: np.random.Generator, n: int, shifted_columns: int = 0, cat_shift: bool = False
) -> pd.DataFrame:
    """20 standard-normal columns and one 4-level categorical; optionally shifted."""
    values = rng.normal(size=(n, N_NUMERIC))
    values[:, :shifted_columns] += 0.5
    frame = pd.DataFrame(values, columns=[f"f{i:02d}" for i in range(N_NUMERIC)])
    frame["cat"] = rng.choice(CATEGORIES, n, p=CAT_PROBS_SHIFTED if cat_shift else CAT_PROBS)
    return frame


def verdicts(result: DriftResult, alpha: float = 0.05) -> dict[str, bool]:
    """Dataset verdicts of several rules on the same per-column p-values."""
    p = np.array([c.score for c in result.columns if c.status == "ok"], dtype=float)
    raw = p <= alpha
    flags = [
        result.drift_detected,
        bool((stats.false_discovery_control(p) <= 0.01).any()),
        bool((p <= alpha / p.size).any()),
        bool(raw.any()),
        bool(raw.mean() >= 0.5),
    ]
    return dict(zip(RULES, flags))


def evidently_chisquare_flag(reference: pd.DataFrame, current: pd.DataFrame) -> bool:
    """Evidently's own chi-square drift flag on the categorical column, for comparison."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    definition = DataDefinition(categorical_columns=["cat"])
    report = Report(
        [ValueDrift(column="cat", method="chisquare", threshold=0.05)], include_tests=True
    )
    snap = report.run(
        Dataset.from_pandas(current[["cat"]], data_definition=definition),
        Dataset.from_pandas(reference[["cat"]], data_definition=definition),
    ).dict()
    return any(t["status"] == "FAIL" for t in snap["tests"])


def bench_drift(cfg: Config) -> str:
    rng = np.random.default_rng(2026)
    scenarios: list[tuple[str, int, dict[str, object]]] = [
        ("same distribution", cfg.drift_null_trials, {}),
        ("0.5 sd shift on 3 of 20 numeric columns", cfg.drift_shift_trials, {"shifted_columns": 3}),
        (
            "categorical shift 40/30/20/10 -> 32/30/22/16 %",
            cfg.drift_shift_trials,
            {"cat_shift": True},
        ),
    ]
    rows = []
    ours_cat = theirs_cat = 0
    for name, trials, kwargs in scenarios:
        counts = dict.fromkeys(RULES, 0)
        for _ in range(trials):
            reference = drift_frame(rng, cfg.drift_rows)
            current = drift_frame(rng, cfg.drift_rows, **kwargs)  # type: ignore[arg-type]
            result = compute_drift(reference, current)
            for rule, flag in verdicts(result).items():
                counts[rule] += flag
            if not kwargs:  # per-column false alarms of the two categorical tests
                cat = next(c for c in result.columns if c.column == "cat")
                ours_cat += cat.score is not None and cat.score <= 0.05
                theirs_cat += evidently_chisquare_flag(reference, current)
        rows.append([name, trials] + [pct(counts[rule] / trials) for rule in RULES])
    n_null = cfg.drift_null_trials
    cat_rows = [
        ["chi2_homogeneity (ours, registered in Evidently)", n_null, pct(ours_cat / n_null)],
        ["chisquare (Evidently built-in)", n_null, pct(theirs_cat / n_null)],
    ]
    header = ["scenario", "trials", *(f"flagged: {rule}" for rule in RULES)]
    cat_header = ["categorical test, same distribution, p <= 0.05", "trials", "column flagged"]
    return table(header, rows) + "\n\n" + table(cat_header, cat_rows)


# --- drift, real time-ordered data ---------------------------------------------------------


def bench_occupancy(window: int = 20) -> str:
    """Where the detector fires on river's Occupancy sensor series (annotated change points).

    Each window of ``window`` rows is compared with the window before it, as a monitor with a
    rolling reference would (``min_rows`` lowered to fit these short windows); the control
    compares the even and odd rows of the same two windows, which share their period.
    """
    from river.drift import datasets

    dataset = datasets.Occupancy()
    frame = pd.DataFrame([y for _, y in dataset]).rename(
        columns={"V1": "temperature", "V2": "humidity", "V3": "light", "V4": "co2"}
    )
    marks = sorted({p for points in dataset.annotations.values() for p in points})
    rows = []
    for start in range(window, len(frame) - window + 1, window):
        both = frame.iloc[start - window : start + window]
        before, after = frame.iloc[start - window : start], frame.iloc[start : start + window]
        result = compute_drift(before, after, min_rows=window)
        control = compute_drift(both.iloc[::2], both.iloc[1::2], min_rows=window)
        near = [p for p in marks if start - window <= p < start + window]
        rows.append(
            [
                f"{start}-{start + window - 1}",
                "yes" if result.drift_detected else "no",
                ", ".join(result.drifted_columns) or "-",
                ", ".join(map(str, near)) or "none",
                "yes" if control.drift_detected else "no",
            ]
        )
    header = [
        f"rows (vs previous {window})",
        "drift",
        "drifted columns",
        "annotated change points in the compared rows",
        "control fires",
    ]
    return f"Occupancy: {len(frame)} rows x {frame.shape[1]} sensors\n\n" + table(header, rows)


# --- cost ----------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def preset_verdicts(
    reference: pd.DataFrame, current: pd.DataFrame, **kwargs: object
) -> dict[str, bool]:
    """Per-column drift flags of Evidently's DataDriftPreset, by column."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(reference.columns))
    snap = (
        Report([DataDriftPreset(**kwargs)], include_tests=True)
        .run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
        .dict()
    )
    return {
        t["metric_config"]["params"]["column"]: t["status"] == "FAIL"
        for t in snap["tests"]
        if "column" in t["metric_config"]["params"]
    }


def bench_cost(cfg: Config) -> str:
    rng = np.random.default_rng(7)
    columns = [f"f{i:02d}" for i in range(N_NUMERIC)]
    shifts = np.zeros(N_NUMERIC)
    shifts[:5] = [0.01, 0.03, 0.05, 0.1, 0.3]  # in standard deviations: tiny to clear
    reference = pd.DataFrame(rng.normal(size=(cfg.cost_rows, N_NUMERIC)), columns=columns)
    current = pd.DataFrame(rng.normal(size=(cfg.cost_rows, N_NUMERIC)) + shifts, columns=columns)
    compute_drift(reference.head(100), current.head(100))  # import Evidently outside the timing
    ours_s, ours = timed(lambda: compute_drift(reference, current), cfg.cost_repeats)
    preset_s, preset = timed(lambda: preset_verdicts(reference, current), cfg.cost_repeats)
    ks_full = compute_drift(reference, current, max_rows=cfg.cost_rows, correction="none")
    preset_ks = preset_verdicts(reference, current, method="ks", threshold=0.05)
    assert isinstance(ours, DriftResult) and isinstance(preset, dict)
    ours_flags = {c.column: c.drifted for c in ours.columns}
    full_flags = {c.column: c.drifted for c in ks_full.columns}
    agree_full = sum(full_flags[c] == preset_ks[c] for c in columns)
    agree_default = sum(ours_flags[c] == preset_ks[c] for c in columns)
    timing = table(
        ["run", f"seconds (median of {cfg.cost_repeats})", "ratio"],
        [
            [
                "compute_drift defaults (5,000-row samples, KS + BH)",
                f"{ours_s:.2f}",
                f"{ours_s / preset_s:.2f}x",
            ],
            ["Evidently DataDriftPreset() defaults, all rows", f"{preset_s:.2f}", "1.00x"],
        ],
    )
    verdict_rows = [
        [
            c,
            f"{shifts[i]:g}",
            _yn(preset_ks[c]),
            _yn(full_flags[c]),
            _yn(ours_flags[c]),
            _yn(preset[c]),
        ]
        for i, c in enumerate(columns[:5])
    ]
    verdict_rows.append(
        [
            "f05..f19 (no shift)",
            "0",
            *(_count(d, columns[5:]) for d in (preset_ks, full_flags, ours_flags, preset)),
        ]
    )
    verdicts_table = table(
        [
            "column",
            "shift (sd)",
            "preset, method=ks, all rows",
            "compute_drift all rows, no correction",
            "compute_drift defaults",
            "preset defaults (Wasserstein 0.1)",
        ],
        verdict_rows,
    )
    agreement = (
        f"Per-column agreement with DataDriftPreset(method='ks'), same data: "
        f"compute_drift on all rows without correction {agree_full}/{N_NUMERIC}; "
        f"compute_drift defaults (sampled, BH) {agree_default}/{N_NUMERIC}."
    )
    shape = f"{cfg.cost_rows:,} x {N_NUMERIC} numeric rows per window"
    return f"{shape}\n\n{timing}\n\n{agreement}\n\n{verdicts_table}"


def _yn(flag: bool) -> str:
    return "drift" if flag else "-"


def _count(flags: dict[str, bool], columns: Sequence[str]) -> str:
    return f"{sum(flags[c] for c in columns)} of {len(columns)} drift"


# --- main ----------------------------------------------------------------------------------


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
    return f"{when}; {os.cpu_count()} CPUs (nproc), {cpu}; Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams and trials")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    warnings.simplefilter("ignore", FutureWarning)
    print(f"## Detection (bench/detection.py{' --quick' if args.quick else ''})\n\n{machine()}\n")
    sections = [
        ("Latency regressions", lambda: bench_latency(cfg)),
        ("Drift, synthetic windows", lambda: bench_drift(cfg)),
        ("Drift on real data", bench_occupancy),
        ("Drift cost", lambda: bench_cost(cfg)),
    ]
    for title, run in sections:
        start = time.perf_counter()
        body = run()
        print(f"### {title} ({time.perf_counter() - start:.0f} s)\n\n{body}\n", flush=True)


if __name__ == "__main__":
    main()
