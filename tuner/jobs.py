"""Scheduled jobs: each is a ``module:function`` reference run through :func:`run`.

:func:`run` claims the job's current slot with a unique row in ``job_runs`` (the database
lease that keeps two ``tunewatch serve`` processes from running the same job run twice), then
runs the body and records status, duration, result and any traceback. It never raises, so a
failing job never stops the scheduler.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from monitor import schema
from monitor.errors import ConfigError, StorageError
from monitor.settings import Settings
from monitor.storage import Database, utcnow

log = logging.getLogger("tunewatch.jobs")

# Interval triggers start here, so every process computes the same fire times and slots.
ANCHOR = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class JobSpec:
    """A job: its id, the body's ``module:function`` and how often it runs."""

    job_id: str
    ref: str
    interval_s: int


class _Context:
    settings: Settings | None = None
    db: Database | None = None


_CTX = _Context()


def configure(settings: Settings, db: Database) -> None:
    """Tell jobs which settings and database this process serves (called by ``serve``)."""
    _CTX.settings, _CTX.db = settings, db


def context() -> tuple[Settings, Database]:
    """The settings and database of this process (from the environment if not configured)."""
    if _CTX.settings is None or _CTX.db is None:
        settings = Settings.load()
        configure(settings, Database(settings.database_url))
    assert _CTX.settings is not None and _CTX.db is not None
    return _CTX.settings, _CTX.db


def job_specs(settings: Settings) -> list[JobSpec]:
    """The built-in jobs plus ``extra_jobs`` from the settings."""
    specs = [
        JobSpec(
            "latency_detection", "tuner.jobs:latency_detection", settings.latency_job_interval_s
        ),
        JobSpec("drift_detection", "tuner.jobs:drift_detection", settings.drift_job_interval_s),
        JobSpec("retune", "tuner.jobs:retune", settings.retune_job_interval_s),
        JobSpec(
            "experiment_analysis",
            "tuner.jobs:experiment_analysis",
            settings.analysis_job_interval_s,
        ),
        JobSpec("retention", "tuner.jobs:retention", settings.retention_job_interval_s),
        JobSpec("fidelity", "tuner.jobs:fidelity", settings.fidelity_job_interval_s),
        JobSpec(
            "performance_detection",
            "tuner.jobs:performance_detection",
            settings.performance_job_interval_s,
        ),
    ]
    return specs + parse_extra_jobs(settings.extra_jobs)


def parse_extra_jobs(text: str) -> list[JobSpec]:
    """Parse ``id=module:function@seconds;...``.

    >>> parse_extra_jobs("nightly=myjobs:retrain@86400")
    [JobSpec(job_id='nightly', ref='myjobs:retrain', interval_s=86400)]
    """
    specs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            job_id, rest = part.split("=", 1)
            ref, seconds = rest.rsplit("@", 1)
            if ":" not in ref:
                raise ValueError
            specs.append(JobSpec(job_id.strip(), ref.strip(), int(seconds)))
        except ValueError:
            raise ConfigError(
                f"extra_jobs entry {part!r} is invalid: use id=module:function@seconds"
            ) from None
    return specs


def resolve(ref: str) -> Callable[[], Any]:
    """Import the function a ``module:function`` reference names."""
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"job reference {ref!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"job reference {ref!r} is not a function")
    return fn


