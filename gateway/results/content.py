"""The finding content of a TID 1500 report, independent of who wrote it.

``ReportedFinding`` is what the gateway writes into its SR (through ``reported_findings``) and what
``read_measurement_report`` returns for any TID 1500 SR - the gateway's own or another system's (for prior-study
comparison and QA). Writing then reading gives back equal objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from gateway.core import codes as gw
from gateway.core.domain import CodedConcept, Finding
from gateway.core.errors import InvalidInstanceError
from gateway.core.terminology import finding_site
from gateway.results.common import SeriesAnalysis

ALGORITHM_NAME = "111001"
ALGORITHM_VERSION = "111003"


@dataclass(frozen=True, kw_only=True)
class MeasuredValue:
    name: CodedConcept
    value: float
    unit: CodedConcept


@dataclass(frozen=True, kw_only=True)
class Region:
    """Where a finding is: 2D pixel coordinates on one image, or 3D patient coordinates in a frame of reference."""

    graphic_type: str
    points: tuple[tuple[float, ...], ...]
    sop_instance_uid: str | None = None  # 2D (SCOORD) only
    frame_of_reference_uid: str | None = None  # 3D (SCOORD3D) only

    @property
    def is_3d(self) -> bool:
        return self.frame_of_reference_uid is not None


@dataclass(frozen=True, kw_only=True)
class ReportedFinding:
    tracking_identifier: str
    tracking_uid: str
    finding_type: CodedConcept
    finding_site: CodedConcept | None
    region: Region | None
    source_sop_instance_uid: str | None  # the image the finding is on (region or measurement reference)
    segment: tuple[str, int] | None  # (SEG SOP Instance UID, segment number) for segment-based findings
    measurements: tuple[MeasuredValue, ...]
    evaluations: tuple[tuple[CodedConcept, CodedConcept], ...]
    algorithm_name: str | None
    algorithm_version: str | None

    def measurement(self, code_value: str) -> float | None:
        for m in self.measurements:
            if m.name.value == code_value:
                return m.value
        return None


def _code(item: Any) -> CodedConcept:
    return CodedConcept(
        value=str(item.value),
        scheme=str(item.scheme_designator),
        meaning=str(item.meaning),
    )


def _rect(finding: Finding) -> list[tuple[float, float]]:
    if finding.bbox is None:
        raise ValueError("an image-level finding has no box")
    x0, y0, x1, y1 = finding.bbox
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def rectangle(finding: Finding) -> np.ndarray:
    """The finding's box as a closed polyline of (column, row) points."""
    return np.asarray(_rect(finding), dtype=np.float32)


def reported_findings(analysis: SeriesAnalysis) -> list[ReportedFinding]:
    """The gateway's findings as report content: each box a closed 2D outline (SCOORD) on the image it is on.

    Image-referenced 2D coordinates are what every viewer draws (OHIF does not draw SCOORD3D outlines); the
    position in patient space follows from the referenced image's plane."""
    headers = {str(ds.SOPInstanceUID): ds for ds in analysis.sources}
    out = []
    for number, finding in enumerate(analysis.findings, start=1):
        header = headers[finding.sop_instance_uid]
        region: Region | None = None  # image-level (classification): the measurement references the image
        if finding.bbox is not None:
            points = tuple((round(x, 3), round(y, 3)) for x, y in _rect(finding))
            region = Region(graphic_type="POLYLINE", points=points, sop_instance_uid=finding.sop_instance_uid)
        measurements = [
            MeasuredValue(
                name=gw.c(gw.AI_CONFIDENCE), value=round(finding.confidence, 4), unit=gw.c(gw.NO_UNITS)
            )
        ]
        if finding.long_axis_mm is not None:
            measurements.append(
                MeasuredValue(name=gw.c(gw.LONG_AXIS), value=finding.long_axis_mm, unit=gw.c(gw.MILLIMETER))
            )
        if finding.area_mm2 is not None:
            measurements.append(
                MeasuredValue(name=gw.c(gw.AREA), value=finding.area_mm2, unit=gw.c(gw.SQUARE_MILLIMETER))
            )
        if finding.volume_mm3 is not None:
            measurements.append(
                MeasuredValue(name=gw.c(gw.VOLUME), value=finding.volume_mm3, unit=gw.c(gw.CUBIC_MILLIMETER))
            )
        if finding.mean_hu is not None:
            measurements.append(
                MeasuredValue(name=gw.c(gw.MEAN), value=finding.mean_hu, unit=gw.c(gw.HOUNSFIELD_UNIT))
            )
        stat = finding.confidence >= analysis.stat_threshold and analysis.stat
        out.append(
            ReportedFinding(
                tracking_identifier=f"AI finding {number}",
                tracking_uid=analysis.result_uid(f"finding-{number}"),  # the same analysis, the same UIDs
                finding_type=finding.label,
                finding_site=finding_site(str(header.get("BodyPartExamined", ""))),
                region=region,
                source_sop_instance_uid=finding.sop_instance_uid,
                segment=None,
                measurements=tuple(measurements),
                evaluations=(
                    (gw.c(gw.STAT_FLAG), gw.c(gw.YES if stat else gw.NO)),
                    *(((gw.c(gw.INCIDENTAL), gw.c(gw.YES)),) if analysis.routing_note else ()),
                ),
                algorithm_name=analysis.algorithm_name,
                algorithm_version=analysis.algorithm_version,
            )
        )
    return out


