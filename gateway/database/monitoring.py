"""What model monitoring reads from the system of record: volumes, scores, verdicts and report comparisons per
model version and site (the sending PACS's AE title), the model history, and drift alarms. Read-only but for
the alarms; blocking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, distinct, func, select, update

from gateway.database import schema as t
from gateway.database.connect import upsert
from gateway.database.queries import answered


@dataclass(frozen=True, kw_only=True)
class Volume:
    model_version: str
    site: str
    studies: int
    positive_studies: int
    first_at: float
    last_at: float


@dataclass(frozen=True, kw_only=True)
class VerdictPoint:
    kind: str
    at: float
    seconds_to_verdict: float | None


@answered
def volumes(engine: Engine, model: str, since: float) -> list[Volume]:
    a, s = t.series_analyses, t.studies
    query = (
        select(
            a.c.model_version,
            s.c.calling_ae,
            func.count(distinct(a.c.study_uid)),
            func.min(a.c.at),
            func.max(a.c.at),
        )
        .select_from(a.join(s, s.c.study_uid == a.c.study_uid))
        .where(a.c.model_name == model, a.c.outcome == "analysed", a.c.at >= since)
        .group_by(a.c.model_version, s.c.calling_ae)
    )
    positive = (
        select(a.c.model_version, s.c.calling_ae, func.count(distinct(a.c.study_uid)))
        .select_from(a.join(s, s.c.study_uid == a.c.study_uid))
        .where(a.c.model_name == model, a.c.outcome == "analysed", a.c.at >= since, a.c.findings > 0)
        .group_by(a.c.model_version, s.c.calling_ae)
    )
    with engine.connect() as connection:
        positives = {(v, site): n for v, site, n in connection.execute(positive)}
        return [
            Volume(
                model_version=version,
                site=site,
                studies=int(n),
                positive_studies=int(positives.get((version, site), 0)),
                first_at=float(first),
                last_at=float(last),
            )
            for version, site, n, first, last in connection.execute(query)
        ]


@answered
def scores(
    engine: Engine, model: str, version: str, site: str, *, silent: bool | None, since: float = 0.0
) -> list[float]:
    """Finding confidences in the order they were reported (``silent``: only silent-mode, only shown, or all)."""
    f = t.ai_findings
    query = select(f.c.confidence).where(
        f.c.model_name == model,
        f.c.model_version == version,
        f.c.calling_ae == site,
        f.c.reported_at >= since,
    )
    if silent is True:
        query = query.where(f.c.mode == "silent")
    elif silent is False:
        query = query.where(f.c.mode != "silent")
    with engine.connect() as connection:
        return [float(c) for (c,) in connection.execute(query.order_by(f.c.reported_at, f.c.tracking_uid))]


@answered
def verdict_sequence(
    engine: Engine, model: str, version: str, site: str, since: float = 0.0
) -> list[VerdictPoint]:
    """The current verdicts on this model version's findings at this site, in the order they were given."""
    v, f = t.verdicts, t.ai_findings
    query = (
        select(v.c.kind, v.c.at, v.c.seconds_to_verdict)
        .select_from(v.join(f, f.c.tracking_uid == v.c.tracking_uid))
        .where(
            v.c.current.is_(True),
            f.c.model_name == model,
            f.c.model_version == version,
            f.c.calling_ae == site,
            v.c.at >= since,
        )
        .order_by(v.c.at, v.c.id)
    )
    with engine.connect() as connection:
        return [
            VerdictPoint(kind=k, at=float(at), seconds_to_verdict=s) for k, at, s in connection.execute(query)
        ]


@answered
def comparison_counts(
    engine: Engine, model: str, version: str, site: str, *, silent: bool, since: float = 0.0
) -> dict[str, int]:
    """Current report comparisons of silent (or shown) pipelines by ``<ai_positive>/<report label>``."""
    c = t.report_comparisons
    query = (
        select(c.c.ai_positive, c.c.report_label, func.count())
        .where(
            c.c.current.is_(True),
            c.c.model_name == model,
            c.c.model_version == version,
            c.c.calling_ae == site,
            c.c.at >= since,
            (c.c.mode == "silent") if silent else (c.c.mode != "silent"),
        )
        .group_by(c.c.ai_positive, c.c.report_label)
    )
    with engine.connect() as connection:
        return {f"{int(bool(ai))}/{label}": int(n) for ai, label, n in connection.execute(query)}


