"""SQLAlchemy 2 typed models: the one definition of tunewatch's tables (Alembic migrates them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL so dashboards can index into documents; plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")
UTCDateTime = DateTime(timezone=True)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints stably."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, datetime: UTCDateTime}


class ModelVersionSeen(Base):
    """A model version that has served calls or received logged samples."""

    __tablename__ = "model_versions_seen"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(40), default="callable")
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]


class LatencyAggregate(Base):
    """Per-interval latency histogram of one process for one model/version/arm.

    ``buckets`` maps a log-bucket index ``i`` to a count; bucket ``i`` holds latencies in
    ``(gamma**(i-1), gamma**i]`` milliseconds (see :mod:`monitor.sketch`). A process upserts
    its row for the current interval on every flush, so a crash loses at most one flush.
    """

    __tablename__ = "latency_aggregates"
    __table_args__ = (
        UniqueConstraint(
            "instance_id",
            "model",
            "version",
            "arm",
            "interval_start",
            name="uq_latency_aggregates_slot",
        ),
        Index("ix_latency_aggregates_lookup", "model", "version", "interval_start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100))
    interval_start: Mapped[datetime]
    interval_s: Mapped[int] = mapped_column(Integer)
    calls: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    items: Mapped[int] = mapped_column(BigInteger, default=0)
    sum_ms: Mapped[float] = mapped_column(Float)
    min_ms: Mapped[float] = mapped_column(Float)
    max_ms: Mapped[float] = mapped_column(Float)
    p50_ms: Mapped[float] = mapped_column(Float)
    p95_ms: Mapped[float] = mapped_column(Float)
    p99_ms: Mapped[float] = mapped_column(Float)
    buckets: Mapped[dict[str, Any]]
    error_types: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime]


class CallSpan(Base):
    """One sampled call (an OpenTelemetry span) or one backfilled call with its latency."""

    __tablename__ = "spans"
    __table_args__ = (Index("ix_spans_lookup", "model", "version", "start_time"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100))
    start_time: Mapped[datetime]
    duration_ms: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(10))
    error_type: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(10), default="call")
    attributes: Mapped[dict[str, Any]]


class Sample(Base):
    """One sampled input row with its output summary; ``raw`` is an ``.npz`` of the row."""

    __tablename__ = "samples"
    __table_args__ = (
        Index("ix_samples_lookup", "model", "version", "ts"),
        Index("ix_samples_request", "model", "request_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100))
    ts: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(10), default="call")
    input_kind: Mapped[str] = mapped_column(String(20))
    features: Mapped[dict[str, Any]]
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Size of ``raw`` in bytes, so the per-version raw reservoir is bounded without reading it.
    raw_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The caller's id of the prediction (``Monitor.log(ids=...)``, ``mon.context(request_id=)``),
    # what labels join on (migration 0006).
    request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)


class TelemetryCounter(Base):
    """A cumulative counter of one process (drops and their reasons, internal errors)."""

    __tablename__ = "telemetry_counters"
    __table_args__ = (UniqueConstraint("instance_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[int] = mapped_column(BigInteger)
    host: Mapped[str] = mapped_column(String(200), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime]


# --- detection (migration 0002) ---------------------------------------------------------

_NOT_RESOLVED = "status != 'resolved'"


class Event(Base):
    """A detected condition: one open event per condition, resolved when it clears."""

    __tablename__ = "events"
    __table_args__ = (
        Index(
            "uq_events_open_condition",
            "condition",
            unique=True,
            postgresql_where=text(_NOT_RESOLVED),
            sqlite_where=text(_NOT_RESOLVED),
        ),
        Index("ix_events_model_opened", "model", "opened_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100), default="")
    condition: Mapped[str] = mapped_column(String(600))
    severity: Mapped[str] = mapped_column(String(20))
    summary: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20), default="open")
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    opened_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DriftReport(Base):
    """One drift comparison of a model version: reference vs current window."""

    __tablename__ = "drift_reports"
    __table_args__ = (Index("ix_drift_reports_model_created", "model", "version", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(20))  # "inputs" or "outputs"
    created_at: Mapped[datetime]
    reference_start: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reference_end: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    current_start: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    current_end: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    n_reference: Mapped[int] = mapped_column(Integer)
    n_current: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(30))
    drift_detected: Mapped[bool]
    share_drifted: Mapped[float] = mapped_column(Float)
    method_note: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(Text, default="")
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class DriftColumn(Base):
    """One column's result in a drift report (a row per column so dashboards can plot it)."""

    __tablename__ = "drift_columns"
    __table_args__ = (Index("ix_drift_columns_report", "report_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    report_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("drift_reports.id", ondelete="CASCADE")
    )
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    column_name: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(100))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted: Mapped[bool]
    status: Mapped[str] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(Text, default="")


