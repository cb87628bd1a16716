"""Realized performance: stored predictions joined to their labels, per version, arm and window.

Classification (class scores, or integer classes as ``predict()`` returns them): accuracy,
macro F1, precision and recall per class, and log loss when the probabilities were stored.
Regression: MAE, RMSE, MAPE. Every estimate has a 95 % interval (Wilson for accuracy, a seeded
bootstrap for macro F1 and RMSE, the normal approximation for means), and every window says how
many predictions it holds and which share of them has a label (``coverage``).

:class:`PerformanceDetector` compares a recent window with a reference window and flags a drop
only when it is both significant and larger than a tolerance (the latency detector's rule).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import and_, select

from monitor import schema
from monitor.detect import REFERENCE_ARM, Detector, _open_event_details, parse_time
from monitor.errors import ConfigError
from monitor.events import Finding, condition_key
from monitor.labels import task_of_outputs
from monitor.settings import Settings
from monitor.stats import mann_whitney_hl
from monitor.storage import Database, as_utc, utcnow

log = logging.getLogger("tunewatch.detect.performance")  # `detect` lists its skips
N_BOOTSTRAP = 200
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Joined:
    """Predictions of one version and arm with their labels (NaN where none)."""

    version: str
    arm: str
    ts: np.ndarray  # epoch seconds
    predicted: np.ndarray  # class index or value
    probs: list[list[float] | None]
    label: np.ndarray  # NaN: no label (or a missing one)


def read_joined(
    db: Database, model: str, *, version: str | None = None, start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[list[Joined], list[dict[str, Any]]]:  # fmt: skip
    """Stored predictions of ``model`` in ``[start, end)`` left-joined to their labels.

    Returns one :class:`Joined` per (version, arm), and the output summaries read (to tell the
    task). The ``reference`` arm (a pinned drift reference) is left out.
    """
    s_, lab = schema.Sample, schema.Label
    stmt = (
        select(s_.version, s_.arm, s_.ts, s_.outputs, lab.value)
        .outerjoin(lab, and_(lab.model == s_.model, lab.request_id == s_.request_id))
        .where(s_.model == model, s_.arm != REFERENCE_ARM, s_.outputs.is_not(None))
    )  # fmt: skip
    if version is not None:
        stmt = stmt.where(s_.version == version)
    if start is not None:
        stmt = stmt.where(s_.ts >= as_utc(start))
    if end is not None:
        stmt = stmt.where(s_.ts < as_utc(end))
    groups: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    outputs: list[dict[str, Any]] = []
    with db.session() as s:
        for v, arm, ts, out, value in s.execute(stmt):
            groups.setdefault((v, arm), []).append((ts, out, value))
            if len(outputs) < 200:
                outputs.append(out)
    return [_joined(v, arm, rows) for (v, arm), rows in sorted(groups.items())], outputs


def _joined(version: str, arm: str, rows: list[tuple[Any, ...]]) -> Joined:
    ts = np.array([as_utc(r[0]).timestamp() for r in rows], dtype=np.float64)
    pred = np.array([_predicted(r[1]) for r in rows], dtype=np.float64)
    probs = [r[1].get("probs") for r in rows]
    label = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
    return Joined(version, arm, ts, pred, probs, label)


def _predicted(out: dict[str, Any]) -> float:
    if "top_class" in out and out["top_class"] is not None:
        return float(out["top_class"])
    v = out.get("value")
    return float(v) if v is not None else math.nan


# --- metrics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProportionDrop:
    """One-sided test that a proportion fell from ``baseline`` to ``recent``, with its interval.

    ``drop`` is baseline minus recent (0.05 = five points lower); ``ci`` is Newcombe's
    ``1 - 2 * alpha`` interval of the drop (Wilson score intervals combined), so its lower end
    is the one-sided bound that matches the test.
    """

    n_baseline: int
    n_recent: int
    baseline: float
    recent: float
    drop: float
    ci: tuple[float, float]
    p_value: float


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Wilson score interval of a proportion (``(0, 1)`` when empty).

    >>> [round(x, 3) for x in wilson_interval(90, 100)]
    [0.826, 0.945]
    """
    if n <= 0:
        return 0.0, 1.0
    z = _z(alpha / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_drop(
    baseline_successes: int, n_baseline: int, recent_successes: int, n_recent: int,
    alpha: float = 0.05,
) -> ProportionDrop:  # fmt: skip
    """Did the share of successes fall? One-sided pooled z-test and Newcombe's interval.

    Raises:
        ConfigError: either window is empty.

    >>> r = proportion_drop(900, 1000, 800, 1000)
    >>> round(r.drop, 2), r.p_value < 1e-6, r.ci[0] > 0.07
    (0.1, True, True)
    """
    if n_baseline <= 0 or n_recent <= 0:
        raise ConfigError(
            f"proportion_drop needs two non-empty windows, got {n_baseline} and {n_recent}"
        )
    p1, p2 = baseline_successes / n_baseline, recent_successes / n_recent
    pooled = (baseline_successes + recent_successes) / (n_baseline + n_recent)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_baseline + 1 / n_recent))
    p_value = _sf((p1 - p2) / se) if se > 0 else (0.0 if p1 > p2 else 1.0)
    l1, u1 = wilson_interval(baseline_successes, n_baseline, 2 * alpha)
    l2, u2 = wilson_interval(recent_successes, n_recent, 2 * alpha)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return ProportionDrop(n_baseline, n_recent, p1, p2, d, (lo, hi), p_value)