@answered
def model_history(engine: Engine, model: str) -> list[dict[str, Any]]:
    m = t.models
    with engine.connect() as connection:
        rows = connection.execute(select(m).where(m.c.model == model).order_by(m.c.first_seen_at))
        return [dict(r._mapping) for r in rows]


@answered
def sites_and_versions(engine: Engine, model: str | None = None) -> list[tuple[str, str, str]]:
    """(model, version, site) with findings reported."""
    f = t.ai_findings
    query = select(f.c.model_name, f.c.model_version, f.c.calling_ae).distinct()
    if model is not None:
        query = query.where(f.c.model_name == model)
    with engine.connect() as connection:
        return [
            (m, v, s) for m, v, s in connection.execute(query.order_by(f.c.model_name, f.c.model_version))
        ]


@answered
def record_alarm(
    engine: Engine, *, model: str, version: str, site: str, kind: str, at_count: int, value: float, at: float
) -> bool:
    """Keep an alarm; False when it was already known (the same alarm seen again, by this node or another)."""
    with engine.begin() as connection:
        insert = upsert(connection, t.drift_alarms).values(
            model_name=model,
            model_version=version,
            site=site,
            kind=kind,
            at_count=at_count,
            value=value,
            at=at,
        )
        # RETURNING, not rowcount: psycopg's rowcount of an INSERT ... ON CONFLICT is not reliable here.
        done = connection.execute(
            insert.on_conflict_do_nothing(
                index_elements=["model_name", "model_version", "site", "kind", "at_count"]
            ).returning(t.drift_alarms.c.id)
        ).first()
        return done is not None


@answered
def mark_notified(engine: Engine, alarm: dict[str, Any]) -> None:
    d = t.drift_alarms
    with engine.begin() as connection:
        connection.execute(
            update(d)
            .where(
                and_(
                    d.c.model_name == alarm["model_name"],
                    d.c.model_version == alarm["model_version"],
                    d.c.site == alarm["site"],
                    d.c.kind == alarm["kind"],
                    d.c.at_count == alarm["at_count"],
                )
            )
            .values(notified=True)
        )


@answered
def alarms(engine: Engine, model: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
    d = t.drift_alarms
    query = select(d).where(d.c.at >= since)
    if model is not None:
        query = query.where(d.c.model_name == model)
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(query.order_by(d.c.at))]


@answered
def model_names(engine: Engine) -> list[str]:
    """Every model that analysed something."""
    a = t.series_analyses
    with engine.connect() as connection:
        query = select(a.c.model_name).where(a.c.model_name != "").distinct().order_by(a.c.model_name)
        return [name for (name,) in connection.execute(query)]


@answered
def record_pipeline_changes(
    engine: Engine, current: dict[str, dict[str, Any]], *, node: str, source: str, at: float
) -> list[dict[str, Any]]:
    """Compare each pipeline's governed settings with the last recorded ones and keep what changed (with the
    value before); a pipeline seen for the first time has no "before", one gone no "after". Returns the changes."""
    p = t.pipeline_changes
    with engine.begin() as connection:
        latest: dict[str, Any] = {}
        for row in connection.execute(select(p).order_by(p.c.at, p.c.id)):
            latest[row.pipeline] = row.after
        changes = []
        for name in sorted(set(latest) | set(current)):
            before, after = latest.get(name), current.get(name)
            if before == after:
                continue
            changes.append({"pipeline": name, "before": before, "after": after})
        for change in changes:
            connection.execute(p.insert().values(**change, at=at, node=node, source=source))
        return changes


@answered
def pipeline_changes(
    engine: Engine, pipelines: list[str] | None = None, since: float = 0.0
) -> list[dict[str, Any]]:
    p = t.pipeline_changes
    query = select(p).where(p.c.at >= since)
    if pipelines is not None:
        query = query.where(p.c.pipeline.in_(pipelines))
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(query.order_by(p.c.at, p.c.id))]
