"""Routing: decide, from headers only, which pipeline analyses each series of a completed study."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.domain import Priority, Series, Study
from gateway.settings import PipelineSettings

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


@dataclass(frozen=True, kw_only=True)
class SkippedSeries:
    series_instance_uid: str
    modality: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RoutingDecision:
    jobs: tuple[InferenceJob, ...]
    skipped: tuple[SkippedSeries, ...]


def pipeline_matches(pipeline: PipelineSettings, study: Study, series: Series) -> bool:
    if series.modality.upper() not in pipeline.modalities:
        return False
    if not pipeline.body_parts and not pipeline.description_patterns:
        return True
    if series.body_part and series.body_part.upper() in pipeline.body_parts:
        return True
    texts = [t for t in (series.series_description, study.study_description) if t]
    return any(p.search(t) for p in pipeline.description_patterns for t in texts)


def study_priority(study: Study) -> Priority:
    if study.requested_priority:
        try:
            return Priority.parse(study.requested_priority)
        except ValueError:
            logger.info("unknown Requested Procedure Priority %r; using ROUTINE", study.requested_priority)
    return Priority.ROUTINE


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
            matched = [p for p in self.pipelines if pipeline_matches(p, study, series)]
            if not matched:
                skipped.append(
                    _skip(
                        series,
                        f"no pipeline for modality {series.modality or '?'} / body part {series.body_part or '?'}",
                    )
                )
                continue
            for pipeline in matched:
                if len(image_instances) < pipeline.min_slices:
                    skipped.append(
                        _skip(
                            series,
                            f"{pipeline.name} needs at least {pipeline.min_slices} slices, got {len(image_instances)}",
                        )
                    )
                    continue
                jobs.append(InferenceJob(study=study, series=series, pipeline=pipeline, priority=priority))
        return RoutingDecision(jobs=tuple(jobs), skipped=tuple(skipped))


def _skip(series: Series, reason: str) -> SkippedSeries:
    return SkippedSeries(
        series_instance_uid=series.series_instance_uid, modality=series.modality, reason=reason
    )
