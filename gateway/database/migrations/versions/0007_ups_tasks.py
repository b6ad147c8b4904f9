"""UPS tasks pushed to the gateway by a worklist manager (IHE AIW-I).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ups_tasks",
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("source_ae", sa.String(length=16), nullable=False),
        sa.Column("requester_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=8), server_default="MEDIUM", nullable=False),
        sa.Column("outputs", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("workitem_uid", name=op.f("pk_ups_tasks")),
    )
    with op.batch_alter_table("ups_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ups_tasks_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ups_tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ups_tasks_study_uid"))
    op.drop_table("ups_tasks")