def slot_of(interval_s: int, now: datetime | None = None) -> int:
    """The index of the interval a run at ``now`` belongs to (the same in every process)."""
    now = now or utcnow()
    return int((now - ANCHOR).total_seconds() // interval_s)


def instance_name() -> str:
    """Who runs a job: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run(job_id: str, ref: str, interval_s: int) -> str:
    """Claim this slot of ``job_id`` and run ``ref``; returns the run's status. Never raises."""
    try:
        settings, db = context()
        run_id = _claim(db, job_id, slot_of(interval_s))
    except Exception:
        log.exception("job %s could not be claimed", job_id)
        return "failed"
    if run_id is None:
        log.info("job %s: this slot is already claimed by another process", job_id)
        return "skipped"
    start = time.perf_counter()
    try:
        result = resolve(ref)()
        status, error, tb = "success", None, None
    except Exception as exc:
        result, status, error, tb = None, "failed", repr(exc), traceback.format_exc()
        log.error("job %s failed: %s", job_id, error)
    _finish(db, run_id, status, time.perf_counter() - start, result, error, tb)
    return status


def _claim(db: Database, job_id: str, slot: int) -> int | None:
    try:
        with db.session() as s:
            row = schema.JobRun(job_id=job_id, slot=slot, instance=instance_name(),
                                started_at=utcnow(), status="running")  # fmt: skip
            s.add(row)
            s.flush()
            return row.id
    except StorageError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            return None
        raise


def _finish(
    db: Database, run_id: int, status: str, seconds: float, result: Any,
    error: str | None, tb: str | None,
) -> None:  # fmt: skip
    try:
        with db.session() as s:
            row = s.get(schema.JobRun, run_id)
            if row is not None:
                row.status, row.finished_at, row.duration_s = status, utcnow(), seconds
                row.result = result if isinstance(result, dict) else None
                row.error, row.traceback = error, tb
    except Exception:
        log.exception("could not record the end of job run %s", run_id)


# --- the built-in job bodies ----------------------------------------------------------


def latency_detection() -> dict[str, Any]:
    """Run the latency detector once."""
    from monitor.detect import LatencyDetector, run_detection

    settings, db = context()
    events = run_detection(db, settings, detectors=[LatencyDetector(settings)])
    return {"events": [e.to_dict() for e in events]}


def drift_detection() -> dict[str, Any]:
    """Run the drift detector once."""
    from monitor.detect import DriftDetector, run_detection

    settings, db = context()
    events = run_detection(db, settings, detectors=[DriftDetector(settings)])
    return {"events": [e.to_dict() for e in events]}


def performance_detection() -> dict[str, Any]:
    """Compare realized performance (labels joined to predictions) with its reference window."""
    from monitor.detect import run_detection
    from monitor.performance import PerformanceDetector

    settings, db = context()
    events = run_detection(db, settings, detectors=[PerformanceDetector(settings)])
    return {"events": [e.to_dict() for e in events]}


def retune() -> dict[str, Any]:
    """Handle pending retune requests (one tuning run per model, oldest request first)."""
    from monitor.events import retune_requests

    settings, db = context()
    done: dict[str, str] = {}
    for request in retune_requests(db, "pending"):
        if not _claim_request(db, request.id):
            continue  # another serve process took it since we listed them
        if request.model in done:
            mark_request(
                db, request.id, "done", f"covered by the run for request {done[request.model]}"
            )
            continue
        done[request.model] = str(request.id)
        try:
            from tuner.tuning import run_tuning

            outcome = run_tuning(
                db, settings, request.model, slo_ms=settings.tune_slo_ms,
                objective=settings.tune_objective, retune_request_id=request.id,
                quick=settings.tune_quick,
            )  # fmt: skip
            mark_request(db, request.id, *_request_result(outcome))
        except Exception as exc:
            mark_request(db, request.id, "failed", str(exc)[:2000])
    return {"handled": len(done)}


def _claim_request(db: Database, request_id: int) -> bool:
    """Mark a pending retune request running; False if another process claimed it first."""
    t = schema.RetuneRequest
    with db.session() as s:
        stmt = (
            update(t)
            .where(t.id == request_id, t.status == "pending")
            .values(status="running", note="", updated_at=utcnow())
        )
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _request_result(outcome: Any) -> tuple[str, str]:
    """A retune request's status and note from its tuning run's outcome.

    ``done`` when a winner was registered; ``no_change`` (with the reason) when nothing beat
    the incumbent, so nobody mistakes it for a fix.
    """
    if outcome.outcome == "no_change":
        return "no_change", f"tuning run {outcome.run_id}: no change: {outcome.reason}"
    winner = outcome.winner.version if outcome.winner else "none"
    return "done", f"tuning run {outcome.run_id}: winner {winner} ({outcome.reason})"


def mark_request(db: Database, request_id: int, status: str, note: str) -> None:
    """Record what happened to a retune request (pending, running, done, no_change, failed)."""
    with db.session() as s:
        row = s.get(schema.RetuneRequest, request_id)
        if row is not None:
            row.status, row.note, row.updated_at = status, note, utcnow()


def experiment_analysis() -> dict[str, Any]:
    """Judge running experiments, then watch recently applied promotions."""
    from tuner.analysis import run_analysis, watch_promotions

    settings, db = context()
    try:
        verdicts = run_analysis(db, settings)
    finally:  # the post-promotion watch runs whatever happened to the analysis
        watched = watch_promotions(db, settings)
    return {
        "verdicts": [{"experiment_id": v.experiment_id, "decision": v.decision,
                      "reason": v.reason, "promotion_id": v.promotion_id} for v in verdicts],
        "watched": watched,
    }  # fmt: skip


def fidelity() -> dict[str, Any]:
    """Replay each champion's recent inputs through it and its source (fidelity_drop events)."""
    from tuner.fidelity import run_fidelity

    settings, db = context()
    return {"checks": [c.to_dict() for c in run_fidelity(db, settings)]}


def retention() -> dict[str, Any]:
    """Delete and roll up telemetry past its retention (``tunewatch db prune``)."""
    from monitor.retention import prune

    settings, db = context()
    return prune(db, settings).to_dict()
