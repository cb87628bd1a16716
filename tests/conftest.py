"""Fixtures for real resources: SQLite files, the PostgreSQL server, small real models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.schema import CreateSchema, DropSchema

from monitor import storage

PG_ADMIN_URL = os.environ.get(
    "TUNEWATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Apps that gunicorn imports in a child process: importing them here (doctest collection)
# would open a deployment of a model that does not exist, in a tunewatch.db in the cwd.
collect_ignore = ["prefork_app.py"]


def _pg_available() -> str | None:
    engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return None
    except Exception as exc:  # any failure to connect means "not available"
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


def require_postgres() -> None:
    """Skip (outside CI) or fail (under CI=true) when PostgreSQL is not reachable."""
    reason = _pg_available()
    if reason is None:
        return
    message = f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
    pytest.skip(message)


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """URL of a fresh SQLite file (upgraded automatically on first use)."""
    return f"sqlite:///{tmp_path}/tunewatch.db"  # type: ignore[str-bytes-safe]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema (dropped afterwards)."""
    require_postgres()
    name = f"tw_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(CreateSchema(name))
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{name}"
    with admin.begin() as conn:
        conn.execute(DropSchema(name, cascade=True))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """Each storage backend in turn, at the head schema revision."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/tunewatch.db"  # type: ignore[str-bytes-safe]
        yield url
        return
    pg = request.getfixturevalue("pg_url")
    engine = storage.create_db_engine(pg)
    storage.upgrade(engine)
    engine.dispose()
    yield pg
