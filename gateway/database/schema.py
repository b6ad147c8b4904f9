"""The tables of the system of record (SQLAlchemy Core). Times are Unix seconds (float, as in the audit trail);
UIDs are DICOM UIDs (at most 64 characters); no table holds a patient name, ID or birth date.

The Alembic migrations in ``migrations/versions`` create exactly this; a test compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)
AE = String(16)
Json = JSON().with_variant(JSONB(), "postgresql")
Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY

studies = Table(
    "studies",
    metadata,
    Column("study_uid", UID, primary_key=True),
    Column("state", String(20), nullable=False),
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("priority", String(10), nullable=False, server_default="ROUTINE"),
    Column("stat", Boolean, nullable=False, server_default="0"),
    Column("instances", Integer, nullable=False, server_default="0"),
    Column("series", Integer, nullable=False, server_default="0"),
    Column("findings", Integer, nullable=False, server_default="0"),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("state_since", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Column("accession_number", String(64), nullable=False, server_default=""),  # links the final report
    Index(None, "state", "priority"),
    Index(None, "calling_ae", "first_received_at"),
    Index(None, "first_received_at"),
    Index(None, "accession_number"),
)

study_transitions = Table(
    "study_transitions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", UID, ForeignKey("studies.study_uid", ondelete="CASCADE"), nullable=False),
    Column("state", String(20), nullable=False),
    Column("at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index(None, "study_uid", "at"),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", UID, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("modality", String(16), nullable=False, server_default=""),
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("path", Text, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid", "series_uid"),
)

series_analyses = Table(
    "series_analyses",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),  # analysed | failed
    Column("model_name", String(128), nullable=False, server_default=""),
    Column("model_version", String(32), nullable=False, server_default=""),
    Column("model_hash", String(64), nullable=False, server_default=""),
    Column("algorithm_version", String(32), nullable=False, server_default=""),
    Column("findings", Integer, nullable=False, server_default="0"),
    Column("stat", Boolean, nullable=False, server_default="0"),
    Column("result_uids", Json, nullable=False),
    Column("timings", Json, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid"),
    Index(None, "model_name", "model_version"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(200), primary_key=True),  # <study>/<series>/<pipeline>
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("priority", String(10), nullable=False),
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("cost", Integer, nullable=False),  # slices
    Column("state", String(16), nullable=False),  # queued | running | done | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("enqueued_at", Float, nullable=False),
    Column("deadline_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    Index(None, "state", "priority", "enqueued_at"),
    Index(None, "study_uid"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | dead_letter
    Column("objects", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_try_at", Float),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index(None, "study_uid"),
    Index(None, "state"),
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", UID, nullable=False),
    Column("kind", String(32), nullable=False),  # stat | analysis_failure
    Column("state", String(16), nullable=False),  # sent | failed
    Column("at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index(None, "study_uid"),
)

models = Table(
    "models",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("triton_version", String(32), primary_key=True),
    Column("algorithm_version", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("first_seen_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("event", String(64), nullable=False),
    Column("study_uid", UID),
    Column("node", String(64), nullable=False),
    Column("fields", Json, nullable=False),
    Index(None, "study_uid"),
    Index(None, "event", "at"),
)

orders = Table(
    "orders",
    metadata,
    Column("accession_number", String(64), primary_key=True),
    Column("patient_key", String(64), nullable=False, server_default=""),  # SHA-256 of PID-3's first ID
    Column("study_uid", UID, nullable=False, server_default=""),  # when the order names it (OMI IPC-3)
    Column("priority", String(10), nullable=False),  # STAT | URGENT | ROUTINE
    Column("reason", Text, nullable=False, server_default=""),  # OBR-31, reason for study
    Column("procedure_code", String(64), nullable=False, server_default=""),  # OBR-4.1
    Column("procedure_text", Text, nullable=False, server_default=""),  # OBR-4.2
    Column("status", String(16), nullable=False),  # active | cancelled
    Column("message_type", String(16), nullable=False),  # ORM^O01 | OMI^O23
    Column("control_id", String(64), nullable=False, server_default=""),  # MSH-10 of the last message
    Column("expected_images", Integer, nullable=True),  # when the order says how many images the study holds
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid"),
)

# -- the shared queue (several gateways on one database) ----------------------------------------------------------

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),  # a clean stop; a node that stops beating without it died
    Column("adopted_by", String(64)),  # the node that took over a dead node's studies still being received
    Column("adopted_at", Float),
)

study_leases = Table(
    "study_leases",
    metadata,
    # The node analysing a study: every series of the study runs there (its results are collected in one place)
    # while the lease is renewed; a lease that expires lets another node take the whole study over.
    Column("study_uid", UID, primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("claimed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("finished_at", Float),  # the study's completion, written once, by its owner
    Column("takeovers", Integer, nullable=False, server_default="0"),
    Index(None, "owner"),
)

fair_share = Table(
    "fair_share",
    metadata,
    # Stride scheduling across the cluster: each sending PACS's pass (served cost / weight); the row with the
    # empty AE title holds the virtual time that an idle PACS joins at.
    Column("calling_ae", AE, primary_key=True),
    Column("pass_value", Float, nullable=False),
)

# -- critical results (acknowledgement and escalation) ------------------------------------------------------------

critical_results = Table(
    "critical_results",
    metadata,
    # One row per study and level of the escalation ladder, inserted before its message is sent: the unique key
    # makes "one message per study per level" hold across restarts and across nodes.
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", UID, nullable=False),
    Column("level", Integer, nullable=False),
    Column("contact", String(128), nullable=False, server_default=""),  # the contact's name (a role or rota)
    Column("channels", String(64), nullable=False, server_default=""),  # email,webhook,hl7
    # sending -> notified | failed -> acknowledged; "unanswered": the ladder ran out (no message)
    Column("state", String(16), nullable=False),
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("sr_uid", UID, nullable=False, server_default=""),
    Column("results_stored_at", Float, nullable=False),  # the study's first STAT SR stored
    Column("created_at", Float, nullable=False),
    Column("notified_at", Float),
    Column("acknowledged_at", Float),
    Column(
        "acknowledged_by", String(128), nullable=False, server_default=""
    ),  # token name or "link:<contact>"
    Column(
        "summary", Json, nullable=False
    ),  # what the message says: pipeline, model, findings (no patient data)
    Column("detail", Text, nullable=False, server_default=""),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid", "level", unique=True),
    Index(None, "state"),
)

# -- completeness notices (MPPS, IAN) -----------------------------------------------------------------------------

completion_notices = Table(
    "completion_notices",
    metadata,
    # Kept before the N-CREATE / N-SET is answered, so that a restart knows which studies a modality still holds
    # open and which instances it listed (the in-memory assembler is rebuilt from these and the spool).
    Column("notice_uid", UID, primary_key=True),  # the MPPS or IAN SOP Instance UID
    Column("kind", String(8), nullable=False),  # MPPS | IAN
    Column("study_uid", UID, nullable=False),
    Column("status", String(16), nullable=False),  # IN PROGRESS | COMPLETED | DISCONTINUED | AVAILABLE
    Column("expected", Json, nullable=False),  # the SOP Instance UIDs listed (empty while in progress)
    Column("updated_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid"),
)

# -- UPS tasks pushed to the gateway (IHE AIW-I: a worklist manager asks for an analysis) -------------------------

ups_tasks = Table(
    "ups_tasks",
    metadata,
    Column("workitem_uid", UID, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("source_ae", AE, nullable=False),  # where the study is retrieved from (C-GET)
    Column("requester_ae", AE, nullable=False, server_default=""),
    # SCHEDULED -> IN PROGRESS (retrieving, analysing) -> COMPLETED | CANCELED (with the reason)
    Column("state", String(16), nullable=False),
    Column("priority", String(8), nullable=False, server_default="MEDIUM"),
    Column("outputs", Json, nullable=False),  # [[SOP class, SOP instance, series]] once completed
    Column("detail", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid"),
)

# -- the radiologist in the loop (verdicts, final reports) ---------------------------------------------------------

ai_findings = Table(
    "ai_findings",
    metadata,
    # Every finding the gateway reported, as written into its SR: what a verdict is tied to.
    Column("tracking_uid", UID, primary_key=True),  # the finding's Tracking UID in the SR
    Column("sr_uid", UID, nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("mode", String(16), nullable=False),  # the pipeline's rollout mode: silent | assist | triage
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("accession_number", String(64), nullable=False, server_default=""),  # links the final report
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("model_hash", String(64), nullable=False, server_default=""),
    Column("algorithm_version", String(32), nullable=False, server_default=""),
    Column("finding_code", String(64), nullable=False),  # code value, scheme and meaning of the finding type
    Column("finding_scheme", String(16), nullable=False),
    Column("finding_meaning", String(128), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("image_uid", UID, nullable=False, server_default=""),  # the source image the finding is on
    Column("box", Json),  # [x0, y0, x1, y1] in that image's pixels; null: the whole image
    Column("stat", Boolean, nullable=False, server_default="0"),
    # [{"name", "value", "unit"}] as the SR states them (long axis, area, volume, mean); null before 0010
    Column("measurements", Json),
    Column("reported_at", Float, nullable=False),
    Column("superseded_by", UID, nullable=False, server_default=""),  # the SR that replaced this finding's
    Column("node", String(64), nullable=False),
    Index(None, "sr_uid"),
    Index(None, "study_uid"),
    Index(None, "accession_number"),
    Index(None, "model_name", "model_version"),
)

verdicts = Table(
    "verdicts",
    metadata,
    # A radiologist's verdict on one AI finding (or a finding the AI missed). One current verdict per finding;
    # an amendment keeps the verdict it replaces (current = false, amended_by = the new one's id).
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tracking_uid", UID, nullable=False),  # the AI finding's; a missed finding gets its own
    Column("sr_uid", UID, nullable=False),  # the AI result the verdict is on ("" for a missed finding)
    Column("study_uid", UID, nullable=False),
    Column("kind", String(16), nullable=False),  # accept | reject | modify | missed
    Column("reason", String(64), nullable=False, server_default=""),  # reject: one of the configured reasons
    Column("correction", Json),  # modify / missed: box, image, finding type, long axis
    Column(
        "reviewer", String(128), nullable=False
    ),  # a pseudonymous user id (OIDC subject) or a token's name
    Column("via", String(16), nullable=False),  # http | dicom
    Column("evidence_uid", UID, nullable=False, server_default=""),  # DICOM: the GSPS / SR / KOS that said it
    Column("model_name", String(128), nullable=False, server_default=""),
    Column("model_version", String(32), nullable=False, server_default=""),
    Column("model_hash", String(64), nullable=False, server_default=""),
    Column("at", Float, nullable=False),
    Column("seconds_to_verdict", Float),  # from the result's delivery (or its report when not delivered)
    Column("current", Boolean, nullable=False),
    Column("amended_by", BigInteger().with_variant(Integer(), "sqlite")),
    Column("node", String(64), nullable=False),
    Index(None, "tracking_uid", "current"),
    Index(None, "study_uid"),
    Index(None, "model_name", "model_version", "at"),
)

result_views = Table(
    "result_views",
    metadata,
    # A radiologist opened a study's AI findings (the "viewed before sign-off" of an AI-assisted report).
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", UID, nullable=False),
    Column("viewer", String(128), nullable=False),  # pseudonymous user id or token name
    Column("at", Float, nullable=False),
    Index(None, "study_uid", "at"),
)

final_reports = Table(
    "final_reports",
    metadata,
    # Signed reports from the RIS (HL7 ORU^R01); a corrected report is a new row, the comparison moves to it.
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("accession_number", String(64), nullable=False),
    Column(
        "study_uid", UID, nullable=False, server_default=""
    ),  # "" until a study with the accession is known
    Column("status", String(1), nullable=False),  # OBR-25: F final, C corrected, P preliminary ...
    Column("signed_at", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("control_id", String(64), nullable=False, server_default=""),
    Column("text", Text, nullable=False),  # clinical text: the QA evidence; never logged
    Column("ai_delivered_before", Boolean, nullable=False, server_default="0"),
    Column("ai_viewed_before", Boolean, nullable=False, server_default="0"),
    Column(
        "ai_assisted", Boolean, nullable=False, server_default="0"
    ),  # delivered and viewed before sign-off
    Column("node", String(64), nullable=False),
    Index(None, "accession_number"),
    Index(None, "study_uid"),
)

report_comparisons = Table(
    "report_comparisons",
    metadata,
    # Per final report, pipeline and finding type: what the AI said against what the report says.
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("report_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("accession_number", String(64), nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("calling_ae", AE, nullable=False, server_default=""),
    Column("finding_type", String(64), nullable=False),  # the terminology key ("hemorrhage")
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("ai_positive", Boolean, nullable=False),
    Column("max_confidence", Float),
    Column("report_label", String(16), nullable=False),  # positive | negative | uncertain
    Column("outcome", String(16), nullable=False),  # concordant | ai_only | report_only | uncertain
    Column("evidence", Text, nullable=False, server_default=""),  # the deciding sentence of the report
    Column("current", Boolean, nullable=False),  # false once a corrected report replaced it
    Column("qa_state", String(16), nullable=False),  # none | open | assigned | closed
    Column("assigned_to", String(128), nullable=False, server_default=""),
    Column("qa_note", String(256), nullable=False, server_default=""),
    Column("at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Index(None, "study_uid"),
    Index(None, "qa_state", "at"),
    Index(None, "model_name", "model_version"),
)

drift_alarms = Table(
    "drift_alarms",
    metadata,
    # A drift alarm of a model version at a site: the acceptance CUSUM fired (at the n-th verdict) or the score
    # distribution moved from its baseline (PSI; once per model version and site). Written once: the unique key
    # makes "one webhook per alarm" hold across restarts and nodes.
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("site", AE, nullable=False),  # the sending PACS's calling AE title
    Column("kind", String(16), nullable=False),  # acceptance | scores
    Column("at_count", Integer, nullable=False),  # verdicts (acceptance) or 0 (scores)
    Column("value", Float, nullable=False),  # the acceptance rate of the window, or the PSI
    Column("at", Float, nullable=False),
    Column("notified", Boolean, nullable=False, server_default="0"),
    Index(None, "model_name", "model_version", "site", "kind", "at_count", unique=True),
)

pipeline_changes = Table(
    "pipeline_changes",
    metadata,
    # Every change of a pipeline's model, rollout mode, thresholds or pilot, with what it was before: seen by a
    # gateway at start-up (the settings file is where sites change them) and kept for governance.
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("pipeline", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("node", String(64), nullable=False),
    Column("source", Text, nullable=False, server_default=""),  # the settings file that said it
    Column("before", Json),  # null: a new pipeline
    Column("after", Json),  # null: a pipeline removed
    Index(None, "pipeline", "at"),
)