def _sf(z: float) -> float:
    from scipy import stats

    return float(stats.norm.sf(z))


@dataclass(frozen=True)
class WindowPerformance:
    """Realized performance of one version and arm in one time window."""

    model: str
    version: str
    arm: str
    start: datetime
    end: datetime
    task: str
    predictions: int
    labelled: int
    coverage: float
    metrics: dict[str, float | None]
    ci: dict[str, list[float]]
    per_class: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (times as ISO-8601)."""
        out = asdict(self)
        out["start"], out["end"] = self.start.isoformat(), self.end.isoformat()
        return out


def classification_metrics(
    y: np.ndarray, pred: np.ndarray, probs: list[list[float] | None] | None = None, seed: int = 0
) -> tuple[dict[str, float | None], dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Accuracy, macro F1, per-class precision/recall and (with probabilities) log loss.

    >>> m, ci, per = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    >>> m["accuracy"], round(m["macro_f1"], 3), per["1"]["recall"]
    (0.75, 0.733, 0.5)
    """
    y, pred = y.astype(np.int64), pred.astype(np.int64)
    n = len(y)
    correct = int((y == pred).sum())
    k = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    conf = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    f1, per = _macro_f1(conf), _per_class(conf)
    metrics: dict[str, float | None] = {"accuracy": correct / n, "macro_f1": f1}
    f1_ci = _bootstrap(lambda i: _macro_f1(_confusion(y[i], pred[i], k)), n, seed)
    ci = {"accuracy": list(wilson_interval(correct, n)), "macro_f1": f1_ci}
    if probs is not None and n and all(p is not None for p in probs):
        p_true = np.array([_prob_of(p, c) for p, c in zip(probs, y.tolist())], dtype=np.float64)
        losses = -np.log(np.clip(p_true, 1e-15, 1.0))
        metrics["log_loss"] = float(losses.mean())
        ci["log_loss"] = _mean_ci(losses)
    return metrics, ci, per


def _prob_of(p: list[float] | None, c: int) -> float:
    return float(p[c]) if p is not None and 0 <= c < len(p) else 0.0


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _macro_f1(conf: np.ndarray) -> float:
    """Mean F1 over the classes present in the labels or the predictions."""
    tp = np.diag(conf).astype(np.float64)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def _per_class(conf: np.ndarray) -> dict[str, dict[str, Any]]:
    tp = np.diag(conf)
    out = {}
    for c in range(conf.shape[0]):
        support, predicted = int(conf[c].sum()), int(conf[:, c].sum())
        if support == 0 and predicted == 0:
            continue
        out[str(c)] = {
            "precision": float(tp[c] / predicted) if predicted else None,
            "recall": float(tp[c] / support) if support else None, "support": support,
        }  # fmt: skip
    return out


