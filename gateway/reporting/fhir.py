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
from gateway.results.common import MANUFACTURER
from gateway.results.content import MeasuredValue, SeriesReport

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


def build_bundle(reports: Sequence[SeriesReport], *, stat: bool, now: datetime | None = None) -> Bundle:
    """The FHIR transaction for one analysed study (all its analysed series)."""
    if not reports:
        raise ValueError("build_bundle needs at least one analysed series")
    now = now or datetime.now(timezone.utc)
    issued = now.isoformat(timespec="seconds")
    header = reports[0].header
    study_uid = str(header.StudyInstanceUID)
    subject = None
    if str(header.get("PatientID", "")):
        subject = {
            "identifier": {"system": "urn:dicom:patient-id", "value": str(header.PatientID)},
            "type": "Patient",
        }
    entries: list[dict[str, Any]] = []
    devices: dict[tuple[str, str, str], str] = {}
    observation_refs = []
    conclusion_codes: list[dict[str, Any]] = []
    for report in reports:
        a = report.analysis
        key = (a.algorithm_name, a.algorithm_version, a.model_version)
        if key not in devices:
            devices[key] = f"urn:uuid:{uuid.uuid4()}"
            entries.append(
                {
                    "fullUrl": devices[key],
                    "resource": {
                        "resourceType": "Device",
                        "status": "active",
                        "manufacturer": MANUFACTURER,
                        "deviceName": [{"name": a.algorithm_name, "type": "manufacturer-name"}],
                        "version": [
                            {"value": a.algorithm_version},
                            {"type": {"text": "model"}, "value": f"{a.model_name} v{a.model_version}"},
                        ],
                    },
                    "request": {"method": "POST", "url": "Device"},
                }
            )
        for finding in report.findings:
            url = f"urn:uuid:{uuid.uuid4()}"
            observation_refs.append({"reference": url})
            confidence, *others = finding.measurements
            critical = any(v.value == "373066001" for _, v in finding.evaluations)
            resource: dict[str, Any] = {
                "resourceType": "Observation",
                "status": "preliminary",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "imaging",
                            }
                        ]
                    }
                ],
                "code": {"coding": [coding(finding.finding_type)], "text": finding.finding_type.meaning},
                "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{finding.tracking_uid}"}],
                "issued": issued,
                "valueQuantity": quantity(confidence),
                "interpretation": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                "code": "AA" if critical else "A",
                                "display": "Critical abnormal" if critical else "Abnormal",
                            }
                        ]
                    }
                ],
                "component": [
                    {"code": {"coding": [coding(m.name)]}, "valueQuantity": quantity(m)} for m in others
                ],
                "derivedFrom": [
                    _study_ref(study_uid),
                    {
                        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{report.sr_sop_instance_uid}"},
                        "type": "Media",
                    },
                ],
                "device": {"reference": devices[key]},
                "note": [
                    {
                        "text": f"AI result from {a.algorithm_name} {a.algorithm_version}; not verified by a radiologist."
                    }
                ],
            }
            if finding.finding_site is not None:
                resource["bodySite"] = {"coding": [coding(finding.finding_site)]}
            if subject is not None:
                resource["subject"] = subject
            if not others:
                del resource["component"]
            entries.append(
                {"fullUrl": url, "resource": resource, "request": {"method": "POST", "url": "Observation"}}
            )
            if coding(finding.finding_type) not in conclusion_codes:
                conclusion_codes.append(coding(finding.finding_type))
    count = len(observation_refs)
    names = ", ".join(c["display"] for c in conclusion_codes) or "no findings"
    conclusion = f"AI triage ({', '.join(sorted({r.analysis.pipeline_name for r in reports}))}): {count} finding(s): {names}."
    if stat:
        conclusion += " STAT: critical finding flagged for immediate reading."
    report_resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {"coding": [IMAGING_REPORT]},
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{r.sr_sop_instance_uid}"} for r in reports],
        "issued": issued,
        "imagingStudy": [_study_ref(study_uid)],
        "conclusion": conclusion,
    }
    if observation_refs:
        report_resource["result"] = observation_refs
    if conclusion_codes:
        report_resource["conclusionCode"] = [{"coding": [c]} for c in conclusion_codes]
    if subject is not None:
        report_resource["subject"] = subject
    accession = str(header.get("AccessionNumber", ""))
    if accession:
        report_resource["basedOn"] = [
            {
                "identifier": {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                        ]
                    },
                    "value": accession,
                },
                "type": "ServiceRequest",
            }
        ]
    entries.append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": report_resource,
            "request": {"method": "POST", "url": "DiagnosticReport"},
        }
    )
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "timestamp": issued, "entry": entries}
    )
