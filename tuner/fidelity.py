"""Fidelity to the source: replay stored production inputs through a version and its source.

A tuned version is only as good as its answers on what production sends *now*. This module
takes raw input rows a version served, runs them off the serving path through that version's
verified artifact and through its source's (the version a user registered), and scores the
pair with the accuracy guard's metrics and tolerance. The champion is checked on a schedule
(a time series in ``fidelity_checks``, a ``fidelity_drop`` event when it falls below the
tolerance); experiments replay each arm's inputs the same way (see :mod:`tuner.analysis`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from statistics import NormalDist
from typing import Any, cast

import numpy as np
from sqlalchemy import select

from monitor import schema
from monitor.events import EventRecord, Finding, Notifier, apply_finding, list_events
from monitor.registry import VersionInfo, champion, list_versions, source_of
from monitor.settings import Settings
from monitor.storage import Database, SampleRow, read_samples, utcnow
from tuner.guard import TASKS, AccuracyGuard, Task, Tolerance
from tuner.registry import tolerance as model_tolerance

log = logging.getLogger("tunewatch.fidelity")

KIND = "fidelity_drop"
MIN_ROWS = 30  # fewer replayed rows say too little about a version's fidelity
# Where a champion's traffic is recorded: its own arm, an undeployed wrap's, and the challenger
# share it served in the experiment that promoted it (the same artifact on live inputs), so
# the first check after a promotion has rows; replay takes the newest first.
SERVED_ARMS = ("champion", "main", "challenger")
# The guard metric that judges each task, whether higher is better, and its tolerance field.
HEADLINE: dict[str, tuple[str, bool, str]] = {
    "classification": ("top1_agreement", True, "min_top1_agreement"),
    "embedding": ("mean_cosine", True, "min_mean_cosine"),
    "regression": ("rel_error", False, "max_rel_error"),
}
_LABELS = {"top1_agreement": "top-1 agreement", "mean_cosine": "mean cosine",
           "rel_error": "relative error"}  # fmt: skip


@dataclass(frozen=True)
class Replay:
    """One version's outputs against its source's on the same stored inputs.

    ``status``: ``ok`` (judged), ``is_source`` (the version is its own source),
    ``insufficient_data`` (fewer than ``MIN_ROWS`` raw rows) or ``error``.
    """

    model: str
    version: str
    source_version: str
    arm: str
    rows: int
    task: str
    metrics: dict[str, float]
    passed: bool | None
    status: str
    message: str
    window: tuple[datetime | None, datetime | None] = (None, None)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def headline(self) -> float | None:
        """The task's judging metric (top-1 agreement, mean cosine or relative error)."""
        key = HEADLINE.get(self.task, ("", True, ""))[0]
        return self.metrics.get(key)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (per-row scores left out)."""
        return {
            "model": self.model, "version": self.version, "source_version": self.source_version,
            "arm": self.arm, "rows": self.rows, "task": self.task, "metrics": self.metrics,
            "passed": self.passed, "status": self.status, "message": self.message,
            "window": [t.isoformat() if t else None for t in self.window],
        }  # fmt: skip


@dataclass(frozen=True)
class FidelityCheck:
    """A stored champion check: the replay, its row id and the event it opened or updated."""

    replay: Replay
    check_id: int
    event_id: int | None

    def to_dict(self) -> dict[str, Any]:
        """The ``tunewatch fidelity --json`` form."""
        r = self.replay
        return {"model": r.model, "version": r.version, "source_version": r.source_version,
                "rows": r.rows, "task": r.task, "metrics": r.metrics, "passed": r.passed,
                "status": r.status, "message": r.message, "event_id": self.event_id,
                "check_id": self.check_id,
                "window": [t.isoformat() if t else None for t in r.window]}  # fmt: skip


# --- replay ------------------------------------------------------------------------------


def replay(
    db: Database,
    info: VersionInfo,
    source: VersionInfo,
    *,
    arms: Sequence[str],
    limit: int,
    start: datetime | None = None,
    end: datetime | None = None,
    task: Task | None = None,
    tolerance: Tolerance | None = None,
) -> Replay:
    """Replay up to ``limit`` of the newest raw inputs ``info`` served under ``arms``.

    Both artifacts are sha256-verified before they are loaded. Never called on a serving path.

    Raises:
        ArtifactError: an artifact is missing or changed.
        TunerError: the stored inputs do not fit the model's inputs.
    """
    rows = _raw_rows(db, info, arms, limit, start, end)
    few = Replay(
        info.model, info.version, source.version, "+".join(arms), len(rows), task or "", {},
        None, "insufficient_data",
        f"{len(rows)} stored raw inputs of {info.model}:{info.version} ({'/'.join(arms)}); at "
        f"least {MIN_ROWS} are needed: send more traffic or raise sample_rate",
        (rows[-1].ts, rows[0].ts) if rows else (None, None),
    )  # fmt: skip
    if len(rows) < MIN_ROWS:
        return few
    source_session = verified_session(source)
    feeds = _feeds(rows, source_session)
    reference = _run(source_session, feeds)
    output = reference if info.version == source.version else run_model(info, feeds)
    if tolerance is None:
        tolerance = model_tolerance(db, info.model)
    guard = AccuracyGuard(reference, task=task, tolerance=tolerance)
    result = guard.check(output)
    return replace(few, task=guard.task, metrics=result.metrics, passed=result.passed,
                   status="ok", message=result.reason,
                   scores=row_scores(guard.task, reference, output))  # fmt: skip


def _raw_rows(
    db: Database, info: VersionInfo, arms: Sequence[str], limit: int,
    start: datetime | None, end: datetime | None,
) -> list[SampleRow]:  # fmt: skip
    """The newest ``limit`` samples with raw inputs of one version under any of ``arms``."""
    rows = [
        r for arm in arms
        for r in read_samples(db, info.model, info.version, arm=arm, start=start, end=end,
                              limit=limit, with_raw=True, newest_first=True)
        if r.raw
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (r.ts, r.id), reverse=True)[:limit]


def _feeds(rows: list[SampleRow], artifact: Any) -> dict[str, np.ndarray]:
    from tuner.data import _match
    from tuner.onnx_tools import describe_inputs

    inputs = describe_inputs(artifact)
    arrays = [_match(r.raw or {}, inputs) for r in rows]
    return {spec.name: np.stack([a[spec.name] for a in arrays]) for spec in inputs}


# Sessions built from verified bytes, by sha256: the analysis and fidelity jobs replay the
# same few artifacts every minute, and building a session costs more than checking the hash.
_SESSIONS: OrderedDict[str, Any] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
MAX_CACHED_SESSIONS = 8


def verified_session(info: VersionInfo) -> Any:
    """An ONNX Runtime session (one thread) built from the very bytes whose sha256 was checked.

    The bytes are read and checked on every call; a session built earlier from bytes with the
    same sha256 is reused (at most ``MAX_CACHED_SESSIONS`` are kept).

    Raises:
        ArtifactError: the artifact is missing, corrupted or swapped.
    """
    import onnxruntime as ort

    from monitor.deploy import session_options
    from tuner.registry import verified_bytes

    data = verified_bytes(info)  # raises unless the file's sha256 is the recorded one
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(info.sha256)
        if session is not None:
            _SESSIONS.move_to_end(info.sha256)
            return session
    options = session_options({"threads": 1})  # off the serving path: leave cores to it
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    with _SESSIONS_LOCK:
        _SESSIONS[info.sha256] = session
        while len(_SESSIONS) > MAX_CACHED_SESSIONS:
            _SESSIONS.popitem(last=False)
    return session


def run_model(info: VersionInfo, feeds: dict[str, np.ndarray], chunk: int = 64) -> np.ndarray:
    """The first output of ``info``'s verified artifact on every row of ``feeds``."""
    return _run(verified_session(info), feeds, chunk)