# -- reading ------------------------------------------------------------------------------------------------


def _algorithm(group: Any) -> tuple[str | None, str | None]:
    name = version = None
    for item in group.get("ContentSequence", []):
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "TEXT" and code == ALGORITHM_NAME:
            name = str(item.TextValue)
        elif item.ValueType == "TEXT" and code == ALGORITHM_VERSION:
            version = str(item.TextValue)
    return name, version


def _measured(group: Any) -> tuple[MeasuredValue, ...]:
    values = []
    for m in group.get_measurements():
        if m.value is None or not math.isfinite(float(m.value)):
            continue
        values.append(MeasuredValue(name=_code(m.name), value=float(m.value), unit=_code(m.unit)))
    return tuple(values)


def _measurement_image(group: Any) -> str | None:
    """The image referenced by a measurement (how the gateway ties a 3D region to its source image)."""
    for item in group.get("ContentSequence", []):
        for child in item.get("ContentSequence", []):
            if child.ValueType == "IMAGE" and "ReferencedSOPSequence" in child:
                return str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


def _region(roi: Any) -> Region | None:
    if roi is None:
        return None
    data = np.asarray(roi.value, dtype=np.float64)
    points = tuple(tuple(round(float(v), 3) for v in p) for p in data)
    graphic_type = str(roi.graphic_type.value)
    if isinstance(roi, hd.sr.ImageRegion3D):
        return Region(
            graphic_type=graphic_type, points=points, frame_of_reference_uid=str(roi.frame_of_reference_uid)
        )
    source = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return Region(graphic_type=graphic_type, points=points, sop_instance_uid=str(source))


def read_measurement_report(ds: Dataset) -> list[ReportedFinding]:
    """Parse the planar and volumetric ROI groups of a TID 1500 SR (any writer) into ``ReportedFinding``s."""
    templates = [str(t.TemplateIdentifier) for t in ds.get("ContentTemplateSequence", [])]
    if ds.get("Modality") != "SR" or "1500" not in templates:
        raise InvalidInstanceError("not a TID 1500 Measurement Report")
    report = hd.sr.MeasurementReport.from_sequence([ds])
    image_level = [
        g
        for g in report.get_image_measurement_groups()
        if g.finding_type is None or str(g.finding_type.value) != gw.AI_STUDY_ASSESSMENT.value
    ]
    groups: list[Any] = [
        *report.get_planar_roi_measurement_groups(),
        *report.get_volumetric_roi_measurement_groups(),
        *image_level,
    ]
    findings = []
    for group in groups:
        region = _region(getattr(group, "roi", None))
        segment = None
        segment_ref = getattr(group, "referenced_segment", None) or getattr(
            group, "referenced_segmentation_frame", None
        )
        if segment_ref is not None:
            numbers = segment_ref.referenced_segment_numbers or [0]
            segment = (str(segment_ref.referenced_sop_instance_uid), int(numbers[0]))
        container = group[0]  # highdicom templates are sequences; the group container comes first
        source = (
            region.sop_instance_uid
            if region is not None and not region.is_3d
            else _measurement_image(container)
        )
        name, version = _algorithm(container)
        findings.append(
            ReportedFinding(
                tracking_identifier=str(group.tracking_identifier),
                tracking_uid=str(group.tracking_uid),
                finding_type=_code(group.finding_type),
                finding_site=_code(group.finding_sites[0].value) if group.finding_sites else None,
                region=region,
                source_sop_instance_uid=source,
                segment=segment,
                measurements=_measured(group),
                evaluations=tuple(
                    (_code(e.name), _code(e.value)) for e in group.get_qualitative_evaluations()
                ),
                algorithm_name=name,
                algorithm_version=version,
            )
        )
    return findings


@dataclass(frozen=True, kw_only=True)
class SeriesReport:
    """One analysed series as reported: its analysis, the findings written into its SR, and the SR's UID."""

    analysis: SeriesAnalysis
    findings: tuple[ReportedFinding, ...]
    sr_sop_instance_uid: str

    @property
    def header(self) -> Dataset:
        return self.analysis.sources[0]
