"""The one storage seam: engine set-up, schema checks, sessions and typed reads/writes.

All SQL goes through SQLAlchemy with bound parameters. Callers get plain dataclasses.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from monitor import schema
from monitor.errors import ConfigError, SchemaOutOfDate, StorageError

log = logging.getLogger("tunewatch.storage")

UPGRADE_HINT = "run `tunewatch db upgrade --database-url URL` (or `make migrate`)"


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (naive values are taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def json_dumps(value: Any) -> str:
    """JSON for the database: NaN and infinities become null.

    Python writes them as the bare tokens ``NaN`` and ``Infinity``, which are not JSON:
    PostgreSQL refused a whole telemetry batch for one NaN feature of one sampled row.

    >>> json_dumps({"mean": float("nan"), "max": [1.0, float("inf")]})
    '{"mean": null, "max": [1.0, null]}'
    """
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def create_db_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL mode and a busy timeout.

    Raises:
        ConfigError: the URL cannot be parsed or names a driver that is not installed.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "json_serializer": json_dumps}
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 3}
        elif parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 10, "check_same_thread": False}
            if parsed.database in (None, "", ":memory:"):
                # One shared connection, or every thread would see its own empty database.
                kwargs["poolclass"] = StaticPool
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"invalid database URL {url!r}: {exc}. Use e.g. 'sqlite:///tunewatch.db' or "
            "'postgresql+psycopg://user@host:5432/db'"
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def redact(url: str) -> str:
    """Return ``url`` with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# --- migrations ------------------------------------------------------------------------


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(next(iter(migrations.__path__)))))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(False).replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str:
    """The newest schema revision this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision``."""
    _run_alembic(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the schema to ``revision`` (``base`` drops every table)."""
    _run_alembic(engine, "downgrade", revision)


def _run_alembic(engine: Engine, verb: str, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    cfg = _alembic_config(engine)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, verb)(cfg, revision)
    except CommandError as exc:
        raise ConfigError(f"cannot {verb} to revision {revision!r}: {exc}") from None
    except SQLAlchemyError as exc:
        raise StorageError(f"{verb} failed on {redact(str(engine.url))}: {exc}") from exc


def ensure_schema(engine: Engine) -> None:
    """Check the database is at head; create the schema in an empty SQLite file.

    Raises:
        SchemaOutOfDate: the database is behind (or ahead of) this code.
        StorageError: the database cannot be reached.
    """
    try:
        current = current_revision(engine)
        if current is None and engine.dialect.name == "sqlite" and _is_empty(engine):
            upgrade(engine)
            return
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot reach database {redact(str(engine.url))}: {exc}") from exc
    head = head_revision(engine)
    if current != head:
        raise SchemaOutOfDate(
            f"database {redact(str(engine.url))} is at schema revision {current or 'none'}, "
            f"this tunewatch needs {head}: {UPGRADE_HINT}"
        )


def _is_empty(engine: Engine) -> bool:
    return not inspect(engine).get_table_names()


# --- sessions --------------------------------------------------------------------------


class Database:
    """An engine plus a session helper that commits, rolls back and wraps driver errors."""

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if check_schema:
            ensure_schema(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session; commit on success, roll back and raise StorageError on failure."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StorageError(f"database error on {redact(self.url)}: {exc}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# --- sample (de)serialisation -----------------------------------------------------------


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named numeric arrays as ``.npz`` (no pickles)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`pack_arrays`; object arrays are refused."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --- reads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRow:
    """One stored sample: when, which arm, its features, output summary and raw arrays."""

    id: int
    model: str
    version: str
    arm: str
    ts: datetime
    source: str
    input_kind: str
    features: dict[str, Any]
    outputs: dict[str, Any] | None
    raw: dict[str, np.ndarray] | None
    request_id: str | None = None  # what labels join on (monitor.labels)


@dataclass(frozen=True)
class AggregateRow:
    """One per-interval latency aggregate."""

    model: str
    version: str
    arm: str
    interval_start: datetime
    interval_s: int
    calls: int
    errors: int
    items: int
    sum_ms: float
    buckets: dict[int, int]


@dataclass(frozen=True)
class VersionSeen:
    """A model version that has served calls, with when it was first and last seen."""

    model: str
    version: str
    kind: str
    first_seen_at: datetime
    last_seen_at: datetime


def _window(stmt: Any, column: Any, start: datetime | None, end: datetime | None) -> Any:
    if start is not None:
        stmt = stmt.where(column >= as_utc(start))
    if end is not None:
        stmt = stmt.where(column < as_utc(end))
    return stmt


def read_samples(
    db: Database,
    model: str,
    version: str | None = None,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    arm: str | None = None,
    limit: int | None = None,
    with_raw: bool = False,
    newest_first: bool = False,
) -> list[SampleRow]:
    """Read stored samples of a model (optionally one version/arm) in ``[start, end)``."""
    t = schema.Sample
    stmt = select(t).where(t.model == model)
    if version is not None:
        stmt = stmt.where(t.version == version)
    if arm is not None:
        stmt = stmt.where(t.arm == arm)
    stmt = _window(stmt, t.ts, start, end)
    stmt = stmt.order_by(t.ts.desc() if newest_first else t.ts, t.id)
    if limit is not None:
        stmt = stmt.limit(limit)
    with db.session() as s:
        rows = s.scalars(stmt).all()
        return [_sample_row(r, with_raw) for r in rows]


def _sample_row(r: schema.Sample, with_raw: bool) -> SampleRow:
    raw = unpack_arrays(r.raw) if (with_raw and r.raw) else None
    return SampleRow(
        r.id, r.model, r.version, r.arm, as_utc(r.ts), r.source, r.input_kind,
        dict(r.features), r.outputs, raw, r.request_id,
    )  # fmt: skip


def count_samples(db: Database, model: str, version: str | None = None) -> int:
    """How many samples are stored for a model (and version)."""
    t = schema.Sample
    stmt = select(func.count()).select_from(t).where(t.model == model)
    if version is not None:
        stmt = stmt.where(t.version == version)
    with db.session() as s:
        return int(s.scalar(stmt) or 0)


def read_aggregates(
    db: Database,
    model: str | None = None,
    version: str | None = None,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    arm: str | None = None,
) -> list[AggregateRow]:
    """Read per-interval latency aggregates in ``[start, end)`` by interval start."""
    t = schema.LatencyAggregate
    stmt = select(t)
    for column, value in ((t.model, model), (t.version, version), (t.arm, arm)):
        if value is not None:
            stmt = stmt.where(column == value)
    stmt = _window(stmt, t.interval_start, start, end).order_by(t.interval_start)
    with db.session() as s:
        return [
            AggregateRow(
                r.model,
                r.version,
                r.arm,
                as_utc(r.interval_start),
                r.interval_s,
                r.calls,
                r.errors,
                r.items,
                r.sum_ms,
                {int(k): int(v) for k, v in r.buckets.items()},
            )  # fmt: skip
            for r in s.scalars(stmt)
        ]


def read_call_latencies(
    db: Database,
    model: str,
    version: str | None = None,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    arm: str | None = None,
) -> np.ndarray:
    """Per-call latencies (ms) of sampled or backfilled calls that did not fail."""
    t = schema.CallSpan
    stmt = select(t.duration_ms).where(t.model == model, t.status == "ok")
    if version is not None:
        stmt = stmt.where(t.version == version)
    if arm is not None:
        stmt = stmt.where(t.arm == arm)
    stmt = _window(stmt, t.start_time, start, end)
    with db.session() as s:
        return np.asarray(s.scalars(stmt).all(), dtype=float)


def versions_seen(db: Database, model: str | None = None) -> list[VersionSeen]:
    """Every model version seen, oldest first."""
    t = schema.ModelVersionSeen
    stmt = select(t).order_by(t.model, t.first_seen_at)
    if model is not None:
        stmt = stmt.where(t.model == model)
    with db.session() as s:
        return [
            VersionSeen(r.model, r.version, r.kind, as_utc(r.first_seen_at), as_utc(r.last_seen_at))
            for r in s.scalars(stmt)
        ]


def counters(db: Database) -> dict[str, int]:
    """Telemetry counters summed over every process, by name."""
    t = schema.TelemetryCounter
    stmt = select(t.name, func.sum(t.value)).group_by(t.name)
    with db.session() as s:
        return {name: int(total or 0) for name, total in s.execute(stmt)}


def insert_rows(session: Session, table: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert many rows in one executemany."""
    if rows:
        session.execute(table.__table__.insert(), list(rows))