def _run(session: Any, feeds: dict[str, np.ndarray], chunk: int = 64) -> np.ndarray:
    from tuner.onnx_tools import iter_chunks

    return np.concatenate([session.run(None, part)[0] for part in iter_chunks(feeds, chunk)])


def row_scores(task: str, reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Per-row values of the task's headline metric (their mean is the guard's metric)."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    out = np.asarray(output, np.float64).reshape(len(output), -1)
    if task == "classification":
        return (ref.argmax(axis=1) == out.argmax(axis=1)).astype(np.float64)
    if task == "embedding":
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        return np.asarray(np.sum(ref * out, axis=1) / np.maximum(norms, 1e-12))
    scale = max(float(np.mean(np.abs(ref))), 1e-12)
    return np.asarray(np.mean(np.abs(ref - out), axis=1) / scale)


# --- comparing two replays ----------------------------------------------------------------


def margin(task: str, tolerance: Tolerance = Tolerance()) -> float:
    """How far the headline metric may move before it matters: the tolerance's own slack."""
    _key, higher, field_name = HEADLINE[task]
    bound = getattr(tolerance, field_name)
    if bound is None:
        return 0.0
    return float(1.0 - bound) if higher else float(bound)


def better_by(a: Replay, b: Replay, by: float, alpha: float) -> bool:
    """Whether ``a``'s fidelity beats ``b``'s by more than ``by``, beyond noise.

    A one-sided Welch z-test on the per-row scores at level ``alpha``: the difference of the
    means, less ``by``, must exceed its standard error times the normal quantile.
    """
    if a.status != "ok" or b.status != "ok" or a.task != b.task or not a.task:
        return False
    raw, se = difference(a, b)
    diff = (raw if HEADLINE[a.task][1] else -raw) - by  # "better": higher, or lower error
    if se == 0.0:
        return diff > 0
    return diff / se > NormalDist().inv_cdf(1.0 - alpha)


def difference(a: Replay, b: Replay) -> tuple[float, float]:
    """``a``'s mean per-row score minus ``b``'s, and the (Welch) standard error of that."""
    diff = float(a.scores.mean() - b.scores.mean())
    se = float(np.sqrt(a.scores.var(ddof=1) / len(a.scores) + b.scores.var(ddof=1) / len(b.scores)))
    return diff, se


