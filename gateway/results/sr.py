"""Comprehensive 3D SR holding a TID 1500 Measurement Report, built with highdicom's typed templates.

Content: one study-level measurement group (TID 1501) with the CAD summary, the triage score and the STAT
flag; one planar ROI group (TID 1410) per finding with its finding type, the region as SCOORD on the
referenced image, and the confidence. Every group names the algorithm and its version. A negative series
still gets a report ("All algorithms succeeded; without findings").
"""

from __future__ import annotations

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from gateway.domain import Finding
from gateway.results import codes as gw
from gateway.results.common import MANUFACTURER, SOFTWARE_VERSION, SeriesAnalysis

SR_SERIES_NUMBER = 9901


def device_uid(analysis: SeriesAnalysis) -> str:
    """A stable UID for the algorithm as an observer device (same name and version -> same UID)."""
    return str(generate_uid(entropy_srcs=["device", analysis.algorithm_name, analysis.algorithm_version]))


def rectangle(finding: Finding) -> np.ndarray:
    x0, y0, x1, y1 = finding.bbox
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


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
    images = [ds for ds in analysis.sources if str(ds.SOPInstanceUID) in annotated]
    return images or [analysis.sources[0]]


def _yes_no(flag: bool) -> CodedConcept:
    return gw.YES if flag else gw.NO


def build_sr(
    analysis: SeriesAnalysis, *, series_uid: str | None = None, sop_uid: str | None = None
) -> Comprehensive3DSR:
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
    summary = gw.ALL_SUCCEEDED_WITH_FINDINGS if analysis.findings else gw.ALL_SUCCEEDED_WITHOUT_FINDINGS
    groups: list[object] = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="AI study assessment"),
            finding_type=gw.AI_STUDY_ASSESSMENT,
            algorithm_id=algorithm,
            measurements=[
                Measurement(
                    name=gw.AI_TRIAGE_SCORE,
                    value=round(float(analysis.study_score), 4),
                    unit=gw.NO_UNITS,
                    algorithm_id=algorithm,
                )
            ],
            qualitative_evaluations=[
                QualitativeEvaluation(name=gw.CAD_SUMMARY, value=summary),
                QualitativeEvaluation(name=gw.STAT_FLAG, value=_yes_no(analysis.stat)),
            ],
        )
    ]
    for number, finding in enumerate(analysis.findings, start=1):
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=rectangle(finding),
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            ),
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f"AI finding {number}"),
                referenced_region=region,
                finding_type=gw.to_highdicom(finding.label),
                algorithm_id=algorithm,
                measurements=[
                    Measurement(
                        name=gw.AI_CONFIDENCE,
                        value=round(float(finding.confidence), 4),
                        unit=gw.NO_UNITS,
                        algorithm_id=algorithm,
                    )
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(
                        name=gw.STAT_FLAG, value=_yes_no(finding.confidence >= analysis.stat_threshold)
                    )
                ],
            )
        )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=gw.PROCEDURE_IMAGING,
        imaging_measurements=groups,  # type: ignore[arg-type]
        referenced_images=_library_images(analysis),
    )
    sr = Comprehensive3DSR(
        evidence=list(analysis.sources),
        content=report,
        series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # preliminary until a radiologist reviews it
        is_verified=False,
    )
    sr.SeriesDescription = f"AI results: {analysis.pipeline_name} (preliminary)"[:64]
    sr.SoftwareVersions = SOFTWARE_VERSION
    return sr
