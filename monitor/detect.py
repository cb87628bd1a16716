"""Detectors: latency regressions and data/prediction drift, turned into findings and events.

Each detector is a small class with one method, ``detect(db, now)``, returning findings;
:func:`run_detection` applies them as events (with hysteresis) and notifies.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select

from monitor import schema, sketch
from monitor.errors import ConfigError
from monitor.events import EventRecord, Finding, Notifier, apply_finding, condition_key
from monitor.settings import Settings
from monitor.storage import (
    Database,
    SampleRow,
    as_utc,
    read_aggregates,
    read_call_latencies,
    read_samples,
    utcnow,
    versions_seen,
)

log = logging.getLogger("tunewatch.detect")
REFERENCE_ARM = "reference"
# Output summary keys that are not distributions to test: the probability vector (log loss
# only) and the explicit output kind.
NOT_DRIFTED = frozenset({"probs", "kind"})
Values = tuple[np.ndarray, "np.ndarray | None"]  # latencies and optional counts
Span = tuple["datetime | None", "datetime | None"]


def parse_time(text: str, name: str) -> datetime:
    """Parse an ISO-8601 time (``Z`` allowed); naive times are UTC.

    >>> parse_time("2026-01-31T12:00:00Z", "start").isoformat()
    '2026-01-31T12:00:00+00:00'
    """
    try:
        return as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        raise ConfigError(
            f"{name}={text!r} is not an ISO-8601 time: use e.g. 2026-01-31T12:00:00Z"
        ) from None


class Detector(ABC):
    """A plug-in detector: looks at stored telemetry and returns findings."""

    @abstractmethod
    def detect(self, db: Database, now: datetime, model: str | None = None) -> list[Finding]:
        """Findings for every model version (or just ``model``) as of ``now``."""


# --- latency ---------------------------------------------------------------------------


class LatencyDetector(Detector):
    """Recent window vs the history before it: Mann-Whitney U + Hodges-Lehmann effect gate."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings

    def detect(self, db: Database, now: datetime, model: str | None = None) -> list[Finding]:
        """One finding per model/version/arm that served calls in the recent window."""
        recent_start = now - timedelta(seconds=self.s.latency_recent_s)
        rows = read_aggregates(db, model, start=recent_start, end=now)
        targets = sorted({(r.model, r.version, r.arm) for r in rows})
        live = {(v.model, v.version): v.first_seen_at for v in versions_seen(db, model)}
        findings = []
        for m, v, arm in targets:
            finding = self._one(db, m, v, arm, now, recent_start, live.get((m, v)))
            if finding is not None:
                findings.append(finding)
        return findings

    def baseline_window(
        self, db: Database, condition: str, recent_start: datetime, live_since: datetime | None
    ) -> tuple[datetime, datetime]:
        """The baseline: a fixed period if configured, the one an open event froze, or the
        preceding ``latency_baseline_s`` (not before the version went live)."""
        if self.s.latency_baseline_start and self.s.latency_baseline_end:
            return (
                parse_time(self.s.latency_baseline_start, "latency_baseline_start"),
                parse_time(self.s.latency_baseline_end, "latency_baseline_end"),
            )
        frozen = _open_event_details(db, condition).get("baseline")
        if frozen:
            return parse_time(frozen[0], "baseline"), parse_time(frozen[1], "baseline")
        start = recent_start - timedelta(seconds=self.s.latency_baseline_s)
        if live_since is not None:
            start = max(start, live_since)
        return start, recent_start

    def _one(
        self, db: Database, model: str, version: str, arm: str, now: datetime,
        recent_start: datetime, live_since: datetime | None,
    ) -> Finding | None:  # fmt: skip
        from monitor.stats import compare_latencies

        condition = condition_key("latency_regression", model, version, arm)
        b_start, b_end = self.baseline_window(db, condition, recent_start, live_since)
        base, recent, source = self._latencies(db, model, version, arm, (b_start, b_end),
                                               (recent_start, now))  # fmt: skip
        result = compare_latencies(
            base[0], recent[0], baseline_weights=base[1], recent_weights=recent[1],
            tolerance=self.s.latency_tolerance, alpha=self.s.latency_alpha,
            min_samples=self.s.latency_min_samples,
        )  # fmt: skip
        if result.status != "ok":
            log.info("latency %s:%s[%s]: %s", model, version, arm, result.reason)
            return None
        details = {
            **result.to_dict(), "source": source,
            "baseline": [b_start.isoformat(), b_end.isoformat()],
            "recent": [recent_start.isoformat(), now.isoformat()],
        }  # fmt: skip
        severe = (result.median_ci or (0, 0))[0] > 1 + 3 * self.s.latency_tolerance
        summary = (
            f"{model}:{version} [{arm}] latency regressed: median x{result.median_ratio:.2f}, "
            f"p95 x{result.p95_ratio:.2f} vs baseline ({source})"
            if result.regressed
            else f"{model}:{version} [{arm}] latency within tolerance ({result.reason})"
        )
        return Finding("latency_regression", model, version, arm, result.regressed,
                       "critical" if severe else "warning", summary, details)  # fmt: skip

    def _latencies(
        self,
        db: Database,
        model: str,
        version: str,
        arm: str,
        base: tuple[datetime, datetime],
        recent: tuple[datetime, datetime],
    ) -> tuple[Values, Values, str]:
        need = self.s.latency_min_samples
        per_call = [
            read_call_latencies(db, model, version, start=w[0], end=w[1], arm=arm)
            for w in (base, recent)
        ]
        if all(len(x) >= need for x in per_call):
            return (per_call[0], None), (per_call[1], None), "per_call"
        hists = [
            sketch.merge(r.buckets for r in read_aggregates(db, model, version, start=w[0],
                                                            end=w[1], arm=arm))
            for w in (base, recent)
        ]  # fmt: skip
        (bv, bw), (rv, rw) = sketch.expand(hists[0]), sketch.expand(hists[1])
        return (bv, bw), (rv, rw), "aggregates"


