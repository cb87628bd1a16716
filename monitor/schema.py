"""SQLAlchemy 2 typed models: the one definition of tunewatch's tables (Alembic migrates them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
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
    __table_args__ = (Index("ix_samples_lookup", "model", "version", "ts"),)

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
