"""Accuracy guard: a candidate must give the reference model's answers on held-out samples.

The reference is the model's source (the version a user registered), never a derived champion:
after drift a stale champion is the degraded model, and agreeing with it proves nothing.

The task decides what "the same answers" means: top-1 agreement for classification, cosine
similarity for embeddings, absolute/relative error for regression; plus accuracy against labels
when they are given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tuner.errors import TunerError

Task = Literal["classification", "embedding", "regression"]
TASKS: tuple[Task, ...] = ("classification", "embedding", "regression")
# Wider outputs are treated as embeddings; pass task= explicitly for 1000-class models.
MAX_AUTO_CLASSES = 128


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate may drift from the reference; ``None`` disables a check.

    Accuracy drops are fractions (0.005 = half a point); ``max_relative_accuracy_drop`` is a
    fraction of the reference's accuracy. ``max_rel_error`` divides the mean absolute error by the
    reference's mean absolute output. ``max_mae_increase`` bounds a regression's MAE against
    labels relative to the reference's MAE. (Metric names keep the historical ``_champion``
    suffix for the reference's own figures: ``accuracy_champion``, ``mae_champion``.)
    """

    min_top1_agreement: float | None = 0.99
    min_mean_cosine: float | None = 0.98
    min_min_cosine: float | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = 0.02
    max_accuracy_drop: float | None = 0.005
    max_relative_accuracy_drop: float | None = None
    max_mae_increase: float | None = 0.05

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Tolerance:
        """A tolerance with ``values`` overriding the defaults (a model's policy holds these).

        >>> Tolerance.from_dict({"min_top1_agreement": 0.995}).min_top1_agreement
        0.995

        Raises:
            TunerError: an unknown field, or a value that is not a number (or null).
        """
        known = set(cls.__dataclass_fields__)
        for key, value in values.items():
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if key not in known or not ok:
                raise TunerError(
                    f"tolerance {key}={value!r} is invalid: use a number (or null to disable) "
                    f"for one of {sorted(known)}"
                )
        return cls(**{k: None if v is None else float(v) for k, v in values.items()})


