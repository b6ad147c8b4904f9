"""The reported AI findings and the radiologists' verdicts on them, in the system of record.

Findings are written by the audit event ``findings_reported`` (``writes.EventWrites``); verdicts here, each in
one transaction that locks its finding's row (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite serialises writers),
so that two verdicts on one finding at the same moment leave exactly one current verdict and the other as its
history. What a verdict may say is decided by the caller's ``check`` inside that transaction
(``gateway.review.verdicts``), so a result superseded meanwhile is refused, not reviewed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from gateway.database import schema as t
from gateway.database.queries import answered


@dataclass(frozen=True, kw_only=True)
class AiFindingRow:
    tracking_uid: str
    sr_uid: str
    study_uid: str
    series_uid: str
    pipeline: str
    mode: str
    calling_ae: str
    accession_number: str
    model_name: str
    model_version: str
    model_hash: str
    algorithm_version: str
    finding_code: str
    finding_scheme: str
    finding_meaning: str
    confidence: float
    image_uid: str
    box: list[float] | None
    stat: bool
    reported_at: float
    superseded_by: str
    measurements: list[dict[str, Any]] | None  # name, value, unit of each (the SR's long axis, area, ...)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class NewVerdict:
    tracking_uid: str
    sr_uid: str
    study_uid: str
    kind: str
    reason: str
    correction: dict[str, Any] | None
    reviewer: str
    via: str
    evidence_uid: str
    at: float


@dataclass(frozen=True, kw_only=True)
class VerdictRow:
    id: int
    tracking_uid: str
    sr_uid: str
    study_uid: str
    kind: str
    reason: str
    correction: dict[str, Any] | None
    reviewer: str
    via: str
    evidence_uid: str
    model_name: str
    model_version: str
    model_hash: str
    at: float
    seconds_to_verdict: float | None
    current: bool
    amended_by: int | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _finding(row: Any) -> AiFindingRow:
    return AiFindingRow(**{c: row._mapping[c] for c in AiFindingRow.__dataclass_fields__})


def _verdict(row: Any) -> VerdictRow:
    return VerdictRow(**{c: row._mapping[c] for c in VerdictRow.__dataclass_fields__})


@answered
def findings_of(engine: Engine, study_uid: str) -> list[AiFindingRow]:
    f = t.ai_findings
    with engine.connect() as connection:
        rows = connection.execute(
            select(f)
            .where(f.c.study_uid == study_uid)
            .order_by(f.c.reported_at, f.c.sr_uid, f.c.tracking_uid)
        )
        return [_finding(row) for row in rows]


@answered
def findings_in(engine: Engine, sr_uid: str) -> list[AiFindingRow]:
    f = t.ai_findings
    with engine.connect() as connection:
        return [_finding(r) for r in connection.execute(select(f).where(f.c.sr_uid == sr_uid))]


@answered
def verdicts_of(engine: Engine, study_uid: str) -> list[VerdictRow]:
    v = t.verdicts
    with engine.connect() as connection:
        rows = connection.execute(select(v).where(v.c.study_uid == study_uid).order_by(v.c.id))
        return [_verdict(row) for row in rows]


def _delivered_at(connection: Connection, study_uid: str) -> float | None:
    """When the study's results first reached a destination (None: not delivered, e.g. silent)."""
    d = t.deliveries
    return connection.execute(
        select(func.min(d.c.updated_at)).where(d.c.study_uid == study_uid, d.c.state == "delivered")
    ).scalar()


@answered
def insert_verdict(
    engine: Engine,
    new: NewVerdict,
    node: str,
    check: Callable[[AiFindingRow | None], None],
) -> VerdictRow:
    """Store ``new`` as the finding's current verdict (the one it replaces stays, as history).

    ``check`` gets the finding (None for a finding the AI missed) under the row lock and raises to refuse.
    """
    f, v = t.ai_findings, t.verdicts
    with engine.begin() as connection:
        found = None
        if new.sr_uid:
            row = connection.execute(
                select(f).where(f.c.tracking_uid == new.tracking_uid).with_for_update()
            ).first()
            found = _finding(row) if row is not None else None
        check(found)
        started = _delivered_at(connection, new.study_uid)
        if started is None and found is not None:
            started = found.reported_at
        values = {
            **asdict(new),
            "model_name": found.model_name if found else "",
            "model_version": found.model_version if found else "",
            "model_hash": found.model_hash if found else "",
            "seconds_to_verdict": round(max(0.0, new.at - started), 3) if started is not None else None,
            "current": True,
            "node": node,
        }
        new_id = connection.execute(insert(v).values(**values).returning(v.c.id)).scalar_one()
        connection.execute(
            update(v)
            .where(v.c.tracking_uid == new.tracking_uid, v.c.current.is_(True), v.c.id != new_id)
            .values(current=False, amended_by=new_id)
        )
        return _verdict(connection.execute(select(v).where(v.c.id == new_id)).one())


@answered
def findings_on_images(engine: Engine, image_uids: list[str]) -> list[AiFindingRow]:
    """The AI findings drawn on these images (superseded ones too: the caller tells them apart)."""
    if not image_uids:
        return []
    f = t.ai_findings
    with engine.connect() as connection:
        return [_finding(r) for r in connection.execute(select(f).where(f.c.image_uid.in_(image_uids)))]