def describe(r: Replay, *, label: bool = True) -> str:
    """The headline metric in words, e.g. ``top-1 agreement 99.1 %`` (``99.1 %`` unlabelled)."""
    key = HEADLINE.get(r.task, ("", True, ""))[0]
    value = r.metrics.get(key)
    if value is None:
        return f"{r.status.replace('_', ' ')} ({r.rows} rows)"
    text = f"{value:.4f}" if key == "mean_cosine" else f"{100 * value:.1f} %"
    return f"{_LABELS[key]} {text}" if label else text


# --- the champion check ------------------------------------------------------------------


def check_champion(
    db: Database,
    settings: Settings,
    model: str,
    *,
    rows: int | None = None,
    notifier: Notifier | None = None,
) -> FidelityCheck:
    """Replay the champion's recent inputs through it and its source; store it; open/resolve.

    Raises:
        NotFound: the model is not registered.
        TunerError: ``rows`` is not positive.
    """
    from tuner.errors import TunerError

    limit = settings.fidelity_rows if rows is None else rows
    if limit < 1:
        raise TunerError(f"rows={limit} must be >= 1 (e.g. --rows 256)")
    champ = champion(db, model)
    source = source_of(db, champ)
    if champ.version == source.version:
        note = f"{model}:{champ.version} is its own source: nothing to compare"
        result = Replay(model, champ.version, source.version, "+".join(SERVED_ARMS), 0, "",
                        {}, True, "is_source", note)  # fmt: skip
    else:
        try:
            result = replay(db, champ, source, arms=SERVED_ARMS, limit=limit,
                            task=model_task(db, model))  # fmt: skip
        except Exception as exc:  # one broken model never stops the others' checks
            log.exception("fidelity of %s:%s failed", model, champ.version)
            result = Replay(model, champ.version, source.version, "+".join(SERVED_ARMS), 0, "",
                            {}, None, "error", str(exc)[:2000])  # fmt: skip
    event = _apply_event(db, settings, result, notifier or Notifier(settings.webhook_url))
    check_id = store(db, result, event_id=event.id if event else None)
    return FidelityCheck(result, check_id, event.id if event else None)


def run_fidelity(
    db: Database, settings: Settings, *, model: str | None = None,
    notifier: Notifier | None = None,
) -> list[FidelityCheck]:  # fmt: skip
    """Check every registered model's champion (or just ``model``) once."""
    models = sorted({v.model for v in list_versions(db, model) if v.status == "champion"})
    return [check_champion(db, settings, m, notifier=notifier) for m in models]


def model_task(db: Database, model: str) -> Task | None:
    """The task the model was registered with, or None to let the guard detect it."""
    t = schema.RegisteredModel
    with db.session() as s:
        task = s.scalars(select(t.task).where(t.name == model)).first()
    return cast("Task", task) if task in TASKS else None


def store(
    db: Database, r: Replay, *, experiment_id: int | None = None, event_id: int | None = None,
    tolerance: Tolerance | None = None,
) -> int:  # fmt: skip
    """Record one replay in the ``fidelity_checks`` time series; returns its id."""
    tolerance = tolerance if tolerance is not None else model_tolerance(db, r.model)
    with db.session() as s:
        row = schema.FidelityCheck(
            ts=utcnow(), model=r.model, version=r.version, source_version=r.source_version,
            arm=r.arm, experiment_id=experiment_id, window_start=r.window[0],
            window_end=r.window[1], rows=r.rows, task=r.task, metrics=r.metrics,
            tolerance=tolerance.to_dict(), passed=bool(r.passed), status=r.status,
            message=r.message, event_id=event_id,
        )  # fmt: skip
        s.add(row)
        s.flush()
        return int(row.id)


def _apply_event(
    db: Database, settings: Settings, r: Replay, notifier: Notifier
) -> EventRecord | None:
    """Open or update the champion's event when it fails; resolve it (and any event left on a
    version that no longer serves) when fidelity is back. No data, no change."""
    if r.status not in ("ok", "is_source"):
        return None
    retune = [k.strip() for k in settings.retune_on.split(",") if k.strip()]
    details = r.to_dict()
    own = None
    if r.status == "ok":
        summary = (
            f"{r.model}:{r.version} fidelity to its source {r.source_version} dropped: {r.message}"
            if not r.passed
            else f"{r.model}:{r.version} is faithful to {r.source_version}: {r.message}"
        )
        finding = Finding(KIND, r.model, r.version, "", not r.passed, "critical", summary, details)
        own = _notify(notifier, apply_finding(db, finding, retune_kinds=retune))
    for e in list_events(db, model=r.model):
        if e.kind == KIND and e.status != "resolved" and e.version != r.version:
            summary = f"{r.model}:{e.version} no longer serves; the champion is {r.version}"
            stale = Finding(KIND, r.model, e.version, e.arm, False, e.severity, summary, details)
            _notify(notifier, apply_finding(db, stale))
    return own


def _notify(notifier: Notifier, event: EventRecord | None) -> EventRecord | None:
    if event is not None and event.action in ("opened", "resolved"):
        notifier.notify(event)
    return event
