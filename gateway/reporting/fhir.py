"""FHIR R4 results: a transaction Bundle with one DiagnosticReport per study, one Observation per finding and a
Device for the algorithm, built and validated with the ``fhir.resources`` models (R4B, wire-compatible with R4).

The report points at the ImagingStudy by Study Instance UID; each Observation carries the finding type,
body site, the confidence as its value, the measurements as components, and the algorithm as its device.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from gateway.core.domain import CodedConcept
from gateway.results.common import MANUFACTURER, SeriesAnalysis
from gateway.results.content import MeasuredValue, ReportedFinding, SeriesReport

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
}
PRIVATE_SYSTEM = "urn:dicom-ai-gateway:codes"
DICOM_UID = "urn:dicom:uid"
IMAGING_REPORT = {"system": SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}


def coding(code: CodedConcept) -> dict[str, Any]:
    return {
        "system": SYSTEMS.get(code.scheme, f"{PRIVATE_SYSTEM}:{code.scheme}"),
        "code": code.value,
        "display": code.meaning,
    }


def quantity(m: MeasuredValue) -> dict[str, Any]:
    return {"value": m.value, "unit": m.unit.meaning, "system": SYSTEMS["UCUM"], "code": m.unit.value}


def _study_ref(study_uid: str) -> dict[str, Any]:
    return {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}, "type": "ImagingStudy"}


def _codeable(system: str, code: str, display: str = "") -> dict[str, Any]:
    item = {"system": system, "code": code}
    if display:
        item["display"] = display
    return {"coding": [item]}


def _entry(resource: dict[str, Any], url: str | None = None) -> dict[str, Any]:
    return {
        "fullUrl": url or f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def _subject(header: Any) -> dict[str, Any] | None:
    if not str(header.get("PatientID", "")):
        return None
    return {
        "identifier": {"system": "urn:dicom:patient-id", "value": str(header.PatientID)},
        "type": "Patient",
    }


def _device(analysis: SeriesAnalysis) -> dict[str, Any]:
    """The algorithm that made the findings: its name, version and the Triton model behind it."""
    a = analysis
    return {
        "resourceType": "Device",
        "status": "active",
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": a.algorithm_name, "type": "manufacturer-name"}],
        "version": [
            {"value": a.algorithm_version},
            {"type": {"text": "model"}, "value": f"{a.model_name} v{a.model_version}"},
        ],
    }


def _observation(
    finding: ReportedFinding,
    report: SeriesReport,
    *,
    device: str,
    issued: str,
    subject: dict[str, Any] | None,
) -> dict[str, Any]:
    """One finding: its type, confidence as the value, measurements as components, where it came from."""
    a = report.analysis
    confidence, *others = finding.measurements
    critical = any(v.value == "373066001" for _, v in finding.evaluations)
    study_uid = str(report.header.StudyInstanceUID)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [_codeable("http://terminology.hl7.org/CodeSystem/observation-category", "imaging")],
        "code": {"coding": [coding(finding.finding_type)], "text": finding.finding_type.meaning},
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{finding.tracking_uid}"}],
        "issued": issued,
        "valueQuantity": quantity(confidence),
        "interpretation": [
            _codeable(
                "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "AA" if critical else "A",
                "Critical abnormal" if critical else "Abnormal",
            )
        ],
        "derivedFrom": [
            _study_ref(study_uid),
            {
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{report.sr_sop_instance_uid}"},
                "type": "Media",
            },
        ],
        "device": {"reference": device},
        "note": [
            {
                "text": f"AI result from {a.algorithm_name} {a.algorithm_version}; not verified by a radiologist."
            }
        ],
    }
    if others:
        resource["component"] = [
            {"code": {"coding": [coding(m.name)]}, "valueQuantity": quantity(m)} for m in others
        ]
    if finding.finding_site is not None:
        resource["bodySite"] = {"coding": [coding(finding.finding_site)]}
    if subject is not None:
        resource["subject"] = subject
    return resource


def _diagnostic_report(
    reports: Sequence[SeriesReport],
    results: list[dict[str, Any]],
    conclusion_codes: list[dict[str, Any]],
    *,
    stat: bool,
    issued: str,
    subject: dict[str, Any] | None,
) -> dict[str, Any]:
    """The study's report: every series' SR as identifier, the observations, a conclusion in words."""
    header = reports[0].header
    names = ", ".join(c["display"] for c in conclusion_codes) or "no findings"
    pipelines = ", ".join(sorted({r.analysis.pipeline_name for r in reports}))
    conclusion = f"AI triage ({pipelines}): {len(results)} finding(s): {names}."
    if stat:
        conclusion += " STAT: critical finding flagged for immediate reading."
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [_codeable("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": {"coding": [IMAGING_REPORT]},
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{r.sr_sop_instance_uid}"} for r in reports],
        "issued": issued,
        "imagingStudy": [_study_ref(str(header.StudyInstanceUID))],
        "conclusion": conclusion,
    }
    if results:
        resource["result"] = results
    if conclusion_codes:
        resource["conclusionCode"] = [{"coding": [c]} for c in conclusion_codes]
    if subject is not None:
        resource["subject"] = subject
    accession = str(header.get("AccessionNumber", ""))
    if accession:
        resource["basedOn"] = [
            {
                "identifier": {
                    "type": _codeable("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN"),
                    "value": accession,
                },
                "type": "ServiceRequest",
            }
        ]
    return resource


def build_bundle(reports: Sequence[SeriesReport], *, stat: bool, now: datetime | None = None) -> Bundle:
    """The FHIR transaction for one analysed study (all its analysed series)."""
    if not reports:
        raise ValueError("build_bundle needs at least one analysed series")
    issued = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    subject = _subject(reports[0].header)
    entries: list[dict[str, Any]] = []
    devices: dict[tuple[str, str, str], str] = {}
    results: list[dict[str, Any]] = []
    conclusion_codes: list[dict[str, Any]] = []
    for report in reports:
        a = report.analysis
        key = (a.algorithm_name, a.algorithm_version, a.model_version)
        if key not in devices:
            devices[key] = f"urn:uuid:{uuid.uuid4()}"
            entries.append(_entry(_device(a), devices[key]))
        for finding in report.findings:
            url = f"urn:uuid:{uuid.uuid4()}"
            results.append({"reference": url})
            observation = _observation(finding, report, device=devices[key], issued=issued, subject=subject)
            entries.append(_entry(observation, url))
            if coding(finding.finding_type) not in conclusion_codes:
                conclusion_codes.append(coding(finding.finding_type))
    entries.append(
        _entry(
            _diagnostic_report(reports, results, conclusion_codes, stat=stat, issued=issued, subject=subject)
        )
    )
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "timestamp": issued, "entry": entries}
    )
