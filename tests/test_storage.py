"""Schema migrations and the start-up schema check, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import inspect

from monitor import Monitor, SchemaOutOfDate, storage
from monitor.errors import ConfigError

TABLES = {"latency_aggregates", "model_versions_seen", "samples", "spans", "telemetry_counters"}


def test_upgrade_and_downgrade_round_trip(db_url: str) -> None:
    engine = storage.create_db_engine(db_url)
    storage.upgrade(engine)
    assert storage.current_revision(engine) == storage.head_revision(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES
    storage.downgrade(engine, "base")
    assert storage.current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    storage.upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_empty_sqlite_file_is_upgraded_automatically(sqlite_url: str) -> None:
    Monitor(sqlite_url).close()
    engine = storage.create_db_engine(sqlite_url)
    assert storage.current_revision(engine) == storage.head_revision(engine)
    engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    Monitor(sqlite_url).close()
    path = sqlite_url.removeprefix("sqlite:///")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_behind_head_names_the_upgrade_command(pg_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="tunewatch db upgrade"):
        Monitor(pg_url)


def test_non_empty_sqlite_without_schema_is_not_touched(sqlite_url: str) -> None:
    path = sqlite_url.removeprefix("sqlite:///")
    sqlite3.connect(path).execute("create table mine (x int)").connection.commit()
    with pytest.raises(SchemaOutOfDate, match="revision none"):
        Monitor(sqlite_url)


@pytest.mark.parametrize("url", ["nonsense", "nosuchdb://x/y", "postgresql+nodriver://h/d"])
def test_invalid_database_url_fails_at_construction(url: str) -> None:
    with pytest.raises(ConfigError, match=url.replace("+", r"\+")):
        Monitor(url)


def test_unknown_revision_is_a_clear_error(sqlite_url: str) -> None:
    engine = storage.create_db_engine(sqlite_url)
    with pytest.raises(ConfigError, match="'nope'"):
        storage.upgrade(engine, "nope")
    engine.dispose()


def test_migrations_match_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from monitor.schema import Base

    engine = storage.create_db_engine(db_url)
    storage.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_object": lambda o, n, t, r, c: n != "apscheduler_jobs",
            },
        )
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == [], f"schema and migrations differ: write a migration for {diff}"


def test_every_revision_upgrades_to_head(db_url: str) -> None:
    from alembic.script import ScriptDirectory

    engine = storage.create_db_engine(db_url)
    script = ScriptDirectory.from_config(storage._alembic_config(engine))
    revisions = [r.revision for r in script.walk_revisions()][::-1]
    for rev in revisions:
        storage.downgrade(engine, "base")
        storage.upgrade(engine, rev)
        storage.upgrade(engine)
        assert storage.current_revision(engine) == storage.head_revision(engine)
    engine.dispose()
