"""Alembic environment: runs against the connection tunewatch hands over (or the URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from monitor.schema import Base

config = context.config
target_metadata = Base.metadata


def _ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    # APScheduler owns its job table; Alembic must neither create nor drop it.
    return not (type_ == "table" and name == "apscheduler_jobs")


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        include_object=_ours,
        render_as_batch=True,  # SQLite needs batch mode to alter tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on the given connection, or on a fresh engine for the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


run_migrations_online()
