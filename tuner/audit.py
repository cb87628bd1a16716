"""The audit log: every state change with who, when, what and why, in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from monitor import schema
from monitor.storage import Database, as_utc, utcnow


def record(
    session: Session, *, actor: str, action: str, entity: str, entity_id: int | None,
    model: str, reason: str = "", details: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Add an audit entry to ``session`` (committed with the change it describes)."""
    session.add(schema.AuditEntry(
        at=utcnow(), actor=actor, action=action, entity=entity, entity_id=entity_id,
        model=model, reason=reason, details=details or {},
    ))  # fmt: skip


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry."""

    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: int | None
    model: str
    reason: str
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "id": self.id, "at": self.at.isoformat(), "actor": self.actor, "action": self.action,
            "entity": self.entity, "entity_id": self.entity_id, "model": self.model,
            "reason": self.reason, "details": self.details,
        }  # fmt: skip


def entries(db: Database, model: str | None = None, limit: int = 200) -> list[AuditRecord]:
    """The newest audit entries first."""
    t = schema.AuditEntry
    stmt = select(t).order_by(t.id.desc()).limit(limit)
    if model is not None:
        stmt = stmt.where(t.model == model)
    with db.session() as s:
        return [
            AuditRecord(
                r.id,
                as_utc(r.at),
                r.actor,
                r.action,
                r.entity,
                r.entity_id,
                r.model,
                r.reason,
                dict(r.details),
            )  # fmt: skip
            for r in s.scalars(stmt)
        ]