def regression_metrics(
    y: np.ndarray, pred: np.ndarray, seed: int = 0
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """MAE, RMSE and MAPE (over rows whose label is not 0), each with a 95 % interval.

    >>> m, _ = regression_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))
    >>> m["mae"], round(m["rmse"], 3), round(m["mape"], 3)
    (0.5, 0.645, 0.25)
    """
    err = pred - y
    abs_err = np.abs(err)
    metrics: dict[str, float | None] = {
        "mae": float(abs_err.mean()), "rmse": float(math.sqrt(float((err**2).mean()))),
    }  # fmt: skip
    sq = err**2
    ci = {"mae": _mean_ci(abs_err),
          "rmse": _bootstrap(lambda i: math.sqrt(float(sq[i].mean())), len(y), seed)}  # fmt: skip
    nz = y != 0
    if nz.any():
        ape = abs_err[nz] / np.abs(y[nz])
        metrics["mape"] = float(ape.mean())
        ci["mape"] = _mean_ci(ape)
    else:
        metrics["mape"] = None
    return metrics, ci


def _mean_ci(x: np.ndarray) -> list[float]:
    m = float(x.mean())
    if len(x) < 2:
        return [m, m]
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return [m - half, m + half]


def _bootstrap(stat: Any, n: int, seed: int) -> list[float]:
    """Percentile 95 % interval of ``stat(indices)`` over ``N_BOOTSTRAP`` resamples."""
    if n < 2:
        value = float(stat(np.arange(n)))
        return [value, value]
    rng = np.random.default_rng(seed)
    draws = [stat(rng.integers(0, n, n)) for _ in range(N_BOOTSTRAP)]
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return [float(lo), float(hi)]


def window_performance(
    model: str, joined: Joined, start: datetime, end: datetime, task: str,
    n_classes: int | None = None,
) -> WindowPerformance:  # fmt: skip
    """Metrics of the predictions of ``joined`` with a label (all of ``joined`` is the window)."""
    has = ~np.isnan(joined.label) & ~np.isnan(joined.predicted)
    n, labelled = len(joined.label), int(has.sum())
    coverage = labelled / n if n else 0.0
    metrics: dict[str, float | None] = {}
    ci: dict[str, list[float]] = {}
    per: dict[str, dict[str, Any]] = {}
    if labelled:
        y, pred = joined.label[has], joined.predicted[has]
        if task == "classification":
            probs = [joined.probs[i] for i in np.flatnonzero(has)]
            metrics, ci, per = classification_metrics(y, pred, probs)
        else:
            metrics, ci = regression_metrics(y, pred)
    return WindowPerformance(model, joined.version, joined.arm, start, end, task, n, labelled,
                             coverage, metrics, ci, per)  # fmt: skip


def realized_performance(
    db: Database, model: str, *, version: str | None = None, window: timedelta = timedelta(hours=1),
    windows: int = 24, end: datetime | None = None, task: str = "auto",
) -> list[WindowPerformance]:  # fmt: skip
    """Per version, arm and window (the last ``windows`` of length ``window`` up to ``end``,
    aligned to multiples of ``window``), the realized performance. Empty windows are left out.

    Raises:
        ConfigError: ``window`` is not positive or ``windows`` is below 1.
    """
    step = window.total_seconds()
    if step <= 0 or windows < 1:
        raise ConfigError(f"window={window} and windows={windows} must be positive")
    end = as_utc(end) if end else utcnow()
    last_start = math.floor(end.timestamp() / step) * step
    first = datetime.fromtimestamp(last_start - (windows - 1) * step, timezone.utc)
    groups, outputs = read_joined(db, model, version=version, start=first, end=end)
    kind, n_classes = task_of_outputs(outputs, task)
    out = []
    for g in groups:
        slots = np.floor((g.ts - first.timestamp()) / step).astype(np.int64)
        for slot in np.unique(slots).tolist():
            idx = np.flatnonzero(slots == slot)
            part = _take(g, idx)
            w_start = datetime.fromtimestamp(first.timestamp() + slot * step, timezone.utc)
            out.append(window_performance(model, part, w_start, w_start + window, kind, n_classes))
    return sorted(out, key=lambda w: (w.version, w.arm, w.start))


def _take(j: Joined, idx: np.ndarray) -> Joined:
    return Joined(j.version, j.arm, j.ts[idx], j.predicted[idx], [j.probs[i] for i in idx],
                  j.label[idx])  # fmt: skip


# --- detection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PerformanceComparison:
    """A recent window against a reference window on labelled predictions."""

    status: str  # ok | insufficient_data
    dropped: bool
    task: str
    metric: str  # accuracy or mae
    reference_value: float | None
    recent_value: float | None
    change: float | None  # accuracy points lost, or MAE gained as a fraction of the reference
    ci: tuple[float, float] | None
    p_value: float | None
    n_reference: int
    n_recent: int
    tolerance: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        out = asdict(self)
        out["ci"] = list(self.ci) if self.ci else None
        return out


def compare_performance(
    task: str, ref: tuple[np.ndarray, np.ndarray], rec: tuple[np.ndarray, np.ndarray], *,
    tolerance: float, alpha: float, min_labels: int,
) -> PerformanceComparison:  # fmt: skip
    """Did realized performance drop from ``ref`` to ``rec`` (each ``(labels, predictions)``)?

    Classification: accuracy fell significantly (one-sided two-proportion test, ``p < alpha``)
    and the lower end of the drop's interval exceeds ``tolerance`` points. Regression: absolute
    errors grew significantly (one-sided Mann-Whitney) and the lower end of the MAE increase's
    interval exceeds ``tolerance`` times the reference MAE.
    """
    n_ref, n_rec = len(ref[0]), len(rec[0])
    metric = "accuracy" if task == "classification" else "mae"
    if min(n_ref, n_rec) < min_labels:
        which = "reference" if n_ref < min_labels else "recent"
        reason = (
            f"insufficient data: {min(n_ref, n_rec)} of {min_labels} labels in the {which} window"
        )
        return PerformanceComparison("insufficient_data", False, task, metric, None, None, None,
                                     None, None, n_ref, n_rec, tolerance, reason)  # fmt: skip
    if task == "classification":
        ok_ref = int((ref[0] == ref[1]).sum())
        ok_rec = int((rec[0] == rec[1]).sum())
        r = proportion_drop(ok_ref, n_ref, ok_rec, n_rec, alpha)
        return _verdict(task, metric, r.baseline, r.recent, r.drop, r.ci, r.p_value, n_ref,
                        n_rec, tolerance, alpha, "points")  # fmt: skip
    e_ref, e_rec = np.abs(ref[1] - ref[0]), np.abs(rec[1] - rec[0])
    mae_ref, mae_rec = float(e_ref.mean()), float(e_rec.mean())
    p_value = mann_whitney_hl(e_ref, e_rec, alpha).p_value
    scale = max(mae_ref, 1e-12)
    se = math.sqrt(e_ref.var(ddof=1) / n_ref + e_rec.var(ddof=1) / n_rec)
    z = float(_z(alpha))
    diff = mae_rec - mae_ref
    ci = ((diff - z * se) / scale, (diff + z * se) / scale)
    return _verdict(task, metric, mae_ref, mae_rec, diff / scale, ci, p_value, n_ref, n_rec,
                    tolerance, alpha, "x reference MAE")  # fmt: skip


def _z(alpha: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(1.0 - alpha))


def _verdict(
    task: str, metric: str, ref: float, rec: float, change: float, ci: tuple[float, float],
    p_value: float, n_ref: int, n_rec: int, tolerance: float, alpha: float, unit: str,
) -> PerformanceComparison:  # fmt: skip
    significant = p_value < alpha
    beyond = ci[0] > tolerance
    span = f"{ci[0]:.3f}..{ci[1]:.3f} {unit}"
    if significant and beyond:
        reason = f"drop: {metric} {ref:.4f} -> {rec:.4f}, change {span} wholly above {tolerance}"
    elif significant:
        reason = f"within tolerance: change {span} not wholly above {tolerance} (p={p_value:.3g})"
    else:
        reason = f"not significant: p={p_value:.3g} >= alpha={alpha}"
    return PerformanceComparison("ok", significant and beyond, task, metric, ref, rec, change,
                                 ci, p_value, n_ref, n_rec, tolerance, reason)  # fmt: skip


class PerformanceDetector(Detector):
    """Realized performance of the recent window against a reference window, per version and
    arm: opens ``performance_drop`` events."""

    def __init__(self, settings: Settings, task: str = "auto") -> None:
        self.s = settings
        self.task = task

    def detect(self, db: Database, now: datetime, model: str | None = None) -> list[Finding]:
        """One finding per model/version/arm with labelled predictions in the recent window."""
        recent_start = now - timedelta(seconds=self.s.performance_recent_s)
        findings = []
        for m in self._models(db, model, recent_start, now):
            findings += self.detect_model(db, m, recent_start, now)
        return findings

    def detect_model(
        self, db: Database, model: str, recent_start: datetime, now: datetime,
        reference: tuple[datetime, datetime] | None = None,
    ) -> list[Finding]:  # fmt: skip
        """Findings for ``model``; ``reference`` overrides the reference window."""
        recent, outputs = read_joined(db, model, start=recent_start, end=now)
        task, _ = task_of_outputs(outputs, self.task)
        findings = []
        for g in recent:
            cond = condition_key("performance_drop", model, g.version, g.arm)
            window = reference or self.reference_window(db, cond, recent_start)
            ref_groups, _ = read_joined(db, model, version=g.version, start=window[0],
                                        end=window[1])  # fmt: skip
            ref = next((r for r in ref_groups if r.arm == g.arm), None)
            result = compare_performance(
                task, _pairs(ref), _pairs(g), tolerance=self.s.performance_tolerance,
                alpha=self.s.performance_alpha, min_labels=self.s.performance_min_labels,
            )  # fmt: skip
            if result.status != "ok":
                log.info("performance %s:%s[%s]: %s", model, g.version, g.arm, result.reason)
                continue
            findings.append(_finding(model, g, result, window, (recent_start, now), self.s))
        return findings

    def reference_window(
        self, db: Database, condition: str, recent_start: datetime
    ) -> tuple[datetime, datetime]:
        """A fixed period if configured, the one an open event froze, else the preceding
        ``performance_reference_s``."""
        s = self.s
        if s.performance_reference_start and s.performance_reference_end:
            return (
                parse_time(s.performance_reference_start, "performance_reference_start"),
                parse_time(s.performance_reference_end, "performance_reference_end"),
            )
        frozen = _open_event_details(db, condition).get("reference")
        if frozen:
            return parse_time(frozen[0], "reference"), parse_time(frozen[1], "reference")
        return recent_start - timedelta(seconds=s.performance_reference_s), recent_start

    @staticmethod
    def _models(db: Database, model: str | None, start: datetime, end: datetime) -> list[str]:
        if model is not None:
            return [model]
        t, lab = schema.Sample, schema.Label
        stmt = (
            select(t.model).distinct()
            .join(lab, and_(lab.model == t.model, lab.request_id == t.request_id))
            .where(t.ts >= as_utc(start), t.ts < as_utc(end))
        )  # fmt: skip
        with db.session() as s:
            return sorted(s.scalars(stmt))


def _pairs(j: Joined | None) -> tuple[np.ndarray, np.ndarray]:
    if j is None:
        return np.empty(0), np.empty(0)
    has = ~np.isnan(j.label) & ~np.isnan(j.predicted)
    return j.label[has], j.predicted[has]


def _finding(
    model: str, g: Joined, r: PerformanceComparison, ref: tuple[datetime, datetime],
    rec: tuple[datetime, datetime], s: Settings,
) -> Finding:  # fmt: skip
    # "recent" is the window (what a retune's fresh data starts from, tuner.data.event_since).
    details = {
        **r.to_dict(), "reference": [ref[0].isoformat(), ref[1].isoformat()],
        "recent": [rec[0].isoformat(), rec[1].isoformat()],
    }  # fmt: skip
    severe = r.ci is not None and r.ci[0] > 3 * s.performance_tolerance
    what = (f"accuracy {r.reference_value:.3f} -> {r.recent_value:.3f}"
            if r.metric == "accuracy"
            else f"MAE {r.reference_value:.4g} -> {r.recent_value:.4g}")  # fmt: skip
    summary = (
        f"{model}:{g.version} [{g.arm}] realized performance dropped: {what} "
        f"({r.n_recent} labelled predictions)"
        if r.dropped
        else f"{model}:{g.version} [{g.arm}] realized performance holds ({r.reason})"
    )
    return Finding("performance_drop", model, g.version, g.arm, r.dropped,
                   "critical" if severe else "warning", summary, details)  # fmt: skip


def compare_arms(
    db: Database, model: str, champion: tuple[str, str], challenger: tuple[str, str],
    start: datetime, end: datetime, settings: Settings, task: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Realized performance of an experiment's two arms (each ``(version, arm)``) on their
    labelled predictions in ``[start, end)``: is the challenger significantly worse?

    Returns ``{status, task, metric, champion: {...}, challenger: {...}, worse, reason, ...}``;
    ``status`` is ``no_labels`` when neither arm has a label, ``insufficient_data`` when one
    has fewer than ``performance_min_labels``.
    """
    groups, outputs = read_joined(db, model, start=start, end=end)
    kind, _ = task_of_outputs(outputs, task)
    by_arm = {(g.version, g.arm): g for g in groups}
    champ, chall = by_arm.get(champion), by_arm.get(challenger)
    arms = {
        name: _arm_summary(model, g, start, end, kind)
        for name, g in (("champion", champ), ("challenger", chall))
    }
    if not any(a["labelled"] for a in arms.values()):
        return {"status": "no_labels", "task": kind, "worse": False, **arms,
                "reason": "no labelled predictions in either arm"}  # fmt: skip
    r = compare_performance(
        kind, _pairs(champ), _pairs(chall), tolerance=settings.performance_tolerance,
        alpha=settings.experiment_alpha, min_labels=settings.performance_min_labels,
    )  # fmt: skip
    if r.status != "ok":
        reason = r.reason
    elif r.dropped:
        reason = f"challenger worse on labels: {r.reason}"
    else:
        reason = (f"challenger not worse on labels: {r.metric} {r.reference_value:.4g} -> "
                  f"{r.recent_value:.4g} ({r.reason})")  # fmt: skip
    return {**r.to_dict(), "worse": r.dropped, **arms, "reason": reason}


def _arm_summary(
    model: str, g: Joined | None, start: datetime, end: datetime, task: str
) -> dict[str, Any]:
    if g is None:
        return {"predictions": 0, "labelled": 0, "coverage": 0.0, "metrics": {}, "ci": {}}
    w = window_performance(model, g, start, end, task)
    return {"version": g.version, "arm": g.arm, "predictions": w.predictions,
            "labelled": w.labelled, "coverage": w.coverage, "metrics": w.metrics,
            "ci": w.ci}  # fmt: skip


__all__ = [
    "PerformanceComparison", "PerformanceDetector", "ProportionDrop", "WindowPerformance",
    "classification_metrics", "compare_arms", "compare_performance", "proportion_drop",
    "read_joined", "realized_performance", "regression_metrics", "wilson_interval",
]  # fmt: skip
