"""Builders of result inputs shared by the result-encoder tests (SR, GSPS, SEG, FHIR, HL7)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom

from gateway.core.domain import CodedConcept, Finding
from gateway.results.common import SeriesAnalysis
from preprocessing.series import LoadedSeries

HEMORRHAGE = CodedConcept(value="50960005", scheme="SCT", meaning="Hemorrhage")


def make_finding(loaded: LoadedSeries, index: int, confidence: float = 0.93, **extra: Any) -> Finding:
    """A hemorrhage finding with the box (40, 50)-(60, 70) on slice ``index``."""
    image = loaded.images[index]
    return Finding(
        label=HEMORRHAGE,
        confidence=confidence,
        sop_instance_uid=image.sop_instance_uid,
        sop_class_uid=image.sop_class_uid,
        bbox=(40.0, 50.0, 60.0, 70.0),
        slice_index=index,
        **extra,
    )


def make_analysis(
    loaded: LoadedSeries, findings: tuple[Finding, ...], *, stat: bool, study_score: float | None = None
) -> SeriesAnalysis:
    """The reference head CT pipeline's analysis of ``loaded`` with the given findings."""
    return SeriesAnalysis(
        pipeline_name="ct_head_hyperdensity",
        algorithm_name="Head CT Hyperdensity Reference",
        algorithm_version="0.1.0",
        model_name="ct_head_hyperdensity",
        model_version="1",
        findings=findings,
        study_score=study_score if study_score is not None else (0.93 if findings else 0.01),
        stat=stat,
        stat_threshold=0.7,
        report_threshold=0.5,
        display_window=(40.0, 80.0),
        sources=loaded.headers,
    )


def content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item of an SR (or KO), depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)
