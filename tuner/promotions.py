"""Promotions: a challenger becomes champion only after one decision, by a person or a policy.

Every state change is a compare-and-set (``UPDATE ... WHERE status = 'pending'``) in one
transaction with its audit entry, so two concurrent approvals, or an approve racing a reject,
give exactly one decision and a :class:`~tuner.errors.Conflict` for the other, across threads
and processes alike. Applying makes the challenger the champion and retires the old one; a
watch window after that rolls back on a regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from monitor import schema
from monitor.registry import get_version
from monitor.storage import Database, as_utc, utcnow
from tuner import audit
from tuner.errors import Conflict, NotFound, TunerError
from tuner.registry import verified_artifact

STATUSES = ("pending", "approved", "rejected", "applied", "rolled_back")
DEFAULT_WATCH = timedelta(minutes=30)


@dataclass(frozen=True)
class PromotionInfo:
    """A promotion request and its decision."""

    id: int
    model: str
    experiment_id: int | None
    from_version: str
    to_version: str
    status: str
    evidence: dict[str, Any]
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    note: str
    applied_at: datetime | None
    watch_until: datetime | None
    rollback_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""

        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "id": self.id, "model": self.model, "experiment_id": self.experiment_id,
            "from_version": self.from_version, "to_version": self.to_version,
            "status": self.status, "evidence": self.evidence,
            "created_at": self.created_at.isoformat(), "decided_at": iso(self.decided_at),
            "decided_by": self.decided_by, "note": self.note, "applied_at": iso(self.applied_at),
            "watch_until": iso(self.watch_until), "rollback_reason": self.rollback_reason,
        }  # fmt: skip


def _info(r: schema.Promotion) -> PromotionInfo:
    def utc(t: datetime | None) -> datetime | None:
        return as_utc(t) if t else None

    return PromotionInfo(
        r.id, r.model, r.experiment_id, r.from_version, r.to_version, r.status, dict(r.evidence),
        as_utc(r.created_at), utc(r.decided_at), r.decided_by, r.note, utc(r.applied_at),
        utc(r.watch_until), r.rollback_reason,
    )  # fmt: skip


def get(db: Database, promotion_id: int) -> PromotionInfo:
    """One promotion.

    Raises:
        NotFound: no promotion has that id.
    """
    with db.session() as s:
        row = s.get(schema.Promotion, promotion_id)
        if row is None:
            raise NotFound(f"promotion {promotion_id} does not exist: see `tunewatch promotions`")
        return _info(row)


def list_promotions(
    db: Database, *, model: str | None = None, status: str | None = None
) -> list[PromotionInfo]:
    """Promotions, newest first."""
    if status is not None and status not in STATUSES:
        raise TunerError(f"status {status!r} is not one of {STATUSES}")
    t = schema.Promotion
    stmt = select(t).order_by(t.id.desc())
    if model is not None:
        stmt = stmt.where(t.model == model)
    if status is not None:
        stmt = stmt.where(t.status == status)
    with db.session() as s:
        return [_info(r) for r in s.scalars(stmt)]


def request(
    db: Database, model: str, to_version: str, *, evidence: dict[str, Any],
    experiment_id: int | None = None, by: str = "analysis", watch: timedelta = DEFAULT_WATCH,
) -> PromotionInfo:  # fmt: skip
    """Ask for ``to_version`` to become champion; applied at once if the model's policy
    explicitly opts into auto-approval.

    Raises:
        Conflict: the model already has a pending promotion.
    """
    current = _champion_version(db, model)
    now = utcnow()
    with db.session() as s:
        t = schema.Promotion
        pending = s.scalars(select(t).where(t.model == model, t.status == "pending")).first()
        if pending is not None:
            raise Conflict(f"model {model!r} already has pending promotion {pending.id}")
        row = schema.Promotion(
            model=model, experiment_id=experiment_id, from_version=current,
            to_version=to_version, status="pending", evidence=evidence, created_at=now, note="",
        )  # fmt: skip
        s.add(row)
        s.flush()
        audit.record(s, actor=by, action="promotion_requested", entity="promotion",
                     entity_id=row.id, model=model, reason=f"{current} -> {to_version}",
                     details={"experiment_id": experiment_id})  # fmt: skip
        promotion_id = row.id
    if _auto_approve(db, model):
        return approve(db, promotion_id, by="policy:auto-approve",
                       note="the model's policy opts into auto-approval", watch=watch)  # fmt: skip
    return get(db, promotion_id)


def _champion_version(db: Database, model: str) -> str:
    from monitor.registry import champion

    return champion(db, model).version


def _auto_approve(db: Database, model: str) -> bool:
    with db.session() as s:
        row = s.scalars(select(schema.RegisteredModel).where(
            schema.RegisteredModel.name == model)).first()  # fmt: skip
        return bool(row is not None and row.policy.get("auto_approve") is True)


def approve(
    db: Database, promotion_id: int, *, by: str, note: str = "",
    watch: timedelta = DEFAULT_WATCH,
) -> PromotionInfo:  # fmt: skip
    """Approve a pending promotion and apply it: the challenger becomes champion.

    Raises:
        Conflict: it was already decided (by whom and how is in the message).
        ArtifactError: the challenger's artifact fails its sha256 check (nothing changes).
    """
    _need_actor(by)
    current = get(db, promotion_id)
    verified_artifact(get_version(db, current.model, current.to_version))
    now = utcnow()
    with db.session() as s:
        _decide(s, promotion_id, "approved", by, note, now)
        _apply(s, current, now, watch)
        audit.record(s, actor=by, action="promotion_approved", entity="promotion",
                     entity_id=promotion_id, model=current.model, reason=note,
                     details={"from": current.from_version, "to": current.to_version})  # fmt: skip
    return get(db, promotion_id)


def reject(db: Database, promotion_id: int, *, by: str, note: str = "") -> PromotionInfo:
    """Reject a pending promotion; its experiment stops and the challenger is rejected.

    Raises:
        Conflict: it was already decided.
    """
    _need_actor(by)
    current = get(db, promotion_id)
    now = utcnow()
    with db.session() as s:
        _decide(s, promotion_id, "rejected", by, note, now)
        _end_experiment(s, current.experiment_id, "stopped", f"promotion rejected by {by}", now)
        _set_version(s, current.model, current.to_version, "rejected", now)
        audit.record(s, actor=by, action="promotion_rejected", entity="promotion",
                     entity_id=promotion_id, model=current.model, reason=note)  # fmt: skip
    return get(db, promotion_id)


def _need_actor(by: str) -> None:
    if not by or not by.strip():
        raise TunerError("a decision needs the name of who makes it (--by NAME)")


def _decide(s: Session, promotion_id: int, status: str, by: str, note: str, now: datetime) -> None:
    t = schema.Promotion
    done = s.execute(
        update(t).where(t.id == promotion_id, t.status == "pending")
        .values(status=status, decided_by=by, decided_at=now, note=note)
    )  # fmt: skip
    if done.rowcount != 1:  # type: ignore[attr-defined]
        s.rollback()
        row = s.get(t, promotion_id)
        assert row is not None
        raise Conflict(
            f"promotion {promotion_id} was already decided: {row.status} by {row.decided_by} "
            f"at {row.decided_at}"
        )


def _apply(s: Session, p: PromotionInfo, now: datetime, watch: timedelta) -> None:
    t = schema.ModelVersion
    current = s.scalars(select(t.version).where(t.model == p.model, t.status == "champion")).first()
    if current != p.from_version:  # e.g. an earlier promotion was rolled back meanwhile
        raise Conflict(
            f"promotion {p.id} would replace {p.model}:{p.from_version}, but the champion is "
            f"now {current}: reject it and let a new experiment judge {p.to_version}"
        )
    _set_version(s, p.model, p.from_version, "retired", now)  # first: one champion at a time
    _set_version(s, p.model, p.to_version, "champion", now)
    _end_experiment(s, p.experiment_id, "promoted", f"{p.to_version} promoted", now)
    row = s.get(schema.Promotion, p.id)
    assert row is not None
    row.status, row.applied_at, row.watch_until = "applied", now, now + watch


def _set_version(s: Session, model: str, version: str, status: str, now: datetime) -> None:
    t = schema.ModelVersion
    s.execute(update(t).where(t.model == model, t.version == version)
              .values(status=status, updated_at=now))  # fmt: skip
    s.flush()


def _end_experiment(
    s: Session, experiment_id: int | None, status: str, reason: str, now: datetime
) -> None:
    if experiment_id is None:
        return
    t = schema.Experiment
    s.execute(
        update(t).where(t.id == experiment_id, t.status.in_(("running", "promotion_pending")))
        .values(status=status, share=0.0, ended_at=now, reason=reason, updated_at=now)
    )  # fmt: skip


def rollback(db: Database, promotion_id: int, *, reason: str, by: str = "watch") -> PromotionInfo:
    """Undo an applied promotion: the previous champion serves again.

    Raises:
        Conflict: the promotion is not applied (or was already rolled back).
    """
    current = get(db, promotion_id)
    now = utcnow()
    t = schema.Promotion
    with db.session() as s:
        done = s.execute(update(t).where(t.id == promotion_id, t.status == "applied")
                         .values(status="rolled_back", rollback_reason=reason))  # fmt: skip
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"promotion {promotion_id} is {current.status}, not applied")
        _set_version(s, current.model, current.to_version, "rejected", now)
        _set_version(s, current.model, current.from_version, "champion", now)
        audit.record(s, actor=by, action="promotion_rolled_back", entity="promotion",
                     entity_id=promotion_id, model=current.model, reason=reason)  # fmt: skip
    return get(db, promotion_id)


def watched(db: Database, now: datetime | None = None) -> list[PromotionInfo]:
    """Applied promotions still inside their post-promotion watch window."""
    now = now or utcnow()
    return [p for p in list_promotions(db, status="applied")
            if p.watch_until is not None and p.watch_until > now]  # fmt: skip
