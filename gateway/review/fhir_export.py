"""Verdicts as FHIR R4 Observations (IHE AI Results Assessment in spirit): one per verdict, ``derivedFrom``
the AI finding's Observation (by its Tracking UID, the identifier the gateway's results Bundle gives it) and the
SR, with the reviewer as a pseudonymous identifier and the model version as a component. Validated with the
``fhir.resources`` models before it leaves.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from gateway.database.verdicts import VerdictRow
from gateway.reporting.fhir import DICOM_UID, PRIVATE_SYSTEM

ASSESSMENT_SYSTEM = f"{PRIVATE_SYSTEM}:assessment"
VERDICT_ID_SYSTEM = "urn:dicom-ai-gateway:verdict"
REVIEWER_SYSTEM = "urn:dicom-ai-gateway:user"  # the identity provider's subject: pseudonymous, never a name
KIND_DISPLAY = {
    "accept": "AI finding accepted",
    "reject": "AI finding rejected",
    "modify": "AI finding modified",
    "missed": "Finding missed by the AI",
}


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat(timespec="seconds")


def _component(code: str, display: str, **value: Any) -> dict[str, Any]:
    return {"code": {"coding": [{"system": ASSESSMENT_SYSTEM, "code": code, "display": display}]}, **value}


def verdict_observation(verdict: VerdictRow) -> dict[str, Any]:
    derived: list[dict[str, Any]] = [
        {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{verdict.study_uid}"}}
    ]
    if verdict.sr_uid:
        derived = [
            {
                "type": "Observation",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{verdict.tracking_uid}"},
            },
            {"type": "Media", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{verdict.sr_uid}"}},
            *derived,
        ]
    components = []
    if verdict.model_name:
        components.append(
            _component(
                "model",
                "AI model (name, version, SHA-256)",
                valueString=f"{verdict.model_name} {verdict.model_version} {verdict.model_hash}".strip(),
            )
        )
    correction = verdict.correction or {}
    if "finding_type" in correction:
        components.append(
            _component("finding-type", "Corrected finding type", valueString=correction["finding_type"])
        )
    if "box" in correction:
        box = ", ".join(f"{v:g}" for v in correction["box"])
        image = correction.get("image_uid", "")
        components.append(
            _component(
                "box", "Corrected region (x0, y0, x1, y1 pixels)", valueString=f"{box} {image}".strip()
            )
        )
    if "long_axis_mm" in correction:
        components.append(
            _component(
                "long-axis",
                "Corrected long axis",
                valueQuantity={
                    "value": correction["long_axis_mm"],
                    "unit": "mm",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm",
                },
            )
        )
    if verdict.seconds_to_verdict is not None:
        components.append(
            _component(
                "time-to-verdict",
                "Time from result delivery to verdict",
                valueQuantity={
                    "value": verdict.seconds_to_verdict,
                    "unit": "s",
                    "system": "http://unitsofmeasure.org",
                    "code": "s",
                },
            )
        )
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": VERDICT_ID_SYSTEM, "value": str(verdict.id)}],
        "status": "final" if verdict.current else "amended",
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
        "code": {
            "coding": [
                {
                    "system": ASSESSMENT_SYSTEM,
                    "code": "ai-result-assessment",
                    "display": "AI result assessment",
                }
            ],
            "text": "Radiologist's assessment of an AI result",
        },
        "effectiveDateTime": _iso(verdict.at),
        "issued": _iso(verdict.at),
        "performer": [
            {"type": "Practitioner", "identifier": {"system": REVIEWER_SYSTEM, "value": verdict.reviewer}}
        ],
        "valueCodeableConcept": {
            "coding": [
                {"system": ASSESSMENT_SYSTEM, "code": verdict.kind, "display": KIND_DISPLAY[verdict.kind]}
            ],
            **({"text": verdict.reason} if verdict.reason else {}),
        },
        "derivedFrom": derived,
    }
    if components:
        resource["component"] = components
    return resource


def verdicts_bundle(verdicts: Sequence[VerdictRow]) -> dict[str, Any]:
    """A collection Bundle of the verdicts' Observations (validated; as JSON)."""
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, f'{v.study_uid}.verdict.{v.id}')}",
                    "resource": verdict_observation(v),
                }
                for v in verdicts
            ],
        }
    )
    return dict(bundle.model_dump(mode="json", exclude_none=True))
