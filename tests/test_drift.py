"""Drift verdicts from Evidently on synthetic windows, including bad data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitor.drift import ColumnDrift, DriftResult, compute_drift
from monitor.errors import ConfigError

COLUMNS = [f"f{i}" for i in range(8)]


def numeric_frame(n: int, seed: int, shift: dict[str, float] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(COLUMNS))), columns=COLUMNS)
    for column, amount in (shift or {}).items():
        frame[column] += amount
    return frame


def by_name(result: DriftResult) -> dict[str, ColumnDrift]:
    return {c.column: c for c in result.columns}


def test_shifted_column_is_detected() -> None:
    result = compute_drift(numeric_frame(1000, 1), numeric_frame(1000, 2, {"f3": 0.5}))
    assert result.status == "ok"
    assert result.drift_detected
    assert result.drifted_columns == ["f3"]
    assert result.share_drifted == pytest.approx(1 / 8)
    f3 = by_name(result)["f3"]
    assert (f3.kind, f3.method, f3.status) == ("numeric", "ks", "ok")
    assert f3.score is not None and f3.threshold is not None and f3.score <= f3.threshold
    assert f3.evidently_drifted is True
    assert result.message.startswith("drift detected: 1 of 8 tested columns drifted (f3)")


def test_same_distribution_has_no_drift() -> None:
    result = compute_drift(numeric_frame(1000, 3), numeric_frame(1000, 4))
    assert result.status == "ok"
    assert not result.drift_detected
    assert result.drifted_columns == []
    assert all(c.score is not None and c.score > c.threshold for c in result.columns)  # type: ignore[operator]
    assert result.message.startswith("no dataset drift: 0 of 8 tested columns drifted")


def test_bonferroni_threshold_and_sampling() -> None:
    result = compute_drift(
        numeric_frame(1000, 5), numeric_frame(800, 6), correction="bonferroni", max_rows=200
    )
    assert {c.threshold for c in result.columns} == {0.05 / 8}
    assert (result.n_reference, result.n_current) == (1000, 800)
    assert "compared 200 of 1000 reference and 200 of 800 current rows" in result.message
    assert "Bonferroni" in result.method_note


def test_unseen_category_drifts_with_a_note() -> None:
    rng = np.random.default_rng(7)
    reference = pd.DataFrame({"country": rng.choice(["fr", "de", "it"], 600)})
    current = pd.DataFrame({"country": rng.choice(["fr", "de", "it", "es"], 600)})
    column = by_name(compute_drift(reference, current))["country"]
    assert (column.kind, column.method, column.status) == ("categorical", "chi2_homogeneity", "ok")
    assert column.drifted
    assert column.note.startswith("categories unseen in reference: es (")


def test_same_category_mix_does_not_drift() -> None:
    rng = np.random.default_rng(8)
    probs = [0.5, 0.3, 0.15, 0.05]
    reference = pd.DataFrame({"plan": rng.choice(list("abcd"), 2000, p=probs)})
    current = pd.DataFrame({"plan": rng.choice(list("abcd"), 2000, p=probs)})
    result = compute_drift(reference, current)
    assert not result.drift_detected
    assert by_name(result)["plan"].score > 0.05  # type: ignore[operator]


@pytest.fixture(scope="module")
def bad_data_result() -> DriftResult:
    """One comparison whose columns hold every kind of bad data next to a good one."""
    rng = np.random.default_rng(9)
    n = 300
    reference = pd.DataFrame(
        {
            "good": rng.normal(size=n),
            "constant": 3.0,
            "all_nan_ref": np.nan,
            "some_nan": rng.normal(size=n),
            "mostly_nan": np.where(np.arange(n) < 10, 1.0, np.nan),
            "dropped": rng.normal(size=n),
            "retyped": rng.normal(size=n),
            "with_inf": rng.normal(size=n),
            "when": pd.date_range("2026-01-01", periods=n, freq="min"),
        }
    )
    current = pd.DataFrame(
        {
            "good": rng.normal(size=n),
            "constant": 3.0,
            "all_nan_ref": rng.normal(size=n),
            "some_nan": np.where(rng.random(n) < 0.25, np.nan, rng.normal(size=n)),
            "mostly_nan": rng.normal(size=n),
            "retyped": [f"v{i}" for i in range(n)],
            "with_inf": np.where(np.arange(n) < 5, np.inf, rng.normal(size=n)),
            "added": rng.normal(size=n),
            "when": pd.date_range("2026-02-01", periods=n, freq="min"),
        }
    )
    return compute_drift(reference, current)


@pytest.mark.parametrize(
    ("column", "status", "note"),
    [
        ("good", "ok", ""),
        ("constant", "constant", "constant 3.0 in both windows"),
        ("all_nan_ref", "all_nan", "every value is missing in the reference window (300 rows)"),
        ("some_nan", "ok", "missing values ignored: 0.0% of reference, "),
        (
            "mostly_nan",
            "insufficient_data",
            "insufficient data: 10 of 30 non-missing rows in the reference window",
        ),
        ("dropped", "missing_in_current", "column absent from the current window"),
        ("added", "missing_in_reference", "column absent from the reference window"),
        ("retyped", "type_mismatch", "numeric in reference but object in current"),
        ("with_inf", "ok", "missing values ignored: 0.0% of reference, 1.7% of current"),
        ("when", "unsupported_type", "dates and durations are not compared"),
    ],
)
def test_bad_data_gets_a_status_and_a_note(
    bad_data_result: DriftResult, column: str, status: str, note: str
) -> None:
    result = by_name(bad_data_result)[column]
    assert result.status == status
    assert result.note.startswith(note)
    assert result.drifted is False
    assert (result.score is None) == (status != "ok")


def test_bad_data_still_gives_a_dataset_verdict(bad_data_result: DriftResult) -> None:
    assert bad_data_result.status == "ok"
    assert not bad_data_result.drift_detected
    assert "0 of 3 tested columns drifted; 7 column(s) not tested" in bad_data_result.message
    json.dumps(bad_data_result.to_dict())


@pytest.mark.parametrize(
    ("n_ref", "n_cur", "message"),
    [
        (0, 500, "insufficient data: 0 of 30 rows in the reference window"),
        (500, 12, "insufficient data: 12 of 30 rows in the current window"),
    ],
)
def test_small_window_gives_insufficient_data(n_ref: int, n_cur: int, message: str) -> None:
    result = compute_drift(numeric_frame(n_ref, 10), numeric_frame(n_cur, 11))
    assert result.status == "insufficient_data"
    assert result.message == message
    assert not result.drift_detected and result.columns == []


def test_no_testable_column_is_reported() -> None:
    reference = pd.DataFrame({"a": [1.0] * 50, "b": [np.nan] * 50})
    current = pd.DataFrame({"a": [1.0] * 50, "c": [2.0] * 50})
    result = compute_drift(reference, current)
    assert result.status == "no_columns"
    assert result.message == (
        "no column could be compared: a: constant; b: missing_in_current; c: missing_in_reference"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha=1\.5 is invalid"),
        ({"correction": "holm"}, "correction='holm' is invalid: use one of fdr_bh, bonferroni"),
        ({"drift_share": -0.2}, r"drift_share=-0\.2 is invalid"),
        ({"min_rows": 2}, "min_rows=2 is invalid"),
        ({"max_rows": 10}, r"max_rows=10 is invalid: use an integer >= min_rows \(30\)"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_drift(numeric_frame(50, 12), numeric_frame(50, 13), **kwargs)  # type: ignore[arg-type]


def test_non_dataframe_input_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="current is a list: pass a pandas DataFrame"):
        compute_drift(numeric_frame(50, 14), [1, 2, 3])  # type: ignore[arg-type]