def _open_event_details(db: Database, condition: str) -> dict[str, Any]:
    with db.session() as s:
        row = s.scalars(
            select(schema.Event).where(
                schema.Event.condition == condition, schema.Event.status != "resolved"
            )
        ).first()
        return dict(row.details) if row is not None else {}


# --- drift -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftComparison:
    """A drift result with the windows it compared, for reports and the CLI."""

    model: str
    version: str
    target: str
    result: Any
    reference: tuple[datetime | None, datetime | None]
    current: tuple[datetime | None, datetime | None]
    report_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON: the result, the row counts and the windows."""
        out = dict(self.result.to_dict())
        out.update(
            model=self.model, version=self.version, target=self.target,
            rows={"reference": self.result.n_reference, "current": self.result.n_current},
            reference_window=[_iso(t) for t in self.reference],
            current_window=[_iso(t) for t in self.current], report_id=self.report_id,
        )  # fmt: skip
        return out


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def features_frame(samples: list[SampleRow]) -> pd.DataFrame:
    """Input feature columns of samples as a DataFrame."""
    return pd.DataFrame.from_records([s.features for s in samples])


def outputs_frame(samples: list[SampleRow]) -> pd.DataFrame:
    """Output summaries of samples as a DataFrame (top class is categorical)."""
    # The probability vector (kept for realized log loss) is not a drift column.
    records = [{k: v for k, v in s.outputs.items() if k not in NOT_DRIFTED}
               for s in samples if s.outputs]  # fmt: skip
    frame = pd.DataFrame.from_records(records)
    if "top_class" in frame:
        frame["top_class"] = frame["top_class"].astype("Int64").astype(str)
    return frame


def compare_windows(
    db: Database, settings: Settings, model: str, version: str,
    reference: list[SampleRow], current: list[SampleRow],
    windows: tuple[Span, Span],
) -> list[DriftComparison]:  # fmt: skip
    """Data drift (inputs) and prediction drift (outputs) of two sample sets; stored."""
    from monitor.drift import compute_drift

    out = []
    for target, frame in (("inputs", features_frame), ("outputs", outputs_frame)):
        ref, cur = frame(reference), frame(current)
        if target == "outputs" and ref.empty and cur.empty:
            continue
        result = compute_drift(
            ref, cur, max_rows=settings.drift_max_rows, min_rows=settings.drift_min_rows,
            alpha=settings.drift_alpha, correction=settings.drift_correction,
        )  # fmt: skip
        comp = DriftComparison(model, version, target, result, windows[0], windows[1])
        out.append(_store_report(db, comp))
    return out


def _store_report(db: Database, comp: DriftComparison) -> DriftComparison:
    r = comp.result
    now = utcnow()
    with db.session() as s:
        report = schema.DriftReport(
            model=comp.model, version=comp.version, target=comp.target, created_at=now,
            reference_start=comp.reference[0], reference_end=comp.reference[1],
            current_start=comp.current[0], current_end=comp.current[1],
            n_reference=r.n_reference, n_current=r.n_current, status=r.status,
            drift_detected=r.drift_detected, share_drifted=r.share_drifted,
            method_note=r.method_note, message=r.message,
        )  # fmt: skip
        s.add(report)
        s.flush()
        for c in r.columns:
            s.add(schema.DriftColumn(
                report_id=report.id, model=comp.model, version=comp.version, created_at=now,
                column_name=c.column, kind=c.kind, method=c.method, score=c.score,
                threshold=c.threshold, drifted=c.drifted, status=c.status, note=c.note,
            ))  # fmt: skip
        report_id = report.id
    return DriftComparison(comp.model, comp.version, comp.target, r, comp.reference,
                           comp.current, report_id)  # fmt: skip


def link_report(db: Database, report_id: int | None, event_id: int) -> None:
    """Point a drift report at the event it opened or updated."""
    if report_id is None:
        return
    with db.session() as s:
        report = s.get(schema.DriftReport, report_id)
        if report is not None:
            report.event_id = event_id


class DriftDetector(Detector):
    """Reference window (first N samples after go-live, a time range, or a pinned set under the
    ``reference`` arm) against the current window, per feature and on the outputs."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings

    def detect(self, db: Database, now: datetime, model: str | None = None) -> list[Finding]:
        """One finding per model version and target (inputs, outputs) with current samples."""
        start = now - timedelta(seconds=self.s.drift_current_s)
        findings: list[Finding] = []
        for seen in versions_seen(db, model):
            current = read_samples(db, seen.model, seen.version, start=start, end=now,
                                   limit=self.s.drift_max_rows, newest_first=True)  # fmt: skip
            current = [c for c in current if c.arm != REFERENCE_ARM]
            if not current:
                log.info("drift %s:%s: no samples in the last %d s", seen.model, seen.version,
                         self.s.drift_current_s)  # fmt: skip
                continue
            reference, ref_window = self._reference(db, seen.model, seen.version)
            ref_ids = {r.id for r in reference}
            current = [c for c in current if c.id not in ref_ids]
            comps = compare_windows(db, self.s, seen.model, seen.version, reference, current,
                                    (ref_window, (start, now)))  # fmt: skip
            findings += [f for f in map(_drift_finding, comps) if f is not None]
        return findings

    def _reference(
        self, db: Database, model: str, version: str
    ) -> tuple[list[SampleRow], tuple[datetime | None, datetime | None]]:
        pinned = read_samples(db, model, version, arm=REFERENCE_ARM, limit=self.s.drift_max_rows)
        if pinned:
            return pinned, (pinned[0].ts, pinned[-1].ts)
        if self.s.drift_reference_start and self.s.drift_reference_end:
            window = (
                parse_time(self.s.drift_reference_start, "drift_reference_start"),
                parse_time(self.s.drift_reference_end, "drift_reference_end"),
            )
            rows = read_samples(db, model, version, start=window[0], end=window[1],
                                limit=self.s.drift_max_rows)  # fmt: skip
            return rows, window
        rows = read_samples(db, model, version, limit=self.s.drift_reference_rows)
        return rows, ((rows[0].ts, rows[-1].ts) if rows else (None, None))


