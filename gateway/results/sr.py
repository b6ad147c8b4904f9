"""Comprehensive 3D SR holding a TID 1500 Measurement Report, built with highdicom's typed templates.

Content: one planar ROI group (TID 1410) per finding with a tracking identifier and UID, its finding type and
site as codes, the region (a closed SCOORD outline on the image it is on), confidence, long axis, area and mean
HU with UCUM units, and the STAT evaluation; then the study-level Qualitative Evaluations with the CAD summary, the
triage score and the STAT flag. Every group
names the algorithm, its version and parameters; the device is the observer. A negative series still gets a
report ("All algorithms succeeded; without findings").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageLibraryEntryDescriptors,
    ImageRegion,
    ImageRegion3D,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from gateway.core import codes as gw
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis
from gateway.results.content import ReportedFinding, reported_findings

SR_SERIES_NUMBER = 9901
ENGLISH = CodedConcept("en-US", "RFC5646", "English (United States)")


def device_uid(analysis: SeriesAnalysis) -> str:
    """A stable UID for the algorithm as an observer device (same name and version -> same UID)."""
    return str(generate_uid(entropy_srcs=["device", analysis.algorithm_name, analysis.algorithm_version]))


def _algorithm(analysis: SeriesAnalysis) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=analysis.algorithm_name,
        version=analysis.algorithm_version,
        parameters=analysis.algorithm_parameters(),
        manufacturer=MANUFACTURER,
    )


def _library_images(analysis: SeriesAnalysis) -> list[Dataset]:
    """Image Library (TID 1600) entries: the annotated images, or the first analysed image of a negative series.

    Every analysed instance is referenced in the evidence sequence; listing them all in the library as well
    multiplies the encoding time by the slice count without adding information a viewer uses.
    """
    annotated = {f.sop_instance_uid for f in analysis.findings}
    images = [ds for ds in analysis.sources if str(ds.SOPInstanceUID) in annotated and _describable(ds)]
    if images:
        return images
    return next(([ds] for ds in analysis.sources if _describable(ds)), [])


def _describable(ds: Dataset) -> bool:
    """Whether highdicom can describe the image in the library (TID 1601-1604 need modality-specific
    attributes such as plane geometry or Patient Orientation, which senders do not always include)."""
    try:
        ImageLibraryEntryDescriptors(ds)
    except Exception:
        return False
    return True


def _finding_group(
    finding: ReportedFinding, analysis: SeriesAnalysis, algorithm: AlgorithmIdentification
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    """TID 1410 (planar ROI) for a located finding; TID 1501 (image-level) for a classification finding."""
    headers = {str(ds.SOPInstanceUID): ds for ds in analysis.sources}
    assert finding.source_sop_instance_uid is not None
    source = headers[finding.source_sop_instance_uid]
    image_ref = [
        SourceImageForMeasurement(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        )
    ]
    measurements = [
        Measurement(
            name=gw.to_highdicom(m.name),
            value=m.value,
            unit=gw.to_highdicom(m.unit),
            algorithm_id=algorithm,
            # The source image travels with the first measurement, so a 3D or image-level finding stays tied
            # to its image.
            referenced_images=image_ref if index == 0 else None,
        )
        for index, m in enumerate(finding.measurements)
    ]
    common: dict[str, Any] = {
        "tracking_identifier": TrackingIdentifier(
            uid=finding.tracking_uid, identifier=finding.tracking_identifier
        ),
        "finding_type": gw.to_highdicom(finding.finding_type),
        "finding_sites": [FindingSite(gw.to_highdicom(finding.finding_site))]
        if finding.finding_site
        else None,
        "algorithm_id": algorithm,
        "measurements": measurements,
        "qualitative_evaluations": [
            QualitativeEvaluation(name=gw.to_highdicom(name), value=gw.to_highdicom(value))
            for name, value in finding.evaluations
        ],
    }
    region = finding.region
    if region is None:
        return MeasurementsAndQualitativeEvaluations(**common)
    roi: ImageRegion | ImageRegion3D
    if region.is_3d:
        roi = ImageRegion3D(
            graphic_type=region.graphic_type,
            graphic_data=np.asarray(region.points, dtype=np.float64),
            frame_of_reference_uid=str(region.frame_of_reference_uid),
        )
    else:
        roi = ImageRegion(
            graphic_type=region.graphic_type,
            graphic_data=np.asarray(region.points, dtype=np.float64),
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
            ),
        )
    return PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=roi, **common)


QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")


def _placeholder_group() -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier="none"), finding_type=gw.AI_STUDY_ASSESSMENT
    )


def _study_assessment(analysis: SeriesAnalysis, *, has_findings: bool, failure: str) -> ContainerContentItem:
    """The study-level assessment as the report's Qualitative Evaluations (TID 1500 rows 12-14): the CAD
    summary and the STAT flag as codes, the triage score (none when the analysis failed) and, as comments, why
    the analysis failed and how the series was routed.

    It is not a measurement group: a group without an image region is not drawable, and OHIF's SR viewport
    fails on one ("Cannot read properties of undefined (reading 'ReferencedSOPSequence')")."""
    if failure:
        summary = gw.NO_ALGORITHMS_SUCCEEDED
    else:
        summary = gw.ALL_SUCCEEDED_WITH_FINDINGS if has_findings else gw.ALL_SUCCEEDED_WITHOUT_FINDINGS
    contains = RelationshipTypeValues.CONTAINS
    items: list[Any] = [
        CodeContentItem(name=gw.CAD_SUMMARY, value=summary, relationship_type=contains),
        CodeContentItem(
            name=gw.STAT_FLAG, value=gw.YES if analysis.stat else gw.NO, relationship_type=contains
        ),
    ]
    if not failure:
        score = f"{float(analysis.study_score):.4f}"
        items.append(TextContentItem(name=gw.AI_TRIAGE_SCORE, value=score, relationship_type=contains))
    notes = [f"AI analysis failed: {failure}"] if failure else []
    if analysis.routing_note:
        notes.append(analysis.routing_note)
    items += [
        TextContentItem(name=gw.COMMENT, value=note[:1024], relationship_type=contains) for note in notes
    ]
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = ContentSequence(items)
    return container


def build_sr(
    analysis: SeriesAnalysis,
    *,
    findings: list[ReportedFinding] | None = None,
    previous: Sequence[Dataset] = (),
    failure: str = "",
) -> Comprehensive3DSR:
    """The SR for one analysed series. ``findings`` defaults to ``reported_findings(analysis)``.

    ``previous`` lists earlier SRs of the same series and pipeline that this one supersedes (late instances,
    a new model version): they are referenced as predecessor documents.

    ``failure``: the series was routed to the pipeline but could not be analysed, for this reason (no patient
    data in it). The SR then says so - CAD Processing and Findings Summary "No algorithms succeeded; without
    findings" (111245, DCM), the reason as a comment, no score and no findings - so that nobody downstream reads
    "the AI failed" as "the AI found nothing".
    """
    findings = [] if failure else reported_findings(analysis) if findings is None else findings
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(analysis),
            name=analysis.algorithm_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{analysis.model_name} v{analysis.model_version}",
        ),
    )
    algorithm = _algorithm(analysis)
    groups = [_finding_group(f, analysis, algorithm) for f in findings]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=gw.PROCEDURE_IMAGING,
        # highdicom insists on one group; TID 1500 needs Imaging Measurements or Qualitative Evaluations
        imaging_measurements=groups or [_placeholder_group()],
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(ENGLISH),
        referenced_images=_library_images(analysis) or None,
    )
    root = report[0].ContentSequence
    if not groups:  # no finding: no Imaging Measurements container, the assessment says why
        root[:] = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue != IMAGING_MEASUREMENTS.value]
    root.append(_study_assessment(analysis, has_findings=bool(findings), failure=failure))
    sr = Comprehensive3DSR(
        evidence=list(analysis.sources),
        content=report,
        series_instance_uid=analysis.result_uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=analysis.result_uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=not analysis.incomplete_reason,  # PARTIAL: the study it analysed may be incomplete
        is_final=False,  # preliminary until a radiologist reviews it
        is_verified=False,
        previous_versions=list(previous) or None,
    )
    caveat = "; study may be incomplete" if analysis.incomplete_reason else ""
    if failure:
        sr.SeriesDescription = f"AI analysis FAILED: {analysis.pipeline_name}"[:64]
    else:
        sr.SeriesDescription = f"AI results: {analysis.pipeline_name} (preliminary{caveat})"[:64]
    sr.SoftwareVersions = SOFTWARE_VERSION
    return sr
