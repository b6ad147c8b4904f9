"""What the system of record's writer does inside its transactions: the study state machine applied to what the
flow reports (instances stored, studies routed, jobs started) and to the audit events that move a study on
(series analysed or failed, study done, deliveries, notifications). Only ``Recorder``'s writer thread calls it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, func, select, update

from gateway.core.domain import InstanceRecord
from gateway.database import schema as t
from gateway.database.connect import greatest, upsert
from gateway.database.jobs import QueuedJob, RoutedStudy, job_id
from gateway.database.states import StudyState, allowed

logger = logging.getLogger(__name__)


class StudyWrites:
    """Studies, their transitions, instances and jobs."""

    def __init__(self, node: str, *, claims_jobs: bool = False) -> None:
        self.claims_jobs = claims_jobs
        self.node = node

    def stored(self, connection: Connection, stored: list[InstanceRecord]) -> None:
        rows = {
            r.sop_instance_uid: {
                "sop_instance_uid": r.sop_instance_uid,
                "study_uid": r.study_instance_uid,
                "series_uid": r.series_instance_uid,
                "sop_class_uid": r.sop_class_uid,
                "modality": r.modality[:16],
                "calling_ae": r.calling_ae,
                "path": str(r.path),
                "received_at": r.received_at,
                "node": self.node,
            }
            for r in stored
        }
        insert = upsert(connection, t.instances)
        connection.execute(
            insert.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                set_={"path": insert.excluded.path, "received_at": insert.excluded.received_at},
            ),
            list(rows.values()),
        )
        by_study: dict[str, list[InstanceRecord]] = {}
        for r in stored:
            by_study.setdefault(r.study_instance_uid, []).append(r)
        for study_uid, records in by_study.items():
            first = min(r.received_at for r in records)
            last = max(r.received_at for r in records)
            self.ensure_study(connection, study_uid, records[0].calling_ae, first, last)
            connection.execute(
                update(t.studies)
                .where(t.studies.c.study_uid == study_uid)
                .values(last_received_at=greatest(connection)(t.studies.c.last_received_at, last))
            )
            self.move(connection, study_uid, StudyState.RECEIVING, first, "")

    def ensure_study(
        self, connection: Connection, study_uid: str, calling_ae: str, first: float, last: float
    ) -> None:
        connection.execute(
            upsert(connection, t.studies)
            .values(
                study_uid=study_uid,
                state=StudyState.RECEIVING.value,
                calling_ae=calling_ae,
                first_received_at=first,
                last_received_at=last,
                state_since=first,
                node=self.node,
            )
            .on_conflict_do_nothing(index_elements=["study_uid"])
        )
        # A study created here starts with its "receiving" transition.
        if (
            connection.execute(
                select(func.count())
                .select_from(t.study_transitions)
                .where(t.study_transitions.c.study_uid == study_uid)
            ).scalar_one()
            == 0
        ):
            connection.execute(
                t.study_transitions.insert().values(
                    study_uid=study_uid, state=StudyState.RECEIVING.value, at=first, node=self.node, detail=""
                )
            )

    def state(self, connection: Connection, study_uid: str) -> StudyState | None:
        query = select(t.studies.c.state).where(t.studies.c.study_uid == study_uid)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        value = connection.execute(query).scalar_one_or_none()
        return StudyState(value) if value is not None else None

    def move(self, connection: Connection, study_uid: str, new: StudyState, at: float, detail: str) -> bool:
        """Move the study to ``new`` when the state machine allows it; record the transition."""
        current = self.state(connection, study_uid)
        if current is new or not allowed(current, new):
            if current is not new:
                logger.debug("study %s: %s -> %s not allowed, kept", study_uid, current, new)
            return False
        connection.execute(
            update(t.studies)
            .where(t.studies.c.study_uid == study_uid)
            .values(state=new.value, state_since=at, node=self.node, detail=detail)
        )
        connection.execute(
            t.study_transitions.insert().values(
                study_uid=study_uid, state=new.value, at=at, node=self.node, detail=detail
            )
        )
        return True

    def routed(
        self, connection: Connection, study: RoutedStudy, jobs: Sequence[QueuedJob], skipped: int, at: float
    ) -> None:
        self.ensure_study(
            connection, study.study_uid, study.calling_ae, study.first_received_at, study.last_received_at
        )
        connection.execute(
            update(t.studies)
            .where(t.studies.c.study_uid == study.study_uid)
            .values(
                calling_ae=study.calling_ae,
                priority=study.priority,
                instances=study.instances,
                series=study.series,
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
                accession_number=study.accession_number[:64],
            )
        )
        if self.state(connection, study.study_uid) is not StudyState.RECEIVING:
            self.move(connection, study.study_uid, StudyState.RECEIVING, at, "analysed again")
        self.move(connection, study.study_uid, StudyState.COMPLETE, at, "")
        if jobs:
            self.move(connection, study.study_uid, StudyState.QUEUED, at, f"{len(jobs)} series")
        elif skipped:
            self.move(connection, study.study_uid, StudyState.SKIPPED, at, "no pipeline applies")
        if not jobs:
            return
        insert = upsert(connection, t.jobs)
        rows = [
            {
                "job_id": job.job_id,
                "study_uid": job.study_uid,
                "series_uid": job.series_uid,
                "pipeline": job.pipeline,
                "priority": job.priority,
                "calling_ae": job.calling_ae,
                "cost": job.cost,
                "state": "queued",
                "attempts": 0,
                "enqueued_at": at,
                "deadline_at": at + job.deadline_s,
                "started_at": None,
                "finished_at": None,
            }
            for job in jobs
        ]
        connection.execute(
            insert.on_conflict_do_update(
                index_elements=["job_id"],
                set_={
                    "state": "queued",
                    "priority": insert.excluded.priority,
                    "cost": insert.excluded.cost,
                    "enqueued_at": insert.excluded.enqueued_at,
                    "deadline_at": insert.excluded.deadline_at,
                    "attempts": 0,
                    "started_at": None,
                    "finished_at": None,
                },
            ),
            rows,
        )

    def started(self, connection: Connection, job: str, study_uid: str, attempts: int, at: float) -> None:
        if self.claims_jobs:  # the cluster's claim wrote the job's state, lease and attempt itself
            self.move(connection, study_uid, StudyState.ANALYSING, at, "")
            return
        connection.execute(
            update(t.jobs)
            .where(t.jobs.c.job_id == job)
            .values(state="running", started_at=at, attempts=attempts, lease_owner=self.node)
        )
        self.move(connection, study_uid, StudyState.ANALYSING, at, "")

    def job_finished(self, connection: Connection, job: str, state: str, at: float) -> None:
        connection.execute(
            update(t.jobs).where(t.jobs.c.job_id == job).values(state=state, finished_at=at, lease_owner=None)
        )

    def delivered_when_all(self, connection: Connection, study_uid: str, at: float) -> None:
        states = (
            connection.execute(select(t.deliveries.c.state).where(t.deliveries.c.study_uid == study_uid))
            .scalars()
            .all()
        )
        if states and all(s == "delivered" for s in states):
            self.move(connection, study_uid, StudyState.DELIVERED, at, f"{len(states)} delivery job(s)")


class EventWrites:
    """Every audit event into the append-only table, and what it means for the study, its jobs, deliveries and
    notifications."""

    def __init__(self, studies: StudyWrites) -> None:
        self.studies = studies

    def event(self, connection: Connection, fields: dict[str, Any]) -> None:
        event = str(fields.get("event", ""))
        at = float(fields.get("time", time.time()))
        study = fields.get("study")
        study_uid = str(study) if isinstance(study, str) else None
        connection.execute(
            t.audit_events.insert().values(
                at=at,
                event=event,
                study_uid=study_uid,
                node=str(fields.get("node") or self.studies.node),
                fields={k: v for k, v in fields.items() if k not in ("time", "event")},
            )
        )
        derived = _DERIVED.get(event)
        if derived is not None and study_uid is not None:
            derived(self, connection, study_uid, fields, at)

    def _series(self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float) -> None:
        analysed = fields["event"] == "series_analysed"
        pipeline = str(fields.get("pipeline", ""))
        series = str(fields.get("series", ""))
        timings = {k: v for k, v in fields.items() if k.endswith("_ms") and isinstance(v, int | float)}
        connection.execute(
            t.series_analyses.insert().values(
                study_uid=study_uid,
                series_uid=series,
                pipeline=pipeline,
                outcome="analysed" if analysed else "failed",
                model_name=str(fields.get("model", "")),
                model_version=str(fields.get("model_version", "")),
                model_hash=str(fields.get("model_sha256", "") or ""),
                algorithm_version=str(fields.get("algorithm_version", "")),
                findings=int(fields.get("findings", 0) or 0),
                stat=bool(fields.get("stat", False)),
                result_uids=list(fields.get("results", []) or []),
                timings=timings,
                reason=str(fields.get("reason", "")),
                at=at,
                node=self.studies.node,
            )
        )
        self.studies.job_finished(
            connection, job_id(study_uid, series, pipeline), "done" if analysed else "failed", at
        )

    def _skipped_series(
        self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float
    ) -> None:
        pipeline = fields.get("pipeline")
        if pipeline:  # an anatomy check that found no such anatomy: the job is done, nothing to analyse
            self.studies.job_finished(
                connection, job_id(study_uid, str(fields.get("series", "")), str(pipeline)), "skipped", at
            )

    def _study_done(self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float) -> None:
        connection.execute(
            update(t.studies)
            .where(t.studies.c.study_uid == study_uid)
            .values(findings=int(fields.get("findings", 0) or 0), stat=bool(fields.get("stat", False)))
        )
        routed = int(fields.get("series", 0) or 0) - int(fields.get("skipped", 0) or 0)
        failed = int(fields.get("failed", 0) or 0)
        if routed > 0 and failed >= routed:
            self.studies.move(connection, study_uid, StudyState.FAILED, at, "every routed series failed")
            return
        if routed <= 0 and self.studies.state(connection, study_uid) is StudyState.SKIPPED:
            return
        self.studies.move(connection, study_uid, StudyState.RESULTS_STORED, at, "")
        self.studies.delivered_when_all(connection, study_uid, at)

    def _delivery(self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float) -> None:
        event = fields["event"]
        job = str(fields.get("job", ""))
        state = {"delivery_queued": "pending", "results_delivered": "delivered"}.get(event, "dead_letter")
        insert = upsert(connection, t.deliveries)
        values = {
            "job_id": job,
            "study_uid": study_uid,
            "destination": str(fields.get("destination", ""))[:64],
            "state": state,
            "objects": int(fields.get("objects", 0) or 0),
            "attempts": int(fields.get("attempts", 0) or 0),
            "last_error": str(fields.get("reason", ""))[:1000],
            "created_at": at,
            "updated_at": at,
        }
        update_set = {k: insert.excluded[k] for k in ("state", "attempts", "last_error", "updated_at")}
        if state == "pending":  # a late "queued" never undoes a delivery recorded before it
            update_set = {"updated_at": insert.excluded.updated_at}
        connection.execute(
            insert.values(**values).on_conflict_do_update(index_elements=["job_id"], set_=update_set)
        )
        if state == "dead_letter":
            self.studies.move(
                connection,
                study_uid,
                StudyState.FAILED,
                at,
                f"delivery to {values['destination']} dead-lettered",
            )
        elif state == "delivered":
            self.studies.delivered_when_all(connection, study_uid, at)

    def _notification(
        self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float
    ) -> None:
        event = str(fields["event"])
        kind = "stat" if event.startswith("stat_") else "analysis_failure"
        connection.execute(
            t.notifications.insert().values(
                study_uid=study_uid,
                kind=kind,
                state="sent" if event.endswith("_sent") else "failed",
                at=at,
                node=self.studies.node,
                detail=str(fields.get("reason", ""))[:1000],
            )
        )

    def _findings(self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float) -> None:
        """The findings of one SR (what verdicts are tied to); the SRs it replaces mark theirs superseded."""
        sr = str(fields.get("sr", ""))
        rows = []
        for item in fields.get("reported", []) or []:
            code = list(item.get("code") or ["", "", ""])
            rows.append(
                {
                    "tracking_uid": str(item["tracking_uid"]),
                    "sr_uid": sr,
                    "study_uid": study_uid,
                    "series_uid": str(fields.get("series", "")),
                    "pipeline": str(fields.get("pipeline", "")),
                    "mode": str(fields.get("mode", "")),
                    "calling_ae": str(fields.get("calling_ae", ""))[:16],
                    "accession_number": str(fields.get("accession_number", ""))[:64],
                    "model_name": str(fields.get("model", "")),
                    "model_version": str(fields.get("model_version", "")),
                    "model_hash": str(fields.get("model_sha256", "") or ""),
                    "algorithm_version": str(fields.get("algorithm_version", "")),
                    "finding_code": str(code[0]),
                    "finding_scheme": str(code[1]),
                    "finding_meaning": str(code[2])[:128],
                    "confidence": float(item.get("confidence", 0.0)),
                    "image_uid": str(item.get("image", "")),
                    "box": item.get("box"),
                    "stat": bool(item.get("stat", False)),
                    "measurements": item.get("measurements"),
                    "reported_at": at,
                    "node": self.studies.node,
                }
            )
        if rows:
            insert = upsert(connection, t.ai_findings)
            connection.execute(insert.values(rows).on_conflict_do_nothing(index_elements=["tracking_uid"]))
        replaced = [str(uid) for uid in fields.get("supersedes", []) or [] if str(uid) != sr]
        if replaced:
            connection.execute(
                update(t.ai_findings)
                .where(t.ai_findings.c.sr_uid.in_(replaced), t.ai_findings.c.superseded_by == "")
                .values(superseded_by=sr)
            )


_DERIVED: dict[str, Callable[[EventWrites, Connection, str, dict[str, Any], float], None]] = {
    "series_analysed": EventWrites._series,
    "series_failed": EventWrites._series,
    "series_skipped": EventWrites._skipped_series,
    "findings_reported": EventWrites._findings,
    "study_done": EventWrites._study_done,
    "delivery_queued": EventWrites._delivery,
    "results_delivered": EventWrites._delivery,
    "delivery_dead_letter": EventWrites._delivery,
    "stat_notification_sent": EventWrites._notification,
    "stat_notification_failed": EventWrites._notification,
    "failure_alert_sent": EventWrites._notification,
    "failure_alert_failed": EventWrites._notification,
}