def _drift_finding(comp: DriftComparison) -> Finding | None:
    r = comp.result
    if r.status != "ok":
        log.info("drift %s:%s %s: %s", comp.model, comp.version, comp.target, r.message)
        return None
    kind = "data_drift" if comp.target == "inputs" else "prediction_drift"
    drifted = r.drifted_columns
    summary = (
        f"{comp.model}:{comp.version} {comp.target} drifted: {len(drifted)} of "
        f"{len([c for c in r.columns if c.status == 'ok'])} columns ({', '.join(drifted[:5])})"
        if r.drift_detected
        else f"{comp.model}:{comp.version} {comp.target}: no drift"
    )
    severity = "critical" if r.share_drifted >= 0.5 else "warning"
    details = comp.to_dict()  # with its report_id: the event links to the stored report
    return Finding(kind, comp.model, comp.version, "", r.drift_detected, severity, summary, details)


# --- running ---------------------------------------------------------------------------


def default_detectors(settings: Settings) -> list[Detector]:
    """The detectors `tunewatch detect` runs."""
    from monitor.performance import PerformanceDetector

    return [LatencyDetector(settings), DriftDetector(settings), PerformanceDetector(settings)]


def run_detection(
    db: Database,
    settings: Settings,
    *,
    model: str | None = None,
    detectors: list[Detector] | None = None,
    notifier: Notifier | None = None,
    now: datetime | None = None,
) -> list[EventRecord]:
    """Run detectors once; apply findings as events; notify on open/resolve.

    Returns the events opened, updated or resolved by this run.
    """
    now = as_utc(now) if now else utcnow()
    notifier = notifier or Notifier(settings.webhook_url)
    retune_kinds = [k.strip() for k in settings.retune_on.split(",") if k.strip()]
    changed = []
    for detector in detectors or default_detectors(settings):
        for finding in detector.detect(db, now, model):
            event = apply_finding(db, finding, retune_kinds=retune_kinds)
            if event is None:
                continue
            link_report(db, finding.details.get("report_id"), event.id)
            changed.append(event)
            if event.action in ("opened", "resolved"):
                notifier.notify(event)
    return changed
