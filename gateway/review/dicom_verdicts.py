"""Verdicts that arrive over DICOM: what a viewer stores back to the gateway after the radiologist reviewed the
AI's results. Recognised on C-STORE (pynetdicom receiver), recorded before the response, never spooled:

- **An edited presentation state**: a GSPS with the gateway's graphic layer (``AI_FINDINGS``; viewers keep a
  presentation state's layers when it is edited and saved). Each AI finding on its images is matched to the
  state's graphics by overlap: the box kept (IoU >= 0.9) is accepted, moved or resized (IoU >= 0.3) modified
  with the new box, deleted rejected ("other"); a graphic that matches no AI finding is a finding the AI
  missed.
- **An edited SR**: a TID 1500 SR whose Predecessor Documents (or evidence) name the gateway's SR. Each AI
  finding (by Tracking UID) still in it is accepted, or modified where its finding type, long axis or 2D region
  changed; one left out is rejected ("other"); a measurement group with a new Tracking UID is a missed finding.
- **A Key Object Selection with a rejection title** (DCM 113001 "Rejected for Quality Reasons", 113037
  "Rejected for Patient Safety Reasons") naming the gateway's SR: every finding of it is rejected.

The same rules as over HTTP: an object that names a superseded result, or a KOS / AI-layer GSPS that names
no result the gateway reported, is refused (0xC000 with the reason in Error Comment) and nothing is kept. An SR
that names none of the gateway's results is not a verdict: it is stored as any other instance. The reviewer is
recorded pseudonymously (a hash of the Content Creator's / Verifying Observer's name, else the sending AE).
The object itself is kept under ``<data_dir>/verdicts/<study>/`` as the verdict's evidence.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from gateway.core.domain import CodedConcept
from gateway.core.durable import atomic_write
from gateway.core.errors import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    DatabaseError,
    ResultNotReviewable,
    UnknownResultError,
    VerdictRefused,
)
from gateway.core.terminology import finding_key
from gateway.database.verdicts import AiFindingRow, findings_in, findings_on_images
from gateway.results.content import read_measurement_report
from gateway.results.gsps import HEATMAP_LAYER, SCORE_LAYER
from gateway.review.verdicts import Correction, VerdictKind, VerdictRequest, Verdicts

logger = logging.getLogger(__name__)

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
TID1500_SR = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)
REJECTION_TITLES = frozenset({("113001", "DCM"), ("113037", "DCM")})
AI_LAYER = "AI_FINDINGS"
KEEP_IOU, MATCH_IOU = 0.9, 0.3


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _referenced(sequence: Iterable[Any]) -> set[str]:
    """SOP Instance UIDs of a hierarchical SOP instance reference (study -> series -> SOP)."""
    out = set()
    for study in sequence:
        for series in study.get("ReferencedSeriesSequence", []):
            for sop in series.get("ReferencedSOPSequence", []):
                out.add(str(sop.ReferencedSOPInstanceUID))
    return out


def _reviewer(ds: Dataset, calling_ae: str) -> str:
    name = str(ds.get("ContentCreatorName", "") or "")
    if not name and "VerifyingObserverSequence" in ds:
        name = str(ds.VerifyingObserverSequence[0].get("VerifyingObserverName", "") or "")
    if name:  # a person's name: only a stable pseudonym of it is kept
        return f"dicom:{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return f"dicom:{calling_ae}"


def _current(found: list[AiFindingRow], what: str) -> list[AiFindingRow]:
    current = [f for f in found if not f.superseded_by]
    if not current and found:
        raise ResultNotReviewable(
            f"{what} names result {found[0].sr_uid}, superseded by {found[0].superseded_by}"
        )
    if any(f.mode == "silent" for f in current):
        raise ResultNotReviewable(f"{what} names a silent pipeline's result: it was never shown")
    return current


class DicomVerdicts:
    """The receiver's interceptor for verdict objects (``ingest.receiver.handle_store``)."""

    sop_classes = frozenset({GSPS, KOS, *TID1500_SR})

    def __init__(self, verdicts: Verdicts, evidence_dir: Path) -> None:
        self.verdicts = verdicts
        self.evidence_dir = evidence_dir

    def __call__(self, ds: Dataset, calling_ae: str) -> int | Dataset | None:
        """None: not a verdict (store it as usual); else the C-STORE status to answer."""
        sop_class = str(ds.get("SOPClassUID", ""))
        try:
            if sop_class == GSPS:
                requests = self._from_gsps(ds)
            elif sop_class == KOS:
                requests = self._from_kos(ds)
            else:
                requests = self._from_sr(ds)
            if requests is None:
                return None
            self._keep(ds)
            reviewer = _reviewer(ds, calling_ae)
            for request in requests:
                self.verdicts.store(request, reviewer, via="dicom", evidence_uid=str(ds.SOPInstanceUID))
        except VerdictRefused as exc:
            logger.warning(
                "verdict object %s from %s refused: %s", ds.get("SOPInstanceUID", "?"), calling_ae, exc
            )
            return _status(STATUS_CANNOT_UNDERSTAND, str(exc))
        except (DatabaseError, OSError) as exc:
            logger.error(
                "verdict object from %s not recorded now (%s): the sender may retry", calling_ae, exc
            )
            return _status(STATUS_PROCESSING_FAILURE, "the verdict cannot be recorded now; send it again")
        logger.info(
            "verdict object %s from %s: %d verdict(s) recorded", ds.SOPInstanceUID, calling_ae, len(requests)
        )
        return STATUS_SUCCESS

    def _keep(self, ds: Dataset) -> None:
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        folder = self.evidence_dir / str(ds.StudyInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{ds.SOPInstanceUID}.dcm", out.getvalue())

    # -- the three kinds of object ------------------------------------------------------------------------------

    def _from_kos(self, ds: Dataset) -> list[VerdictRequest] | None:
        title = ds.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in ds else None
        if title is None or (str(title.CodeValue), str(title.CodingSchemeDesignator)) not in REJECTION_TITLES:
            return None
        referenced = _referenced(ds.get("CurrentRequestedProcedureEvidenceSequence", []))
        found = [f for uid in sorted(referenced) for f in findings_in(self.verdicts.engine, uid)]
        if not found:
            raise UnknownResultError("the rejection names no AI result the gateway reported")
        return [
            VerdictRequest(
                study_uid=f.study_uid,
                kind=VerdictKind.REJECT,
                sr_uid=f.sr_uid,
                tracking_uid=f.tracking_uid,
                reason="other",
            )
            for f in _current(found, "the rejection")
        ]

    def _from_sr(self, ds: Dataset) -> list[VerdictRequest] | None:
        referenced = _referenced(ds.get("PredecessorDocumentsSequence", [])) | _referenced(
            ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        )
        found = [f for uid in sorted(referenced) for f in findings_in(self.verdicts.engine, uid)]
        if not found:
            return None  # names none of the gateway's results: an ordinary SR
        ours = {f.tracking_uid: f for f in _current(found, "the edited SR")}
        try:
            groups = {g.tracking_uid: g for g in read_measurement_report(ds)}
        except Exception as exc:
            raise VerdictRefused(f"the edited SR cannot be read as a TID 1500 report: {exc}") from None
        study = next(iter(ours.values())).study_uid
        requests = []
        for tracking, finding in ours.items():
            group = groups.get(tracking)
            if group is None:
                requests.append(_on(finding, VerdictKind.REJECT, reason="other"))
                continue
            correction = _sr_correction(finding, group)
            if correction is None:
                requests.append(_on(finding, VerdictKind.ACCEPT))
            else:
                requests.append(_on(finding, VerdictKind.MODIFY, correction=correction))
        for tracking, group in groups.items():
            if tracking in ours:
                continue
            key = finding_key(group.finding_type)
            if key is None or group.source_sop_instance_uid is None:
                continue  # a finding type the gateway has no key for, or no image: not recordable as missed
            box = _box(group.region.points) if group.region is not None and not group.region.is_3d else None
            requests.append(
                VerdictRequest(
                    study_uid=study,
                    kind=VerdictKind.MISSED,
                    correction=Correction(finding_type=key, image_uid=group.source_sop_instance_uid, box=box),
                )
            )
        return requests

    def _from_gsps(self, ds: Dataset) -> list[VerdictRequest] | None:
        layers = {str(item.GraphicLayer) for item in ds.get("GraphicLayerSequence", [])}
        if AI_LAYER not in layers:
            return None  # a presentation state of the radiologist's own, not an edited AI result
        boxes: dict[str, list[tuple[float, float, float, float]]] = {}
        for annotation in ds.get("GraphicAnnotationSequence", []):
            if str(annotation.get("GraphicLayer", "")) in (HEATMAP_LAYER, SCORE_LAYER):
                continue  # the AI's heat map outline and score: not findings
            images = [str(r.ReferencedSOPInstanceUID) for r in annotation.get("ReferencedImageSequence", [])]
            for graphic in annotation.get("GraphicObjectSequence", []):
                if str(graphic.get("GraphicAnnotationUnits", "PIXEL")) != "PIXEL":
                    continue
                points = [float(v) for v in graphic.GraphicData]
                box = _box(list(zip(points[0::2], points[1::2], strict=False)))
                if box is not None:
                    for image in images:
                        boxes.setdefault(image, []).append(box)
        referenced = sorted(
            {
                str(r.ReferencedSOPInstanceUID)
                for s in ds.get("ReferencedSeriesSequence", [])
                for r in s.get("ReferencedImageSequence", [])
            }
            | set(boxes)
        )
        found = findings_on_images(self.verdicts.engine, referenced)
        if not found:
            raise UnknownResultError("the presentation state's AI layer names images with no AI finding")
        current = _current(found, "the presentation state")
        # One graphic answers for one finding: the pairs are matched greedily, the largest overlap first.
        pairs = sorted(
            (
                (_iou(tuple(f.box), box), f.tracking_uid, (f.image_uid, box))
                for f in current
                if f.box is not None
                for box in boxes.get(f.image_uid, [])
            ),
            reverse=True,
        )
        assigned: dict[str, tuple[tuple[float, float, float, float], float]] = {}
        matched: set[tuple[str, tuple[float, float, float, float]]] = set()
        for overlap, tracking, graphic in pairs:
            if overlap < MATCH_IOU or tracking in assigned or graphic in matched:
                continue
            assigned[tracking] = (graphic[1], overlap)
            matched.add(graphic)
        requests = []
        for finding in current:
            if finding.box is None:
                continue  # an image-level finding: a presentation state cannot say anything about it
            if finding.tracking_uid not in assigned:
                requests.append(_on(finding, VerdictKind.REJECT, reason="other"))
                continue
            best, overlap = assigned[finding.tracking_uid]
            if overlap >= KEEP_IOU:
                requests.append(_on(finding, VerdictKind.ACCEPT))
            else:
                correction = Correction(image_uid=finding.image_uid, box=best)
                requests.append(_on(finding, VerdictKind.MODIFY, correction=correction))
        key = finding_key_of(current)
        for image, image_boxes in boxes.items():
            for box in image_boxes:
                if (image, box) in matched or key is None:
                    continue
                requests.append(
                    VerdictRequest(
                        study_uid=current[0].study_uid,
                        kind=VerdictKind.MISSED,
                        correction=Correction(finding_type=key, image_uid=image, box=box),
                    )
                )
        return requests


def finding_key_of(findings: list[AiFindingRow]) -> str | None:
    """The finding type a drawn-in finding is taken to be: the AI findings' type on these images."""
    for f in findings:
        key = finding_key(
            CodedConcept(value=f.finding_code, scheme=f.finding_scheme, meaning=f.finding_meaning)
        )
        if key is not None:
            return key
    return None


def _on(
    finding: AiFindingRow, kind: VerdictKind, *, reason: str = "", correction: Correction | None = None
) -> VerdictRequest:
    return VerdictRequest(
        study_uid=finding.study_uid,
        kind=kind,
        sr_uid=finding.sr_uid,
        tracking_uid=finding.tracking_uid,
        reason=reason,
        correction=correction,
    )


def _box(points: Iterable[tuple[float, ...]]) -> tuple[float, float, float, float] | None:
    pts = [(float(p[0]), float(p[1])) for p in points]
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    box = (min(xs), min(ys), max(xs), max(ys))
    return box if box[2] > box[0] and box[3] > box[1] else None


def _sr_correction(finding: AiFindingRow, group: Any) -> Correction | None:
    """What the radiologist changed in an AI finding of the edited SR (None: nothing, an acceptance)."""
    changes: dict[str, Any] = {}
    key = finding_key(group.finding_type)
    retyped = (group.finding_type.value, group.finding_type.scheme) != (
        finding.finding_code,
        finding.finding_scheme,
    )
    if retyped and key is not None:
        changes["finding_type"] = key
    if group.region is not None and not group.region.is_3d and finding.box is not None:
        box = _box(group.region.points)
        if box is not None and _iou(box, tuple(finding.box)) < KEEP_IOU:
            changes["box"], changes["image_uid"] = box, finding.image_uid
    return Correction(**changes) if changes else None


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
