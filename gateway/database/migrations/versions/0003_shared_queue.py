"""The shared queue: gateway nodes and their heartbeats, study leases, the cluster's fair share per PACS.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fair_share",
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("pass_value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("calling_ae", name=op.f("pk_fair_share")),
    )
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.Column("adopted_by", sa.String(length=64), nullable=True),
        sa.Column("adopted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_nodes")),
    )
    op.create_table(
        "study_leases",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("takeovers", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_study_leases")),
    )
    with op.batch_alter_table("study_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_leases_owner"), ["owner"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("study_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_leases_owner"))

    op.drop_table("study_leases")
    op.drop_table("nodes")
    op.drop_table("fair_share")
