"""Critical results: one row per study and escalation level (message sent, acknowledged, by whom, when).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "critical_results",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("contact", sa.String(length=128), server_default="", nullable=False),
        sa.Column("channels", sa.String(length=64), server_default="", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("sr_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("results_stored_at", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("notified_at", sa.Float(), nullable=True),
        sa.Column("acknowledged_at", sa.Float(), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=128), server_default="", nullable=False),
        sa.Column("summary", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_critical_results")),
    )
    with op.batch_alter_table("critical_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_critical_results_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_critical_results_study_uid_level"), ["study_uid", "level"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("critical_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_critical_results_study_uid_level"))
        batch_op.drop_index(batch_op.f("ix_critical_results_state"))
    op.drop_table("critical_results")
