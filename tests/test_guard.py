"""The accuracy guard: verdicts, reasons with numbers, task detection, tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.errors import TunerError
from tuner.guard import AccuracyGuard, Tolerance, detect_task


def logits(n: int = 200, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, classes))


def flip_top1(scores: np.ndarray, rows: int) -> np.ndarray:
    """Return a copy whose first ``rows`` rows have their top class demoted."""
    out = scores.copy()
    for i in range(rows):
        out[i, scores[i].argmax()] = scores[i].min() - 1
    return out


def test_classification_passes_small_noise_and_rejects_flipped_answers() -> None:
    champion = logits()
    labels = champion.argmax(axis=1)
    guard = AccuracyGuard(champion, labels=labels)
    assert guard.task == "classification"
    ok = guard.check(champion + 1e-4)
    assert ok.passed and ok.metrics["top1_agreement"] == 1.0
    assert "top1_agreement 1.0000" in ok.reason
    bad = guard.check(flip_top1(champion, 10))  # 5 % of answers change
    assert not bad.passed
    assert bad.metrics["top1_agreement"] == pytest.approx(0.95)
    assert bad.metrics["accuracy_drop"] == pytest.approx(0.05)
    assert "top1_agreement 0.9500 < 0.9900" in bad.reason
    assert "accuracy_drop 0.0500 > 0.0050" in bad.reason


def test_accuracy_drop_is_absolute_or_relative() -> None:
    champion = logits()
    labels = champion.argmax(axis=1)
    labels[:100] = (labels[:100] + 1) % 10  # champion right on rows 100..199 only: 50 %
    candidate = champion.copy()
    candidate[100:102] = flip_top1(champion[100:102], 2)  # 2 right answers lost: 49 %
    absolute = Tolerance(min_top1_agreement=None, max_accuracy_drop=0.015)
    result = AccuracyGuard(champion, labels=labels, tolerance=absolute).check(candidate)
    assert result.passed and result.metrics["accuracy_drop"] == pytest.approx(0.01)
    relative = Tolerance(
        min_top1_agreement=None, max_accuracy_drop=None, max_relative_accuracy_drop=0.015
    )
    result = AccuracyGuard(champion, labels=labels, tolerance=relative).check(candidate)
    assert not result.passed
    assert "relative_accuracy_drop 0.0200 > 0.0150" in result.reason


def test_embedding_cosine_and_abs_error() -> None:
    rng = np.random.default_rng(1)
    champion = rng.normal(size=(64, 384))
    guard = AccuracyGuard(champion, tolerance=Tolerance(min_min_cosine=0.9, max_abs_error=0.5))
    assert guard.task == "embedding"
    close = guard.check(champion + rng.normal(scale=0.01, size=champion.shape))
    assert close.passed and close.metrics["mean_cosine"] > 0.999
    far = guard.check(champion + rng.normal(scale=1.0, size=champion.shape))
    assert not far.passed
    assert far.metrics["mean_cosine"] < 0.8
    assert "mean_cosine" in far.reason and "< 0.9800" in far.reason
    assert "max_abs_error" in far.reason


def test_regression_relative_error_and_labels() -> None:
    rng = np.random.default_rng(2)
    champion = rng.normal(10, 1, size=(100, 1))
    truth = champion[:, 0] + rng.normal(0, 0.1, size=100)
    guard = AccuracyGuard(champion, labels=truth)
    assert guard.task == "regression"
    assert guard.check(champion * 1.001).passed
    off = guard.check(champion * 1.1)
    assert not off.passed
    assert off.metrics["rel_error"] == pytest.approx(0.1)
    assert "rel_error 0.1000 > 0.0200" in off.reason
    assert "mae" in off.metrics and off.metrics["mae"] > off.metrics["mae_champion"]


def test_disabled_checks_do_not_fail() -> None:
    champion = logits()
    none = Tolerance(
        min_top1_agreement=None,
        min_mean_cosine=None,
        max_rel_error=None,
        max_accuracy_drop=None,
        max_mae_increase=None,
    )
    assert AccuracyGuard(champion, tolerance=none).check(-champion).passed


def test_shape_nan_and_label_mismatch_are_rejected_with_the_values() -> None:
    champion = logits()
    guard = AccuracyGuard(champion)
    shape = guard.check(champion[:, :5])
    assert not shape.passed and "(200, 5)" in shape.reason and "(200, 10)" in shape.reason
    nan = champion.copy()
    nan[3, 3] = np.nan
    result = guard.check(nan)
    assert not result.passed and result.metrics["non_finite"] == 1
    with pytest.raises(TunerError, match="3 labels for 200"):
        AccuracyGuard(champion, labels=np.zeros(3, dtype=np.int64))


def test_detect_task() -> None:
    assert detect_task(np.zeros((4, 10))) == "classification"
    assert detect_task(np.zeros((4, 384))) == "embedding"
    assert detect_task(np.zeros((4, 1))) == "regression"
    assert detect_task(np.zeros(4)) == "regression"
    assert detect_task(np.zeros((4, 500)), np.zeros(4, dtype=np.int64)) == "classification"
    assert detect_task(np.zeros((4, 3)), np.zeros(4, dtype=np.float32)) == "classification"
    assert detect_task(np.zeros((4, 3)), np.full((4, 3), 0.5)) == "regression"
    assert detect_task(np.zeros((4, 1)), np.zeros(4, dtype=np.int64)) == "regression"
    with pytest.raises(TunerError, match=r"labels of shape \(4,\) fit neither"):
        detect_task(np.zeros((4, 3)), np.full(4, 0.5))
    assert AccuracyGuard(np.zeros((4, 10)), task="embedding").task == "embedding"


def test_a_single_score_column_with_class_labels_is_judged_by_its_values() -> None:
    # A binary model with one probability column: inverted answers must fail the guard.
    rng = np.random.default_rng(3)
    champion = rng.uniform(size=(200, 1)).astype(np.float32)
    labels = (champion[:, 0] > 0.5).astype(np.int64)
    guard = AccuracyGuard(champion, labels=labels)
    assert guard.task == "regression" and guard.check(champion).passed
    inverted = guard.check(1.0 - champion)
    assert not inverted.passed and inverted.metrics["mae"] > inverted.metrics["mae_champion"]


def test_result_is_json_ready() -> None:
    import json

    result = AccuracyGuard(logits()).check(logits(seed=1))
    assert json.loads(json.dumps(result.to_dict()))["passed"] is False
    assert json.dumps(Tolerance().to_dict())
