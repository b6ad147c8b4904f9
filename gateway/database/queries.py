"""The questions people ask the system of record, answered as typed rows: the studies (by state, priority,
sending PACS, time, how long they waited), and one study's whole timeline. Read-only; any thread."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.exc import OperationalError

from gateway.core.errors import DatabaseError
from gateway.database import schema as t

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class StudyFilter:
    study_uid: str | None = None
    state: str | None = None
    priority: str | None = None
    pacs: str | None = None  # the sending PACS's calling AE title
    since: float | None = None  # first instance received at or after (Unix seconds)
    until: float | None = None
    waited_more_than_s: float | None = None  # from complete until analysis started (or now, still waiting)
    limit: int = 100


@dataclass(frozen=True, kw_only=True)
class StudyRow:
    study_uid: str
    state: str
    priority: str
    stat: bool
    calling_ae: str
    instances: int
    series: int
    findings: int
    first_received_at: float
    state_since: float
    node: str
    detail: str
    wait_s: float | None  # complete -> analysis started; None: never queued

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TimelineStep:
    at: float
    stage: str  # a study state, or an audit event (series_analysed, results_delivered, ...)
    node: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class StudyTimeline:
    study: StudyRow
    steps: list[TimelineStep] = field(default_factory=list)
    analyses: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


TIMELINE_EVENTS = (  # audit events shown in a study's timeline next to its state changes
    "series_analysed",
    "series_failed",
    "series_skipped",
    "results_delivered",
    "delivery_dead_letter",
    "stat_notification_sent",
    "stat_notification_failed",
    "fhir_delivered",
    "fhir_failed",
    "hl7_delivered",
    "hl7_failed",
    "ups_completed",
    "ups_failed",
    "critical_result_notified",
    "critical_result_failed",
    "critical_result_acknowledged",
    "critical_result_unanswered",
)


def _waits() -> Any:
    tr = t.study_transitions
    return (
        select(
            tr.c.study_uid.label("study_uid"),
            func.max(case((tr.c.state == "complete", tr.c.at))).label("complete_at"),
            func.max(case((tr.c.state == "analysing", tr.c.at))).label("analysing_at"),
        )
        .group_by(tr.c.study_uid)
        .subquery()
    )


def answered(query: Callable[P, R]) -> Callable[P, R]:
    """A database that cannot be reached is a ``DatabaseError`` with the reason (callers need no SQLAlchemy)."""

    @functools.wraps(query)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return query(*args, **kwargs)
        except OperationalError as exc:
            reason = str(exc.orig if exc.orig is not None else exc).splitlines()[0][:200]
            raise DatabaseError(f"the system of record cannot be read now: {reason}") from None

    return run


@answered
def was_complete(engine: Engine, study_uid: str) -> bool:
    """Whether the study was declared complete before (it is being re-opened by later instances)."""
    with engine.connect() as connection:
        row = connection.execute(
            select(t.study_transitions.c.id)
            .where(t.study_transitions.c.study_uid == study_uid, t.study_transitions.c.state == "complete")
            .limit(1)
        ).first()
    return row is not None


@answered
def list_studies(engine: Engine, where: StudyFilter, *, now: float | None = None) -> list[StudyRow]:
    """Studies matching ``where``, STAT first, then the newest."""
    now = time.time() if now is None else now
    s, w = t.studies, _waits()
    wait = case(
        (w.c.complete_at.is_(None), None),
        (
            and_(w.c.analysing_at.is_not(None), w.c.analysing_at >= w.c.complete_at),
            w.c.analysing_at - w.c.complete_at,
        ),
        (s.c.state.in_(("complete", "queued")), now - w.c.complete_at),
        else_=None,
    ).label("wait_s")
    query = select(s, wait).select_from(s.outerjoin(w, w.c.study_uid == s.c.study_uid))
    conditions = []
    if where.study_uid:
        conditions.append(s.c.study_uid == where.study_uid)
    if where.state:
        conditions.append(s.c.state == where.state)
    if where.priority:
        conditions.append(s.c.priority == where.priority.upper())
    if where.pacs:
        conditions.append(s.c.calling_ae == where.pacs)
    if where.since is not None:
        conditions.append(s.c.first_received_at >= where.since)
    if where.until is not None:
        conditions.append(s.c.first_received_at < where.until)
    if where.waited_more_than_s is not None:
        conditions.append(wait > where.waited_more_than_s)
    if conditions:
        query = query.where(and_(*conditions))
    query = query.order_by(s.c.stat.desc(), s.c.first_received_at.desc()).limit(where.limit)
    with engine.connect() as connection:
        return [_study(row._mapping) for row in connection.execute(query)]


def _study(row: Any) -> StudyRow:
    return StudyRow(
        study_uid=row["study_uid"],
        state=row["state"],
        priority=row["priority"],
        stat=bool(row["stat"]),
        calling_ae=row["calling_ae"],
        instances=row["instances"],
        series=row["series"],
        findings=row["findings"],
        first_received_at=row["first_received_at"],
        state_since=row["state_since"],
        node=row["node"],
        detail=row["detail"],
        wait_s=None if row["wait_s"] is None else round(float(row["wait_s"]), 3),
    )


@answered
def pipelines_of(engine: Engine, study_uids: Sequence[str]) -> dict[str, list[str]]:
    """The pipelines that analysed (or failed on) each of ``study_uids``, by name."""
    if not study_uids:
        return {}
    sa = t.series_analyses
    query = select(sa.c.study_uid, sa.c.pipeline).where(sa.c.study_uid.in_(list(study_uids))).distinct()
    found: dict[str, list[str]] = {}
    with engine.connect() as connection:
        for study_uid, pipeline in connection.execute(query):
            found.setdefault(study_uid, []).append(pipeline)
    return {uid: sorted(names) for uid, names in found.items()}


@answered
def study_timeline(engine: Engine, study_uid: str) -> StudyTimeline | None:
    """Everything recorded about one study, in time order; None when the study is not known."""
    rows = list_studies(engine, StudyFilter(study_uid=study_uid, limit=1))
    if not rows:
        return None
    with engine.connect() as c:
        steps = [
            TimelineStep(at=r.at, stage=r.state, node=r.node, detail=r.detail)
            for r in c.execute(
                select(t.study_transitions).where(t.study_transitions.c.study_uid == study_uid)
            )
        ]
        for r in c.execute(
            select(t.audit_events).where(
                t.audit_events.c.study_uid == study_uid, t.audit_events.c.event.in_(TIMELINE_EVENTS)
            )
        ):
            steps.append(TimelineStep(at=r.at, stage=r.event, node=r.node, detail=_event_detail(r.fields)))
        steps.sort(key=lambda step: step.at)

        def table(tab: Any, order: Any) -> list[dict[str, Any]]:
            query = select(tab).where(tab.c.study_uid == study_uid).order_by(order)
            return [dict(r._mapping) for r in c.execute(query)]

        return StudyTimeline(
            study=rows[0],
            steps=steps,
            analyses=table(t.series_analyses, t.series_analyses.c.at),
            jobs=table(t.jobs, t.jobs.c.enqueued_at),
            deliveries=table(t.deliveries, t.deliveries.c.created_at),
            notifications=table(t.notifications, t.notifications.c.at),
        )


def _event_detail(fields: dict[str, Any]) -> str:
    parts = []
    for key in ("pipeline", "destination", "findings", "stat", "reason", "message"):
        if key in fields and fields[key] not in ("", None, [], False):
            parts.append(f"{key}={fields[key]}")
    return " ".join(parts)[:300]


def prune(engine: Engine, *, spool_purged: list[str], audit_before: float | None) -> dict[str, int]:
    """Retention in the system of record: the instance index of studies whose images were purged, and audit
    events older than ``audit_before``. A study's row and timeline stay (the record outlives the images)."""
    removed: dict[str, int] = {}
    with engine.begin() as connection:
        if spool_purged:
            result = connection.execute(t.instances.delete().where(t.instances.c.study_uid.in_(spool_purged)))
            removed["instance rows"] = result.rowcount
        if audit_before is not None:
            result = connection.execute(t.audit_events.delete().where(t.audit_events.c.at < audit_before))
            removed["audit rows"] = result.rowcount
    return {kind: count for kind, count in removed.items() if count}


@answered
def instance_path(engine: Engine, study_uid: str, sop_instance_uid: str) -> str | None:
    """Where the spool keeps one instance of a study (None: unknown, or purged)."""
    with engine.connect() as connection:
        found = connection.execute(
            select(t.instances.c.path).where(
                t.instances.c.study_uid == study_uid, t.instances.c.sop_instance_uid == sop_instance_uid
            )
        ).scalar()
        return str(found) if found else None
