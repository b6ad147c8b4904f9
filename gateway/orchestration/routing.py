"""Routing: decide which pipeline analyses each series of a completed study.

Header rules (modality, body part, description patterns) route first. A pipeline with an ``anatomy`` also gets
the series of its modality that no header rule matched, as *anatomy-check* jobs: before any inference the
worker decides from a few sampled slices whether that anatomy is in the field of view (preprocessing/anatomy.py)
and skips the series, with the evidence, when it is not."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.config.settings import PipelineSettings
from gateway.core.domain import Priority, Series, Study

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class InferenceJob:
    """One series to analyse with one pipeline, at a priority."""

    study: Study
    series: Series
    pipeline: PipelineSettings
    priority: Priority
    created_at: float = field(default_factory=time.time)
    attempts: int = 0
    rule: str = ""  # why this pipeline: the header rule that matched, or "anatomy check: lung"
    anatomy_check: bool = False  # run only if the pipeline's anatomy is in the field of view (decided first)


@dataclass(frozen=True, kw_only=True)
class SkippedSeries:
    series_instance_uid: str
    modality: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RoutingDecision:
    jobs: tuple[InferenceJob, ...]
    skipped: tuple[SkippedSeries, ...]


def header_rule(pipeline: PipelineSettings, study: Study, series: Series) -> str:
    """The header rule that routes ``series`` to ``pipeline`` ("" when none does)."""
    if series.modality.upper() not in pipeline.route.modalities:
        return ""
    route, modality = pipeline.route, series.modality.upper()
    if not (route.body_parts or route.description_patterns or route.procedure_codes or route.reason_patterns):
        return f"modality {modality}"
    if series.body_part and series.body_part.upper() in route.body_parts:
        return f"modality {modality}, body part {series.body_part.upper()}"
    texts = [t for t in (series.series_description, study.study_description) if t]
    if any(p.search(t) for p in route.description_patterns for t in texts):
        return f"modality {modality}, description pattern"
    code = study.order_procedure_code.upper()
    if code and code in route.procedure_codes:
        return f"modality {modality}, ordered procedure {code}"
    if study.order_reason and any(p.search(study.order_reason) for p in route.reason_patterns):
        return f"modality {modality}, reason for exam"  # the reason's text is clinical: not in the rule
    return ""


def pipeline_matches(pipeline: PipelineSettings, study: Study, series: Series) -> bool:
    return bool(header_rule(pipeline, study, series))


def anatomy_candidate(pipeline: PipelineSettings, series: Series) -> bool:
    """A series of the pipeline's modality that the header rules missed, for a pipeline with an anatomy check."""
    return bool(pipeline.route.anatomy) and series.modality.upper() in pipeline.route.modalities


def study_priority(study: Study) -> Priority:
    """The more urgent of the images' Requested Procedure Priority and the study's order (HL7 feed)."""
    priority = Priority.ROUTINE
    for source, value in (
        ("Requested Procedure Priority", study.requested_priority),
        ("order", study.order_priority),
    ):
        if value:
            try:
                priority = min(priority, Priority.parse(value))
            except ValueError:
                logger.info("unknown %s priority %r; not used", source, value)
    return priority


class Router:
    def __init__(self, pipelines: tuple[PipelineSettings, ...]) -> None:
        self.pipelines = pipelines

    def route(self, study: Study) -> RoutingDecision:
        jobs: list[InferenceJob] = []
        skipped: list[SkippedSeries] = []
        priority = study_priority(study)
        for series in study.series:
            image_instances = [r for r in series.instances if r.has_pixel_data]
            if not image_instances:
                skipped.append(_skip(series, "series has no image instances (no pixel data)"))
                continue
            rules = {p.name: header_rule(p, study, series) for p in self.pipelines}
            for p in self.pipelines:
                if not rules[p.name] and anatomy_candidate(p, series):
                    rules[p.name] = f"anatomy check: {p.route.anatomy}"
            matched = [p for p in self.pipelines if rules[p.name]]
            if not matched:
                skipped.append(
                    _skip(
                        series,
                        f"no pipeline for modality {series.modality or '?'} / body part {series.body_part or '?'}",
                    )
                )
                continue
            for pipeline in matched:
                if len(image_instances) < pipeline.route.min_slices:
                    skipped.append(
                        _skip(
                            series,
                            f"{pipeline.name} needs at least {pipeline.route.min_slices} slices, got {len(image_instances)}",
                        )
                    )
                    continue
                rule = rules[pipeline.name]
                jobs.append(
                    InferenceJob(
                        study=study,
                        series=series,
                        pipeline=pipeline,
                        priority=priority,
                        rule=rule,
                        anatomy_check=rule.startswith("anatomy check"),
                    )
                )
        return RoutingDecision(jobs=tuple(jobs), skipped=tuple(skipped))


def _skip(series: Series, reason: str) -> SkippedSeries:
    return SkippedSeries(
        series_instance_uid=series.series_instance_uid, modality=series.modality, reason=reason
    )