@dataclass(frozen=True)
class GuardResult:
    """Whether a candidate passed, a reason with the numbers, and every metric computed."""

    passed: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-serialisable values."""
        return {"passed": self.passed, "reason": self.reason, "metrics": dict(self.metrics)}


def detect_task(champion_output: np.ndarray, labels: np.ndarray | None = None) -> Task:
    """Guess the task from the champion's output shape, then the labels.

    One value per row is regression whatever the labels (an argmax over one column would
    agree with anything). Several columns with one whole-number label per row are class
    scores; labels shaped like the output are a multi-output regression.

    Raises:
        TunerError: labels that fit neither reading of the output's shape.
    """
    out = np.asarray(champion_output)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        return "regression"
    if labels is not None:
        lab = np.asarray(labels)
        whole = np.issubdtype(lab.dtype, np.integer) or bool(np.all(np.mod(lab, 1) == 0))
        if lab.ndim == 1 and out.ndim == 2 and whole:
            return "classification"
        if lab.shape == out.shape:
            return "regression"
        raise TunerError(
            f"labels of shape {lab.shape} fit neither class scores nor a regression of outputs "
            f"shaped {out.shape}: pass one class index per row or one target per output value"
        )
    if out.ndim == 2 and out.shape[1] <= MAX_AUTO_CLASSES:
        return "classification"
    return "embedding"


class AccuracyGuard:
    """Compare candidates' outputs with the reference's (the source's) on the same rows.

    >>> import numpy as np
    >>> champion = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    >>> guard = AccuracyGuard(champion, labels=np.array([0, 1, 0]))
    >>> guard.task
    'classification'
    >>> guard.check(champion + 0.01).passed
    True
    >>> result = guard.check(champion[:, ::-1])
    >>> result.passed, result.metrics["top1_agreement"]
    (False, 0.0)
    """

    def __init__(
        self,
        reference_output: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        task: Task | None = None,
        tolerance: Tolerance = Tolerance(),
    ) -> None:
        self.champion = np.asarray(reference_output, dtype=np.float64)  # the reference
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != len(self.champion):
            raise TunerError(
                f"{len(self.labels)} labels for {len(self.champion)} held-out samples; "
                "give one label per sample"
            )
        self.task: Task = task or detect_task(self.champion, self.labels)
        if self.task not in TASKS:
            raise TunerError(f"task={self.task!r} is unknown; use one of {TASKS}")
        self.tolerance = tolerance

    def check(self, candidate_output: np.ndarray) -> GuardResult:
        """Return whether ``candidate_output`` stays within the tolerance, and why."""
        out = np.asarray(candidate_output, dtype=np.float64)
        if out.shape != self.champion.shape:
            reason = f"output shape {out.shape} differs from the reference's {self.champion.shape}"
            return GuardResult(False, reason, {})
        if not np.all(np.isfinite(out)):
            bad = int(np.size(out) - np.isfinite(out).sum())
            return GuardResult(False, f"{bad} non-finite output values", {"non_finite": bad})
        metrics = _METRICS[self.task](self.champion, out)
        metrics.update(self._label_metrics(out))
        failures = [msg for msg in self._failures(metrics) if msg]
        if failures:
            return GuardResult(False, "; ".join(failures), metrics)
        return GuardResult(True, "within tolerance: " + _summary(metrics, self.task), metrics)

    def _label_metrics(self, out: np.ndarray) -> dict[str, float]:
        """Return accuracy (classification) or MAE (regression) of champion and candidate."""
        if self.labels is None:
            return {}
        if self.task == "classification":
            champ = float(np.mean(self.champion.argmax(axis=1) == self.labels))
            cand = float(np.mean(out.argmax(axis=1) == self.labels))
            return {"accuracy_champion": champ, "accuracy": cand, "accuracy_drop": champ - cand}
        if self.task == "regression":
            truth = self.labels.reshape(len(out), -1).astype(np.float64)
            champ = float(np.mean(np.abs(self.champion.reshape(truth.shape) - truth)))
            cand = float(np.mean(np.abs(out.reshape(truth.shape) - truth)))
            return {"mae_champion": champ, "mae": cand}
        return {}

    def _failures(self, m: dict[str, float]) -> list[str]:
        """Return one message per violated tolerance, naming the value and the bound."""
        t = self.tolerance
        checks = [
            _at_least(m, "top1_agreement", t.min_top1_agreement),
            _at_least(m, "mean_cosine", t.min_mean_cosine),
            _at_least(m, "min_cosine", t.min_min_cosine),
            _at_most(m, "max_abs_error", t.max_abs_error),
            _at_most(m, "rel_error", t.max_rel_error),
            _at_most(m, "accuracy_drop", t.max_accuracy_drop),
        ]
        if t.max_relative_accuracy_drop is not None and "accuracy_drop" in m:
            rel = {
                "relative_accuracy_drop": m["accuracy_drop"] / max(m["accuracy_champion"], 1e-12)
            }
            checks.append(_at_most(rel, "relative_accuracy_drop", t.max_relative_accuracy_drop))
        if t.max_mae_increase is not None and "mae" in m:
            bound = m["mae_champion"] * (1 + t.max_mae_increase)
            checks.append(_at_most(m, "mae", bound))
        return [c for c in checks if c]


def _at_least(m: dict[str, float], key: str, bound: float | None) -> str:
    """Return a failure message when ``m[key] < bound``."""
    if bound is None or key not in m or m[key] >= bound:
        return ""
    return f"{key} {m[key]:.4f} < {bound:.4f}"


def _at_most(m: dict[str, float], key: str, bound: float | None) -> str:
    """Return a failure message when ``m[key] > bound``."""
    if bound is None or key not in m or m[key] <= bound:
        return ""
    return f"{key} {m[key]:.4f} > {bound:.4f}"


def _classification_metrics(champion: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Return top-1 agreement and the largest score difference."""
    champ, cand = champion.reshape(len(champion), -1), out.reshape(len(out), -1)
    return {
        "top1_agreement": float(np.mean(champ.argmax(axis=1) == cand.argmax(axis=1))),
        "max_abs_error": float(np.max(np.abs(champ - cand))),
    }


def _embedding_metrics(champion: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Return mean/min cosine similarity per sample and the largest absolute difference."""
    champ, cand = champion.reshape(len(champion), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(champ, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(champ * cand, axis=1) / np.maximum(norms, 1e-12)
    return {
        "mean_cosine": float(np.mean(cosine)),
        "min_cosine": float(np.min(cosine)),
        "max_abs_error": float(np.max(np.abs(champ - cand))),
    }


def _regression_metrics(champion: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Return absolute errors and the mean error relative to the champion's magnitude."""
    diff = np.abs(champion - out)
    scale = max(float(np.mean(np.abs(champion))), 1e-12)
    return {
        "mean_abs_error": float(np.mean(diff)),
        "max_abs_error": float(np.max(diff)),
        "rel_error": float(np.mean(diff) / scale),
    }


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "classification": _classification_metrics,
    "embedding": _embedding_metrics,
    "regression": _regression_metrics,
}


def _summary(metrics: dict[str, float], task: Task) -> str:
    """Return the headline numbers for a passing candidate."""
    keys = {
        "classification": ("top1_agreement", "accuracy", "accuracy_drop"),
        "embedding": ("mean_cosine", "min_cosine"),
        "regression": ("rel_error", "max_abs_error", "mae"),
    }[task]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
