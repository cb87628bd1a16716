"""Experiments: route a share of live traffic (or a shadow copy) to a challenger version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from monitor import schema
from monitor.errors import StorageError
from monitor.registry import champion, get_version
from monitor.storage import Database, as_utc, utcnow
from tuner import audit
from tuner.errors import Conflict, NotFound, TunerError
from tuner.registry import verified_artifact

LIVE = ("running", "promotion_pending")
# Paused: inconclusive at its maximum duration with on_inconclusive="pause"; out of traffic
# (routing serves running and promotion_pending only) but not ended, for a person to stop.
OPEN = (*LIVE, "paused")
STATUSES = (*OPEN, "promoted", "rolled_back", "inconclusive", "stopped")
ON_INCONCLUSIVE = ("stop", "pause")


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment as callers see it."""

    id: int
    model: str
    champion_version: str
    challenger_version: str
    share: float
    shadow: bool
    status: str
    min_samples: int
    max_duration_s: int
    started_at: datetime
    ended_at: datetime | None
    started_by: str
    reason: str
    analysis: dict[str, Any]
    dry_run: bool = False
    on_inconclusive: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "id": self.id, "model": self.model, "champion_version": self.champion_version,
            "challenger_version": self.challenger_version, "share": self.share,
            "shadow": self.shadow, "status": self.status, "min_samples": self.min_samples,
            "max_duration_s": self.max_duration_s, "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "started_by": self.started_by, "reason": self.reason, "analysis": self.analysis,
            "dry_run": self.dry_run, "on_inconclusive": self.on_inconclusive,
        }  # fmt: skip


def info(row: schema.Experiment) -> ExperimentInfo:
    """Plain dataclass of an ORM row."""
    return ExperimentInfo(
        row.id, row.model, row.champion_version, row.challenger_version, row.share, row.shadow,
        row.status, row.min_samples, row.max_duration_s, as_utc(row.started_at),
        as_utc(row.ended_at) if row.ended_at else None, row.started_by, row.reason,
        dict(row.analysis), bool(row.dry_run), row.on_inconclusive,
    )  # fmt: skip


def start(
    db: Database, model: str, candidate: str, *, share: float = 0.1, shadow: bool = False,
    by: str = "cli", min_samples: int = 200, max_duration_s: int = 86_400,
    dry_run: bool = False, on_inconclusive: str = "stop",
) -> ExperimentInfo:  # fmt: skip
    """Start routing ``share`` of ``model``'s calls (or a shadow copy) to ``candidate``.

    ``dry_run``: watch only; the analysis records its verdicts but never rolls back or
    requests a promotion. ``on_inconclusive``: at the maximum duration without a decision,
    ``stop`` ends the experiment, ``pause`` takes the challenger out of traffic and leaves
    the experiment open for a person.

    Raises:
        TunerError: bad share or on_inconclusive, or the candidate is the champion or was
            rejected.
        ArtifactError: the candidate's artifact fails its sha256 check.
        Conflict: the model already has a live experiment.
    """
    if not 0.0 <= share <= 1.0:
        raise TunerError(f"share={share!r} must be between 0 and 1 (e.g. 0.1 for 10 %)")
    if on_inconclusive not in ON_INCONCLUSIVE:
        raise TunerError(
            f"on_inconclusive={on_inconclusive!r} is not one of {', '.join(ON_INCONCLUSIVE)}"
        )
    if min_samples < 1 or max_duration_s < 1:
        raise TunerError(
            f"min_samples={min_samples} and max_duration_s={max_duration_s} must be >= 1"
        )
    champ = champion(db, model)
    challenger = get_version(db, model, candidate)
    if challenger.version == champ.version:
        raise TunerError(f"{model}:{candidate} is already the champion: pick a candidate")
    if challenger.status in ("rejected", "retired"):
        raise TunerError(f"{model}:{candidate} is {challenger.status}: it cannot be tried again")
    verified_artifact(challenger)
    now = utcnow()
    try:
        with db.session() as s:
            row = schema.Experiment(
                model=model, champion_version=champ.version, challenger_version=candidate,
                share=share, shadow=shadow, status="running", min_samples=min_samples,
                max_duration_s=max_duration_s, started_at=now, started_by=by, reason="",
                analysis={}, updated_at=now, dry_run=dry_run, on_inconclusive=on_inconclusive,
            )  # fmt: skip
            s.add(row)
            s.flush()
            details = {"challenger": candidate, "share": share, "shadow": shadow,
                       "dry_run": dry_run, "on_inconclusive": on_inconclusive}  # fmt: skip
            audit.record(s, actor=by, action="experiment_started", entity="experiment",
                         entity_id=row.id, model=model, details=details)  # fmt: skip
            return info(row)
    except StorageError as exc:
        if "uq_experiments_one_live" in str(exc) or "UNIQUE" in str(exc).upper():
            live = [e for e in list_experiments(db, model) if e.status in LIVE]
            ids = ", ".join(str(e.id) for e in live)
            raise Conflict(
                f"model {model!r} already has a live experiment ({ids}): stop it first with "
                f"`tunewatch experiment stop ID`"
            ) from None
        raise


