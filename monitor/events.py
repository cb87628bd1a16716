"""Detection events with hysteresis (one open event per condition) and notifications.

An event opens when a condition is first flagged, is updated (not duplicated) while it stays
flagged, and resolves itself when the condition clears. Opening and resolving notify: the log
always, and a webhook (POST JSON, timeout, retries with backoff) when one is configured. A
failing webhook is logged and never breaks detection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from monitor import schema
from monitor.errors import ConfigError, NotFound
from monitor.storage import Database, as_utc, utcnow

log = logging.getLogger("tunewatch.events")

KINDS = (
    "latency_regression",
    "data_drift",
    "prediction_drift",
    "fidelity_drop",
    "performance_drop",
    "experiment_rollback",
    "promotion_rollback",
)
STATUSES = ("open", "acknowledged", "resolved")


@dataclass(frozen=True)
class Finding:
    """What a detector concluded about one condition in one run."""

    kind: str
    model: str
    version: str
    arm: str
    flagged: bool
    severity: str
    summary: str
    details: dict[str, Any]

    @property
    def condition(self) -> str:
        """The condition's identity: one open event per condition."""
        return condition_key(self.kind, self.model, self.version, self.arm)


def condition_key(kind: str, model: str, version: str, arm: str) -> str:
    """The identity of a condition (an event kind on one model, version and arm)."""
    return "|".join((kind, model, version, arm))


@dataclass(frozen=True)
class EventRecord:
    """An event as callers see it."""

    id: int
    kind: str
    model: str
    version: str
    arm: str
    severity: str
    summary: str
    details: dict[str, Any]
    status: str
    occurrences: int
    opened_at: datetime
    updated_at: datetime
    acknowledged_by: str | None
    resolved_at: datetime | None
    action: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "id": self.id, "kind": self.kind, "model": self.model, "version": self.version,
            "arm": self.arm, "severity": self.severity, "summary": self.summary,
            "details": self.details, "status": self.status, "occurrences": self.occurrences,
            "opened_at": self.opened_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "acknowledged_by": self.acknowledged_by,
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
            "action": self.action,
        }  # fmt: skip


def _record(row: schema.Event, action: str = "") -> EventRecord:
    return EventRecord(
        row.id, row.kind, row.model, row.version, row.arm, row.severity, row.summary,
        dict(row.details), row.status, row.occurrences, as_utc(row.opened_at),
        as_utc(row.updated_at), row.acknowledged_by,
        as_utc(row.resolved_at) if row.resolved_at else None, action,
    )  # fmt: skip


def apply_finding(
    db: Database, finding: Finding, *, retune_kinds: Sequence[str] = ()
) -> EventRecord | None:
    """Open, update or resolve the event of ``finding``'s condition; None when nothing changes.

    A newly opened event of a kind in ``retune_kinds`` also records a retune request.
    """
    now = utcnow()
    with db.session() as s:
        open_row = s.scalars(
            select(schema.Event).where(
                schema.Event.condition == finding.condition, schema.Event.status != "resolved"
            )
        ).first()
        if finding.flagged and open_row is None:
            row = _new_event(finding, now)
            s.add(row)
            s.flush()
            if finding.kind in retune_kinds:
                s.add(_retune(finding, row.id, now))
            return _record(row, "opened")
        if finding.flagged and open_row is not None:
            open_row.occurrences += 1
            open_row.updated_at = now
            open_row.severity = finding.severity
            open_row.summary = finding.summary
            open_row.details = finding.details
            return _record(open_row, "updated")
        if open_row is not None:
            open_row.status = "resolved"
            open_row.resolved_at = open_row.updated_at = now
            open_row.details = {**open_row.details, "resolution": finding.details}
            return _record(open_row, "resolved")
    return None


def _new_event(finding: Finding, now: datetime) -> schema.Event:
    return schema.Event(
        kind=finding.kind, model=finding.model, version=finding.version, arm=finding.arm,
        condition=finding.condition, severity=finding.severity, summary=finding.summary,
        details=finding.details, status="open", occurrences=1, opened_at=now, updated_at=now,
    )  # fmt: skip


def _retune(finding: Finding, event_id: int, now: datetime) -> schema.RetuneRequest:
    return schema.RetuneRequest(
        model=finding.model, version=finding.version, reason=finding.summary,
        event_id=event_id, status="pending", created_at=now, updated_at=now, note="",
    )  # fmt: skip


