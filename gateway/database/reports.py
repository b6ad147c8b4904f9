"""Final reports, their comparisons with the AI (the QA items), and views of AI results, in the system of record.
Blocking: call from an executor or a worker thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from gateway.database import schema as t
from gateway.database.queries import answered


@dataclass(frozen=True, kw_only=True)
class AnalysedPipeline:
    """A pipeline that analysed the study (with or without findings), and what it found, by finding code."""

    pipeline: str
    model_name: str
    model_version: str
    calling_ae: str
    max_confidence_by_code: dict[
        str, float
    ]  # finding code value -> highest confidence (current results only)


@dataclass(frozen=True, kw_only=True)
class ComparisonRow:
    id: int
    report_id: int
    study_uid: str
    accession_number: str
    pipeline: str
    mode: str
    calling_ae: str
    finding_type: str
    model_name: str
    model_version: str
    ai_positive: bool
    max_confidence: float | None
    report_label: str
    outcome: str
    evidence: str
    current: bool
    qa_state: str
    assigned_to: str
    qa_note: str
    at: float
    updated_at: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _comparison(row: Any) -> ComparisonRow:
    return ComparisonRow(**{c: row._mapping[c] for c in ComparisonRow.__dataclass_fields__})


@answered
def study_for_accession(engine: Engine, accession: str) -> str:
    """The study an accession number belongs to (the latest received), else its order's ("" if unknown)."""
    with engine.connect() as connection:
        found = connection.execute(
            select(t.studies.c.study_uid)
            .where(t.studies.c.accession_number == accession)
            .order_by(t.studies.c.first_received_at.desc())
            .limit(1)
        ).scalar()
        if not found:
            found = connection.execute(
                select(t.orders.c.study_uid).where(t.orders.c.accession_number == accession)
            ).scalar()
        return str(found or "")


@answered
def analysed_pipelines(engine: Engine, study_uid: str) -> list[AnalysedPipeline]:
    a, f = t.series_analyses, t.ai_findings
    with engine.connect() as connection:
        calling_ae = connection.execute(
            select(t.studies.c.calling_ae).where(t.studies.c.study_uid == study_uid)
        ).scalar()
        analyses = connection.execute(
            select(a.c.pipeline, a.c.model_name, a.c.model_version)
            .where(a.c.study_uid == study_uid, a.c.outcome == "analysed")
            .order_by(a.c.at)
        ).all()
        found = connection.execute(
            select(f.c.pipeline, f.c.finding_code, func.max(f.c.confidence))
            .where(f.c.study_uid == study_uid, f.c.superseded_by == "")
            .group_by(f.c.pipeline, f.c.finding_code)
        ).all()
    latest = {row.pipeline: row for row in analyses}  # the last analysis of each pipeline
    out = []
    for pipeline, row in latest.items():
        out.append(
            AnalysedPipeline(
                pipeline=pipeline,
                model_name=row.model_name,
                model_version=row.model_version,
                calling_ae=str(calling_ae or ""),
                max_confidence_by_code={code: float(c) for p, code, c in found if p == pipeline},
            )
        )
    return out


@answered
def ai_seen_before(engine: Engine, study_uid: str, signed_at: float) -> tuple[bool, bool]:
    """(delivered, viewed) before ``signed_at``: results reached a destination; a radiologist opened the
    findings or recorded a verdict."""
    with engine.connect() as connection:
        delivered = connection.execute(
            select(func.min(t.deliveries.c.updated_at)).where(
                t.deliveries.c.study_uid == study_uid, t.deliveries.c.state == "delivered"
            )
        ).scalar()
        viewed = connection.execute(
            select(func.min(t.result_views.c.at)).where(t.result_views.c.study_uid == study_uid)
        ).scalar()
        verdict = connection.execute(
            select(func.min(t.verdicts.c.at)).where(t.verdicts.c.study_uid == study_uid)
        ).scalar()
    seen = [v for v in (viewed, verdict) if v is not None]
    return (delivered is not None and delivered <= signed_at, bool(seen) and min(seen) <= signed_at)


@answered
def record_view(engine: Engine, study_uid: str, viewer: str, at: float) -> None:
    with engine.begin() as connection:
        connection.execute(insert(t.result_views).values(study_uid=study_uid, viewer=viewer[:128], at=at))