def get(db: Database, experiment_id: int) -> ExperimentInfo:
    """One experiment.

    Raises:
        NotFound: no experiment has that id.
    """
    with db.session() as s:
        row = s.get(schema.Experiment, experiment_id)
        if row is None:
            raise NotFound(
                f"experiment {experiment_id} does not exist: see `tunewatch experiments`"
            )
        return info(row)


def list_experiments(
    db: Database, model: str | None = None, status: str | None = None
) -> list[ExperimentInfo]:
    """Experiments, newest first."""
    t = schema.Experiment
    stmt = select(t).order_by(t.id.desc())
    if model is not None:
        stmt = stmt.where(t.model == model)
    if status is not None:
        stmt = stmt.where(t.status == status)
    with db.session() as s:
        return [info(r) for r in s.scalars(stmt)]


def end(
    db: Database, experiment_id: int, status: str, *, by: str, reason: str,
    action: str = "experiment_stopped", analysis: dict[str, Any] | None = None,
) -> ExperimentInfo:  # fmt: skip
    """End a live experiment (share to 0) with ``status`` and the reason; once only.

    Raises:
        Conflict: the experiment already ended.
    """
    get(db, experiment_id)
    t = schema.Experiment
    now = utcnow()
    values: dict[str, Any] = {"status": status, "share": 0.0, "ended_at": now,
                              "reason": reason, "updated_at": now}  # fmt: skip
    if analysis is not None:
        values["analysis"] = analysis
    with db.session() as s:
        done = s.execute(
            update(t).where(t.id == experiment_id, t.status.in_(OPEN)).values(**values)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            row = s.get(schema.Experiment, experiment_id)
            raise Conflict(
                f"experiment {experiment_id} already ended ({row.status if row else '?'})"
            )
        row = s.get(schema.Experiment, experiment_id)
        assert row is not None
        audit.record(s, actor=by, action=action, entity="experiment", entity_id=experiment_id,
                     model=row.model, reason=reason)  # fmt: skip
        return info(row)


def stop(db: Database, experiment_id: int, *, by: str = "cli", reason: str = "") -> ExperimentInfo:
    """Stop an experiment by hand."""
    return end(db, experiment_id, "stopped", by=by, reason=reason or f"stopped by {by}")


def set_status(db: Database, experiment_id: int, status: str, analysis: dict[str, Any]) -> bool:
    """Record the latest analysis of a running experiment (and ``promotion_pending``).

    One conditional update: an experiment stopped or decided meanwhile is left as it is
    (returns False).
    """
    t = schema.Experiment
    values = {"status": status, "analysis": analysis, "updated_at": utcnow()}
    with db.session() as s:
        stmt = update(t).where(t.id == experiment_id, t.status == "running").values(**values)
        return bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]


def pause(db: Database, experiment_id: int, *, reason: str, analysis: dict[str, Any]) -> bool:
    """Take a running experiment's challenger out of traffic without ending it (once).

    Returns False when it was stopped or decided meanwhile.
    """
    t = schema.Experiment
    with db.session() as s:
        stmt = (
            update(t)
            .where(t.id == experiment_id, t.status == "running")
            .values(status="paused", reason=reason, analysis=analysis, updated_at=utcnow())
        )
        if not s.execute(stmt).rowcount:  # type: ignore[attr-defined]
            return False
        row = s.get(schema.Experiment, experiment_id)
        assert row is not None
        audit.record(s, actor="analysis", action="experiment_paused", entity="experiment",
                     entity_id=experiment_id, model=row.model, reason=reason)  # fmt: skip
        return True
