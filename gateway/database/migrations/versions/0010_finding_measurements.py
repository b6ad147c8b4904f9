"""The measurements of each reported AI finding (long axis, area, volume, mean HU - as its SR states them), for
the dashboard's findings list.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("ai_findings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("measurements", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ai_findings", schema=None) as batch_op:
        batch_op.drop_column("measurements")
