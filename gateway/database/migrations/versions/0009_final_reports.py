"""Final reports from the RIS, their comparison with the AI (QA items), who viewed the AI results, drift alarms,
and the audited changes of pipelines.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("accession_number", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_studies_accession_number"), ["accession_number"], unique=False)
    op.create_table(
        "result_views",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("viewer", sa.String(length=128), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_views")),
    )
    with op.batch_alter_table("result_views", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_views_study_uid_at"), ["study_uid", "at"], unique=False)
    op.create_table(
        "final_reports",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("status", sa.String(length=1), nullable=False),
        sa.Column("signed_at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("control_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("ai_delivered_before", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("ai_viewed_before", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("ai_assisted", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_final_reports")),
    )
    with op.batch_alter_table("final_reports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_final_reports_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_final_reports_study_uid"), ["study_uid"], unique=False)
    op.create_table(
        "report_comparisons",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("report_id", ID, nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("finding_type", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("ai_positive", sa.Boolean(), nullable=False),
        sa.Column("max_confidence", sa.Float(), nullable=True),
        sa.Column("report_label", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("evidence", sa.Text(), server_default="", nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column("qa_state", sa.String(length=16), nullable=False),
        sa.Column("assigned_to", sa.String(length=128), server_default="", nullable=False),
        sa.Column("qa_note", sa.String(length=256), server_default="", nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_comparisons")),
    )
    with op.batch_alter_table("report_comparisons", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_comparisons_study_uid"), ["study_uid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_report_comparisons_qa_state_at"), ["qa_state", "at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_comparisons_model_name_model_version"),
            ["model_name", "model_version"],
            unique=False,
        )

    op.create_table(
        "drift_alarms",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("site", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at_count", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("notified", sa.Boolean(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_alarms")),
    )
    with op.batch_alter_table("drift_alarms", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_drift_alarms_model_name_model_version_site_kind_at_count"),
            ["model_name", "model_version", "site", "kind", "at_count"],
            unique=True,
        )

    op.create_table(
        "pipeline_changes",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column("before", JSON, nullable=True),
        sa.Column("after", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_changes")),
    )
    with op.batch_alter_table("pipeline_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pipeline_changes_pipeline_at"), ["pipeline", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pipeline_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipeline_changes_pipeline_at"))
    op.drop_table("pipeline_changes")
    with op.batch_alter_table("drift_alarms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drift_alarms_model_name_model_version_site_kind_at_count"))
    op.drop_table("drift_alarms")
    for table, indexes in (
        ("report_comparisons", ("model_name_model_version", "qa_state_at", "study_uid")),
        ("final_reports", ("study_uid", "accession_number")),
        ("result_views", ("study_uid_at",)),
    ):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in indexes:
                batch_op.drop_index(batch_op.f(f"ix_{table}_{name}"))
        op.drop_table(table)
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_accession_number"))
        batch_op.drop_column("accession_number")
