"""The radiologist in the loop: every reported AI finding, and the verdicts on them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ai_findings",
        sa.Column("tracking_uid", sa.String(length=64), nullable=False),
        sa.Column("sr_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("accession_number", sa.String(length=64), server_default="", nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("model_hash", sa.String(length=64), server_default="", nullable=False),
        sa.Column("algorithm_version", sa.String(length=32), server_default="", nullable=False),
        sa.Column("finding_code", sa.String(length=64), nullable=False),
        sa.Column("finding_scheme", sa.String(length=16), nullable=False),
        sa.Column("finding_meaning", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("image_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("box", JSON, nullable=True),
        sa.Column("stat", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("reported_at", sa.Float(), nullable=False),
        sa.Column("superseded_by", sa.String(length=64), server_default="", nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("tracking_uid", name=op.f("pk_ai_findings")),
    )
    with op.batch_alter_table("ai_findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_findings_sr_uid"), ["sr_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_ai_findings_study_uid"), ["study_uid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_findings_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ai_findings_model_name_model_version"),
            ["model_name", "model_version"],
            unique=False,
        )
    op.create_table(
        "verdicts",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tracking_uid", sa.String(length=64), nullable=False),
        sa.Column("sr_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), server_default="", nullable=False),
        sa.Column("correction", JSON, nullable=True),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("evidence_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("model_name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("model_version", sa.String(length=32), server_default="", nullable=False),
        sa.Column("model_hash", sa.String(length=64), server_default="", nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("seconds_to_verdict", sa.Float(), nullable=True),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column("amended_by", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
    )
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_verdicts_tracking_uid_current"), ["tracking_uid", "current"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_verdicts_study_uid"), ["study_uid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_verdicts_model_name_model_version_at"),
            ["model_name", "model_version", "at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_verdicts_model_name_model_version_at"))
        batch_op.drop_index(batch_op.f("ix_verdicts_study_uid"))
        batch_op.drop_index(batch_op.f("ix_verdicts_tracking_uid_current"))
    op.drop_table("verdicts")
    with op.batch_alter_table("ai_findings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_findings_model_name_model_version"))
        batch_op.drop_index(batch_op.f("ix_ai_findings_accession_number"))
        batch_op.drop_index(batch_op.f("ix_ai_findings_study_uid"))
        batch_op.drop_index(batch_op.f("ix_ai_findings_sr_uid"))
    op.drop_table("ai_findings")