@answered
def store_report(
    engine: Engine, report: dict[str, Any], comparisons: Sequence[dict[str, Any]], node: str
) -> list[ComparisonRow]:
    """The report and its comparisons in one transaction; the study's earlier comparisons stop being current."""
    c = t.report_comparisons
    with engine.begin() as connection:
        report_id = connection.execute(
            insert(t.final_reports).values(**report, node=node).returning(t.final_reports.c.id)
        ).scalar_one()
        if comparisons:
            study_uid = comparisons[0]["study_uid"]
            connection.execute(
                update(c).where(c.c.study_uid == study_uid, c.c.current.is_(True)).values(current=False)
            )
            connection.execute(
                insert(c),
                [{**row, "report_id": report_id, "current": True, "node": node} for row in comparisons],
            )
        rows = connection.execute(select(c).where(c.c.report_id == report_id).order_by(c.c.id))
        return [_comparison(r) for r in rows]


@answered
def comparisons(
    engine: Engine, *, qa_state: str | None = None, study_uid: str | None = None, limit: int = 200
) -> list[ComparisonRow]:
    c = t.report_comparisons
    query = select(c).where(c.c.current.is_(True))
    if qa_state:
        query = query.where(c.c.qa_state == qa_state)
    if study_uid:
        query = query.where(c.c.study_uid == study_uid)
    with engine.connect() as connection:
        return [
            _comparison(r) for r in connection.execute(query.order_by(c.c.at.desc(), c.c.id).limit(limit))
        ]


@answered
def update_qa(
    engine: Engine, item: int, *, state: str, assigned_to: str | None, note: str, at: float
) -> ComparisonRow | None:
    """Move a QA item (open -> assigned -> closed); None when there is no such open item."""
    c = t.report_comparisons
    values: dict[str, Any] = {"qa_state": state, "updated_at": at}
    if assigned_to is not None:
        values["assigned_to"] = assigned_to[:128]
    if note:
        values["qa_note"] = note[:256]
    with engine.begin() as connection:
        done = connection.execute(
            update(c).where(c.c.id == item, c.c.qa_state.in_(("open", "assigned"))).values(**values)
        )
        if done.rowcount == 0:
            return None
        return _comparison(connection.execute(select(c).where(c.c.id == item)).one())


@answered
def pending_reports(engine: Engine, since: float) -> list[dict[str, Any]]:
    """Final / corrected reports received since ``since`` that have no comparison yet and are their accession's
    latest report: those that came before their study (or its analysis) was in the system of record."""
    r, c = t.final_reports, t.report_comparisons
    latest = select(func.max(r.c.id)).group_by(r.c.accession_number).scalar_subquery()
    compared = select(c.c.report_id).distinct().scalar_subquery()
    query = select(r).where(
        r.c.status.in_(("F", "C")), r.c.received_at >= since, r.c.id.in_(latest), r.c.id.not_in(compared)
    )
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query.order_by(r.c.id))]


@answered
def attach_comparisons(
    engine: Engine,
    report_id: int,
    study_uid: str,
    seen: tuple[bool, bool],
    rows: Sequence[dict[str, Any]],
    node: str,
) -> list[ComparisonRow]:
    """Compare a stored report late: its study, its AI-assisted flags and comparisons, in one transaction."""
    c = t.report_comparisons
    delivered, viewed = seen
    with engine.begin() as connection:
        connection.execute(
            update(t.final_reports)
            .where(t.final_reports.c.id == report_id)
            .values(
                study_uid=study_uid,
                ai_delivered_before=delivered,
                ai_viewed_before=viewed,
                ai_assisted=delivered and viewed,
            )
        )
        connection.execute(
            update(c).where(c.c.study_uid == study_uid, c.c.current.is_(True)).values(current=False)
        )
        connection.execute(
            insert(c), [{**row, "report_id": report_id, "current": True, "node": node} for row in rows]
        )
        return [
            _comparison(x)
            for x in connection.execute(select(c).where(c.c.report_id == report_id).order_by(c.c.id))
        ]


@answered
def study_state(engine: Engine, study_uid: str) -> str | None:
    with engine.connect() as connection:
        found = connection.execute(
            select(t.studies.c.state).where(t.studies.c.study_uid == study_uid)
        ).scalar()
        return str(found) if found is not None else None
