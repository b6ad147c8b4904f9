"""The system of record: studies and their transitions, instances, series analyses, jobs, deliveries,
notifications, models, audit events.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column(
            "fields",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_event_at"), ["event", "at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("objects", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_try_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_deliveries")),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deliveries_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_deliveries_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), server_default="", nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_instances")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instances_study_uid_series_uid"), ["study_uid", "series_uid"], unique=False
        )

    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=200), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=10), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("cost", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("enqueued_at", sa.Float(), nullable=False),
        sa.Column("deadline_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_jobs_state_priority_enqueued_at"),
            ["state", "priority", "enqueued_at"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_jobs_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "models",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("triton_version", sa.String(length=32), nullable=False),
        sa.Column("algorithm_version", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("model", "triton_version", "algorithm_version", name=op.f("pk_models")),
    )
    op.create_table(
        "notifications",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notifications_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "series_analyses",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=128), server_default="", nullable=False),
        sa.Column("model_version", sa.String(length=32), server_default="", nullable=False),
        sa.Column("model_hash", sa.String(length=64), server_default="", nullable=False),
        sa.Column("algorithm_version", sa.String(length=32), server_default="", nullable=False),
        sa.Column("findings", sa.Integer(), server_default="0", nullable=False),
        sa.Column("stat", sa.Boolean(), server_default="0", nullable=False),
        sa.Column(
            "result_uids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "timings",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_analyses")),
    )
    with op.batch_alter_table("series_analyses", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_series_analyses_model_name_model_version"),
            ["model_name", "model_version"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_series_analyses_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("priority", sa.String(length=10), server_default="ROUTINE", nullable=False),
        sa.Column("stat", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("instances", sa.Integer(), server_default="0", nullable=False),
        sa.Column("series", sa.Integer(), server_default="0", nullable=False),
        sa.Column("findings", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_received_at", sa.Float(), nullable=False),
        sa.Column("last_received_at", sa.Float(), nullable=False),
        sa.Column("state_since", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_studies")),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_studies_calling_ae_first_received_at"),
            ["calling_ae", "first_received_at"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_studies_first_received_at"), ["first_received_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_state_priority"), ["state", "priority"], unique=False)

    op.create_table(
        "study_transitions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["study_uid"],
            ["studies.study_uid"],
            name=op.f("fk_study_transitions_study_uid_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_transitions")),
    )
    with op.batch_alter_table("study_transitions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_transitions_study_uid_at"), ["study_uid", "at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("study_transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_transitions_study_uid_at"))

    op.drop_table("study_transitions")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_state_priority"))
        batch_op.drop_index(batch_op.f("ix_studies_first_received_at"))
        batch_op.drop_index(batch_op.f("ix_studies_calling_ae_first_received_at"))

    op.drop_table("studies")
    with op.batch_alter_table("series_analyses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_analyses_study_uid"))
        batch_op.drop_index(batch_op.f("ix_series_analyses_model_name_model_version"))

    op.drop_table("series_analyses")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notifications_study_uid"))

    op.drop_table("notifications")
    op.drop_table("models")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_study_uid"))
        batch_op.drop_index(batch_op.f("ix_jobs_state_priority_enqueued_at"))

    op.drop_table("jobs")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_study_uid_series_uid"))

    op.drop_table("instances")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_study_uid"))
        batch_op.drop_index(batch_op.f("ix_deliveries_state"))

    op.drop_table("deliveries")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_study_uid"))
        batch_op.drop_index(batch_op.f("ix_audit_events_event_at"))

    op.drop_table("audit_events")
