"""Completeness notices (MPPS, IAN) kept across restarts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completion_notices",
        sa.Column("notice_uid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expected", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("notice_uid", name=op.f("pk_completion_notices")),
    )
    with op.batch_alter_table("completion_notices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_completion_notices_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("completion_notices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_notices_study_uid"))
    op.drop_table("completion_notices")
