"""lineage (source_version), tuning outcome, raw reservoir sizes, fidelity checks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_version", sa.String(length=200), nullable=True))
    with op.batch_alter_table("tuning_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome", sa.String(length=20), nullable=True))
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("raw_bytes", sa.BigInteger(), nullable=True))
    _backfill_sources()
    op.execute("UPDATE samples SET raw_bytes = LENGTH(raw) WHERE raw IS NOT NULL")
    op.execute("UPDATE tuning_runs SET outcome = 'registered' WHERE winner_version IS NOT NULL")

    op.create_table(
        "fidelity_checks",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("source_version", sa.String(length=200), nullable=False),
        sa.Column("arm", sa.String(length=100), nullable=False),
        sa.Column("experiment_id", sa.BigInteger(), nullable=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=40), nullable=False),
        sa.Column("metrics", _JSON, nullable=False),
        sa.Column("tolerance", _JSON, nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fidelity_checks")),
    )
    with op.batch_alter_table("fidelity_checks", schema=None) as batch_op:
        batch_op.create_index("ix_fidelity_checks_lookup", ["model", "version", "ts"], unique=False)


def _backfill_sources() -> None:
    """A version without a parent is its own source; a derived one inherits its parent's."""
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT id, model, version, parent_version FROM model_versions")
    ).fetchall()
    parent = {(m, v): p for _, m, v, p in rows}

    def source(model: str, version: str) -> str:
        seen = set()
        while parent.get((model, version)) and (model, version) not in seen:
            seen.add((model, version))
            version = str(parent[(model, version)])
        return version

    for row_id, model, version, _ in rows:
        conn.execute(
            sa.text("UPDATE model_versions SET source_version = :s WHERE id = :i"),
            {"s": source(model, version), "i": row_id},
        )


def downgrade() -> None:
    with op.batch_alter_table("fidelity_checks", schema=None) as batch_op:
        batch_op.drop_index("ix_fidelity_checks_lookup")
    op.drop_table("fidelity_checks")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_column("raw_bytes")
    with op.batch_alter_table("tuning_runs", schema=None) as batch_op:
        batch_op.drop_column("outcome")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("source_version")
