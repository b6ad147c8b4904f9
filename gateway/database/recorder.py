"""The system of record's writer: what the flow reports (instances stored, studies routed, jobs started, every
audit event) is queued by the caller's thread and written by one writer thread, every queued write of a moment
in one transaction - so neither a C-STORE acknowledgement nor the event loop ever waits for the database.

The spool stays the source of truth: when the database cannot be written (PostgreSQL restarting, a locked
file), the writes wait in memory, in order, and are retried with backoff; the gateway keeps acknowledging and
analysing. ``/health`` shows the backlog and the last error.

Study states follow ``states.ALLOWED``; each move is a ``study_transitions`` row. Audit events also move them:
``study_done`` -> results stored (or failed when every routed series failed), the last ``results_delivered`` ->
delivered, a ``delivery_dead_letter`` -> failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.core.domain import InstanceRecord
from gateway.core.retry import Backoff
from gateway.database import schema as t
from gateway.database.states import StudyState, allowed

logger = logging.getLogger(__name__)

Write = Callable[[Connection], None]
# Instances are grouped (one multi-row insert per run of them); an Event is set once what precedes it is committed.
Item = Write | InstanceRecord | threading.Event
MAX_BACKLOG = 1_000_000
RETRY = Backoff(0.5, 10.0)


@dataclass(frozen=True, kw_only=True)
class QueuedJob:
    """A series queued for analysis, as the jobs table records it."""

    job_id: str
    study_uid: str
    series_uid: str
    pipeline: str
    priority: str
    calling_ae: str
    cost: int
    deadline_s: float


@dataclass(frozen=True, kw_only=True)
class RoutedStudy:
    study_uid: str
    calling_ae: str
    priority: str
    instances: int
    series: int
    first_received_at: float
    last_received_at: float


def job_id(study_uid: str, series_uid: str, pipeline: str) -> str:
    return f"{study_uid}/{series_uid}/{pipeline}"


class Recorder:
    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node
        self._pending: list[Item] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.written = 0  # writes committed (for tests and /metrics)
        self.dropped = 0  # writes that failed for a reason other than the database being unreachable

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued (bounded by ``timeout_s`` when the database is down), then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error(
                    "system of record: %d write(s) not written at stop: %s", self.backlog, self.last_error
                )
            self._thread = None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (tests, ``gateway`` commands); False on timeout."""
        done = threading.Event()
        self._put(done)
        return done.wait(timeout_s)

    # -- what the flow reports (any thread; never blocks on the database) -------------------------------------

    def instance_stored(self, record: InstanceRecord) -> None:
        self._put(record)

    def study_routed(self, study: RoutedStudy, jobs: Sequence[QueuedJob], *, skipped: int, at: float) -> None:
        self._put(lambda c: self._routed(c, study, jobs, skipped, at))

    def job_started(self, job: str, study_uid: str, attempts: int, at: float) -> None:
        self._put(lambda c: self._started(c, job, study_uid, attempts, at))

    def audit_event(self, event: Mapping[str, Any]) -> None:
        fields = dict(event)
        self._put(lambda c: self._event(c, fields))

    def _put(self, write: Item) -> None:
        with self._wake:
            if len(self._pending) >= MAX_BACKLOG:
                self._pending.pop(0)
                self.dropped += 1
            self._pending.append(write)
            self._wake.notify()

    # -- the writer thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                self._commit(batch)
                failures = 0
            except (OperationalError, DBAPIError) as exc:
                if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                    self._one_by_one(batch)
                    continue
                with self._wake:  # back in front, in order
                    self._pending[:0] = batch
                if not self.last_error:
                    logger.error(
                        "system of record cannot be written (%s): %d write(s) held, retried",
                        type(exc).__name__,
                        self.backlog,
                    )
                self.last_error = str(exc.orig if exc.orig is not None else exc).splitlines()[0][:300]
                failures += 1
                if self._closing and failures > 3:
                    return
                time.sleep(RETRY.delay(failures))

    def _commit(self, batch: list[Item]) -> None:
        """Every write of the batch in order, in one transaction (runs of instances as one insert each)."""
        committed: list[threading.Event] = []
        with self.engine.begin() as connection:
            run: list[InstanceRecord] = []
            for item in batch:
                if isinstance(item, threading.Event):
                    committed.append(item)
                    continue
                if isinstance(item, InstanceRecord):
                    run.append(item)
                    continue
                if run:
                    self._stored(connection, run)
                    run = []
                item(connection)
            if run:
                self._stored(connection, run)
        self.written += len(batch) - len(committed)
        if self.last_error:
            logger.info("system of record writable again: held writes written")
            self.last_error = ""
        for done in committed:
            done.set()

    def _one_by_one(self, batch: list[Item]) -> None:
        """A batch failed for a reason other than the database being unreachable: keep every write that works."""
        for item in batch:
            try:
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                with self.engine.begin() as connection:
                    if isinstance(item, InstanceRecord):
                        self._stored(connection, [item])
                    else:
                        item(connection)
                self.written += 1
            except Exception as exc:
                self.dropped += 1
                logger.error("system of record: a write was refused and dropped: %s", type(exc).__name__)
                logger.debug("refused write", exc_info=True)

    # -- writes (on the writer thread, inside its transaction) -----------------------------------------------

    def _insert(self, connection: Connection, table: Any) -> Any:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def _stored(self, connection: Connection, stored: list[InstanceRecord]) -> None:
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
        insert = self._insert(connection, t.instances)
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
            self._ensure_study(connection, study_uid, records[0].calling_ae, first, last)
            greatest = func.max if connection.dialect.name == "sqlite" else func.greatest  # of two values
            connection.execute(
                update(t.studies)
                .where(t.studies.c.study_uid == study_uid)
                .values(last_received_at=greatest(t.studies.c.last_received_at, last))
            )
            self._move(connection, study_uid, StudyState.RECEIVING, first, "")

    def _ensure_study(
        self, connection: Connection, study_uid: str, calling_ae: str, first: float, last: float
    ) -> None:
        insert = self._insert(connection, t.studies)
        connection.execute(
            insert.values(
                study_uid=study_uid,
                state=StudyState.RECEIVING.value,
                calling_ae=calling_ae,
                first_received_at=first,
                last_received_at=last,
                state_since=first,
                node=self.node,
            ).on_conflict_do_nothing(index_elements=["study_uid"])
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

    def _state(self, connection: Connection, study_uid: str) -> StudyState | None:
        query = select(t.studies.c.state).where(t.studies.c.study_uid == study_uid)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        value = connection.execute(query).scalar_one_or_none()
        return StudyState(value) if value is not None else None

    def _move(self, connection: Connection, study_uid: str, new: StudyState, at: float, detail: str) -> bool:
        """Move the study to ``new`` when the state machine allows it; record the transition."""
        current = self._state(connection, study_uid)
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

    def _routed(
        self, connection: Connection, study: RoutedStudy, jobs: Sequence[QueuedJob], skipped: int, at: float
    ) -> None:
        self._ensure_study(
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
            )
        )
        if self._state(connection, study.study_uid) is not StudyState.RECEIVING:
            self._move(connection, study.study_uid, StudyState.RECEIVING, at, "analysed again")
        self._move(connection, study.study_uid, StudyState.COMPLETE, at, "")
        if jobs:
            self._move(connection, study.study_uid, StudyState.QUEUED, at, f"{len(jobs)} series")
        elif skipped:
            self._move(connection, study.study_uid, StudyState.SKIPPED, at, "no pipeline applies")
        if not jobs:
            return
        insert = self._insert(connection, t.jobs)
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

    def _started(self, connection: Connection, job: str, study_uid: str, attempts: int, at: float) -> None:
        connection.execute(
            update(t.jobs)
            .where(t.jobs.c.job_id == job)
            .values(state="running", started_at=at, attempts=attempts, lease_owner=self.node)
        )
        self._move(connection, study_uid, StudyState.ANALYSING, at, "")

    def _event(self, connection: Connection, fields: dict[str, Any]) -> None:
        event = str(fields.get("event", ""))
        at = float(fields.get("time", time.time()))
        study = fields.get("study")
        study_uid = str(study) if isinstance(study, str) else None
        connection.execute(
            t.audit_events.insert().values(
                at=at,
                event=event,
                study_uid=study_uid,
                node=str(fields.get("node") or self.node),
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
                node=self.node,
            )
        )
        self._job_finished(
            connection, job_id(study_uid, series, pipeline), "done" if analysed else "failed", at
        )

    def _job_finished(self, connection: Connection, job: str, state: str, at: float) -> None:
        connection.execute(
            update(t.jobs).where(t.jobs.c.job_id == job).values(state=state, finished_at=at, lease_owner=None)
        )

    def _skipped_series(
        self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float
    ) -> None:
        pipeline = fields.get("pipeline")
        if pipeline:  # an anatomy check that found no such anatomy: the job is done, nothing to analyse
            self._job_finished(
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
            self._move(connection, study_uid, StudyState.FAILED, at, "every routed series failed")
            return
        if routed <= 0 and self._state(connection, study_uid) is StudyState.SKIPPED:
            return
        self._move(connection, study_uid, StudyState.RESULTS_STORED, at, "")
        self._delivered_when_all(connection, study_uid, at)

    def _delivery(self, connection: Connection, study_uid: str, fields: dict[str, Any], at: float) -> None:
        event = fields["event"]
        job = str(fields.get("job", ""))
        state = {"delivery_queued": "pending", "results_delivered": "delivered"}.get(event, "dead_letter")
        insert = self._insert(connection, t.deliveries)
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
            self._move(
                connection,
                study_uid,
                StudyState.FAILED,
                at,
                f"delivery to {values['destination']} dead-lettered",
            )
        elif state == "delivered":
            self._delivered_when_all(connection, study_uid, at)

    def _delivered_when_all(self, connection: Connection, study_uid: str, at: float) -> None:
        states = (
            connection.execute(select(t.deliveries.c.state).where(t.deliveries.c.study_uid == study_uid))
            .scalars()
            .all()
        )
        if states and all(s == "delivered" for s in states):
            self._move(connection, study_uid, StudyState.DELIVERED, at, f"{len(states)} delivery job(s)")

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
                node=self.node,
                detail=str(fields.get("reason", ""))[:1000],
            )
        )


_DERIVED: dict[str, Callable[[Recorder, Connection, str, dict[str, Any], float], None]] = {
    "series_analysed": Recorder._series,
    "series_failed": Recorder._series,
    "series_skipped": Recorder._skipped_series,
    "study_done": Recorder._study_done,
    "delivery_queued": Recorder._delivery,
    "results_delivered": Recorder._delivery,
    "delivery_dead_letter": Recorder._delivery,
    "stat_notification_sent": Recorder._notification,
    "stat_notification_failed": Recorder._notification,
    "failure_alert_sent": Recorder._notification,
    "failure_alert_failed": Recorder._notification,
}