class RetuneRequest(Base):
    """A request, made by a detection event, to re-run the tuner for a model."""

    __tablename__ = "retune_requests"
    __table_args__ = (Index("ix_retune_requests_status", "status", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    note: Mapped[str] = mapped_column(Text, default="")


class JobRun(Base):
    """One run of a scheduled job; the unique slot is the cross-process lease."""

    __tablename__ = "job_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "slot", name="uq_job_runs_slot"),
        Index("ix_job_runs_started", "job_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(100))
    slot: Mapped[int] = mapped_column(BigInteger)
    instance: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)


# --- registry and tuning (migration 0003) -----------------------------------------------

_IS_CHAMPION = "status = 'champion'"


class RegisteredModel(Base):
    """A model under tunewatch's care, with its policy (auto experiments, auto approval)."""

    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(40), default="auto")
    policy: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class ModelVersion(Base):
    """A registered version: its artifact (verified by sha256), lineage, config and status."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model", "version", name="uq_model_versions_model_version"),
        Index(
            "uq_model_versions_one_champion",
            "model",
            unique=True,
            postgresql_where=text(_IS_CHAMPION),
            sqlite_where=text(_IS_CHAMPION),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(20))
    artifact_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The version a user registered, from which this one derives (itself for a registered one).
    source_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class TuningRun(Base):
    """One run of the tuner for a model: its inputs, winner and report."""

    __tablename__ = "tuning_runs"
    __table_args__ = (Index("ix_tuning_runs_model_started", "model", "started_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    base_version: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    slo_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    objective: Mapped[str] = mapped_column(String(40))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    winner_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    baseline_throughput: Mapped[float | None] = mapped_column(Float, nullable=True)
    winner_throughput: Mapped[float | None] = mapped_column(Float, nullable=True)
    speedup: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    plot_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    retune_request_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # "registered" (a winner beat the incumbent) or "no_change"; NULL while running or failed.
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    summary: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class TuningTrial(Base):
    """One candidate measured in a tuning run (the leaderboard's rows)."""

    __tablename__ = "tuning_trials"
    __table_args__ = (Index("ix_tuning_trials_run", "run_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tuning_runs.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]]
    artifact_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    throughput: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[dict[str, Any]]
    passed: Mapped[bool]
    reason: Mapped[str] = mapped_column(Text, default="")
    curve: Mapped[dict[str, Any]]
    is_winner: Mapped[bool] = mapped_column(default=False)


# --- experiments, promotions, audit (migration 0004) ------------------------------------

_EXPERIMENT_LIVE = "status IN ('running', 'promotion_pending')"
_PROMOTION_PENDING = "status = 'pending'"


class Experiment(Base):
    """A/B (or shadow) experiment of a challenger version against the model's champion."""

    __tablename__ = "experiments"
    __table_args__ = (
        Index(
            "uq_experiments_one_live",
            "model",
            unique=True,
            postgresql_where=text(_EXPERIMENT_LIVE),
            sqlite_where=text(_EXPERIMENT_LIVE),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    champion_version: Mapped[str] = mapped_column(String(200))
    challenger_version: Mapped[str] = mapped_column(String(200))
    share: Mapped[float] = mapped_column(Float)
    shadow: Mapped[bool]
    status: Mapped[str] = mapped_column(String(30))
    min_samples: Mapped[int] = mapped_column(Integer)
    max_duration_s: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    analysis: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime]
    # Watch-only (migration 0007): the analysis records verdicts but never acts on them.
    dry_run: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    # "stop" ends an inconclusive experiment at its maximum duration; "pause" keeps it live
    # and says so, for a person to decide.
    on_inconclusive: Mapped[str] = mapped_column(String(10), default="stop",
                                                 server_default="stop")  # fmt: skip


class ShadowAggregate(Base):
    """Per-interval agreement of a challenger with the champion on the same (shadowed) calls."""

    __tablename__ = "shadow_aggregates"
    __table_args__ = (
        UniqueConstraint(
            "instance_id", "experiment_id", "interval_start", name="uq_shadow_aggregates_slot"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(64))
    experiment_id: Mapped[int] = mapped_column(BigInteger)
    interval_start: Mapped[datetime]
    compared: Mapped[int] = mapped_column(BigInteger)
    agreed: Mapped[int] = mapped_column(BigInteger)
    score_sum: Mapped[float] = mapped_column(Float)
    challenger_errors: Mapped[int] = mapped_column(BigInteger)
    challenger_ms_sum: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime]


class Promotion(Base):
    """A request to make a challenger the champion: decided once, by a person or a policy."""

    __tablename__ = "promotions"
    __table_args__ = (
        Index(
            "uq_promotions_one_pending",
            "model",
            unique=True,
            postgresql_where=text(_PROMOTION_PENDING),
            sqlite_where=text(_PROMOTION_PENDING),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    experiment_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    from_version: Mapped[str] = mapped_column(String(200))
    to_version: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    evidence: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    watch_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rollback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditEntry(Base):
    """Who changed what, when and why (promotions, rollbacks, experiments, registry)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(60))
    entity: Mapped[str] = mapped_column(String(40))
    entity_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]]


# --- fidelity to the source (migration 0005) ---------------------------------------------


class FidelityCheck(Base):
    """One paired replay of stored inputs through a served version and through its source."""

    __tablename__ = "fidelity_checks"
    __table_args__ = (Index("ix_fidelity_checks_lookup", "model", "version", "ts"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime]
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    source_version: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100), default="champion")
    experiment_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    window_start: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    window_end: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(40))
    # The guard's metrics (e.g. top1_agreement, cosine_mean, abs_err_max) and its tolerance.
    metrics: Mapped[dict[str, Any]]
    tolerance: Mapped[dict[str, Any]]
    passed: Mapped[bool]
    status: Mapped[str] = mapped_column(String(30))
    message: Mapped[str] = mapped_column(Text, default="")
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


# --- ground truth (migration 0006) -------------------------------------------------------


class Label(Base):
    """The true outcome of one prediction, joined to samples by (model, request_id).

    One row per id: a later label for the same id replaces it (``updates`` counts how often).
    ``value`` is a class index or a target value; NULL when the label was missing (NaN).
    """

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("model", "request_id", name="uq_labels_model_request_id"),
        Index("ix_labels_model_ts", "model", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    ts: Mapped[datetime]  # when the outcome happened (the caller's timestamp, else received_at)
    received_at: Mapped[datetime]
    updates: Mapped[int] = mapped_column(Integer, default=0)