def list_events(
    db: Database, *, model: str | None = None, status: str | None = None, limit: int = 500
) -> list[EventRecord]:
    """Events, newest first, optionally for one model and/or status."""
    if status is not None and status not in STATUSES:
        raise ConfigError(f"status {status!r} is not one of {STATUSES}")
    stmt = select(schema.Event).order_by(schema.Event.id.desc()).limit(limit)
    if model is not None:
        stmt = stmt.where(schema.Event.model == model)
    if status is not None:
        stmt = stmt.where(schema.Event.status == status)
    with db.session() as s:
        return [_record(r) for r in s.scalars(stmt)]


def acknowledge(db: Database, event_id: int, by: str = "") -> EventRecord:
    """Mark an open event acknowledged (it still resolves itself when the condition clears).

    Raises:
        NotFound: no event has that id.
    """
    with db.session() as s:
        row = s.get(schema.Event, event_id)
        if row is None:
            raise NotFound(f"event {event_id} does not exist: see `tunewatch events`")
        if row.status == "open":
            row.status = "acknowledged"
            row.acknowledged_at = row.updated_at = utcnow()
            row.acknowledged_by = by or None
        return _record(row, "acknowledged")


@dataclass(frozen=True)
class RetuneRecord:
    """A pending or handled retune request."""

    id: int
    model: str
    version: str
    reason: str
    event_id: int | None
    status: str
    created_at: datetime
    note: str = ""


def retune_requests(db: Database, status: str | None = "pending") -> list[RetuneRecord]:
    """Retune requests, oldest first."""
    stmt = select(schema.RetuneRequest).order_by(schema.RetuneRequest.id)
    if status is not None:
        stmt = stmt.where(schema.RetuneRequest.status == status)
    with db.session() as s:
        return [
            RetuneRecord(
                r.id,
                r.model,
                r.version,
                r.reason,
                r.event_id,
                r.status,
                as_utc(r.created_at),
                r.note,
            )  # fmt: skip
            for r in s.scalars(stmt)
        ]


class Notifier:
    """Tells people about opened and resolved events: the log, and an optional webhook.

    The webhook body is JSON with a one-line ``text`` (what Slack and Mattermost incoming
    webhooks post as is) beside the structured ``event`` (or ``message`` for plain notes).

    >>> Notifier.text_of("event 3 opened, warning", "clf:v2 latency x1.4 <p95>")
    '[tunewatch] event 3 opened, warning: clf:v2 latency x1.4 &lt;p95&gt;'
    """

    def __init__(
        self,
        webhook_url: str = "",
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.webhook_url = webhook_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def notify(self, event: EventRecord) -> bool:
        """Send one notification; True when every channel accepted it. Never raises."""
        level = logging.INFO if event.action == "resolved" else logging.WARNING
        log.log(level, "event %s %s: %s", event.id, event.action, event.summary)
        if not self.webhook_url:
            return True
        head = f"{event.kind} {event.action}, {event.severity} (event {event.id})"
        return self._post({"text": self.text_of(head, event.summary), "event": event.to_dict()})

    def notify_text(self, text: str) -> bool:
        """Send a plain message (e.g. a promotion waiting for approval). Never raises."""
        log.warning("%s", text)
        if not self.webhook_url:
            return True
        return self._post({"text": self.text_of("", text), "message": text})

    @staticmethod
    def text_of(head: str, body: str) -> str:
        """The chat line: ``[tunewatch] head: body``, with Slack's three control characters
        (``&``, ``<``, ``>``) escaped so a summary cannot form a link or a mention."""
        line = f"{head}: {body}" if head else body
        escaped = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f"[tunewatch] {escaped}"

    def _post(self, payload: dict[str, Any]) -> bool:
        import httpx

        body = json.dumps(payload, default=str)
        headers = {"content-type": "application/json"}
        for attempt in range(self.retries + 1):
            try:
                resp = httpx.post(self.webhook_url, content=body, headers=headers,
                                  timeout=self.timeout_s)  # fmt: skip
                if resp.status_code < 500 and resp.status_code != 429:
                    if resp.is_success:
                        return True
                    log.error("webhook refused the event: HTTP %s", resp.status_code)
                    return False
            except httpx.HTTPError as exc:
                log.warning("webhook attempt %d failed: %s", attempt + 1, exc)
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        log.error("webhook %s unreachable after %d attempts", self.webhook_url, self.retries + 1)
        return False
