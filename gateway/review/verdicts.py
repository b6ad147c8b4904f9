"""Radiologists' verdicts on AI findings: accept, reject (with a reason from the site's list), modify (a
corrected box, type or size), or a finding the AI missed.

Every verdict is tied to an AI result the gateway reported and that is still current: the SR's SOP Instance
UID and the finding's Tracking UID must name a finding of the system of record (404 otherwise), a result that a
newer analysis superseded or a silent pipeline's result (never shown to anyone) is refused (409), and nothing is
stored for a refused verdict. The verdict keeps the model name, version and hash, the reviewer (a pseudonymous
user id, never a name) and the time from the result's delivery. A second verdict on a finding amends the first,
which stays as history. The same rules hold for verdicts arriving over HTTP and over DICOM
(``gateway.review.dicom_verdicts``).
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import Engine

from gateway.config.pipeline import PipelineSettings
from gateway.config.settings import ReviewSettings
from gateway.core.domain import RolloutMode
from gateway.core.errors import ConfigError, ResultNotReviewable, UnknownResultError, VerdictRefused
from gateway.core.terminology import finding_type
from gateway.database.verdicts import (
    AiFindingRow,
    NewVerdict,
    VerdictRow,
    findings_of,
    insert_verdict,
    verdicts_of,
)
from gateway.review.fhir_export import verdicts_bundle

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class VerdictKind(str, enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    MODIFY = "modify"
    MISSED = "missed"  # a finding the radiologist adds: the AI missed it


@dataclass(frozen=True, kw_only=True)
class Correction:
    """What the radiologist says instead (modify) or in addition (missed)."""

    finding_type: str | None = None  # a key of the terminology table ("hemorrhage")
    image_uid: str | None = None
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in the image's pixels
    long_axis_mm: float | None = None

    def __post_init__(self) -> None:
        if self.finding_type is not None:
            try:
                finding_type(self.finding_type)
            except ConfigError as exc:
                raise VerdictRefused(f"correction.finding_type: {exc}") from None
        if self.image_uid is not None and not _UID.match(self.image_uid):
            raise VerdictRefused(f"correction.image_uid is not a DICOM UID: {self.image_uid!r}")
        if self.box is not None:
            if len(self.box) != 4 or not all(math.isfinite(v) for v in self.box):
                raise VerdictRefused("correction.box must be four finite numbers: x0, y0, x1, y1")
            x0, y0, x1, y1 = self.box
            if x1 <= x0 or y1 <= y0:
                raise VerdictRefused(f"correction.box must have x0 < x1 and y0 < y1, got {list(self.box)}")
        if self.long_axis_mm is not None and not (math.isfinite(self.long_axis_mm) and self.long_axis_mm > 0):
            raise VerdictRefused("correction.long_axis_mm must be a positive number")

    @property
    def empty(self) -> bool:
        return self.finding_type is None and self.box is None and self.long_axis_mm is None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("finding_type", "image_uid", "long_axis_mm"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.box is not None:
            out["box"] = list(self.box)
        return out


@dataclass(frozen=True, kw_only=True)
class VerdictRequest:
    """A verdict as asked for, before it is checked against the system of record."""

    study_uid: str
    kind: VerdictKind
    sr_uid: str = ""
    tracking_uid: str = ""
    reason: str = ""
    correction: Correction | None = None

    @classmethod
    def from_json(cls, study_uid: str, body: Mapping[str, Any]) -> VerdictRequest:
        try:
            kind = VerdictKind(str(body.get("kind", "")))
        except ValueError:
            raise VerdictRefused(
                f"kind must be one of {', '.join(k.value for k in VerdictKind)}, got {body.get('kind')!r}"
            ) from None
        raw = body.get("correction")
        correction = None
        if raw:
            box = raw.get("box")
            correction = Correction(
                finding_type=raw.get("finding_type"),
                image_uid=raw.get("image_uid"),
                box=tuple(float(v) for v in box) if box is not None else None,  # type: ignore[arg-type]
                long_axis_mm=float(raw["long_axis_mm"]) if raw.get("long_axis_mm") is not None else None,
            )
        return cls(
            study_uid=study_uid,
            kind=kind,
            sr_uid=str(body.get("sr_uid") or ""),
            tracking_uid=str(body.get("tracking_uid") or ""),
            reason=str(body.get("reason") or ""),
            correction=correction,
        )


class Verdicts:
    """Verdicts recorded against the system of record (HTTP and DICOM alike)."""

    def __init__(
        self,
        engine: Engine,
        settings: ReviewSettings,
        node: str,
        pipelines: Mapping[str, PipelineSettings] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.node = node
        self.reasons = {r.lower(): r for r in settings.reject_reasons}
        self.pipelines = dict(pipelines or {})

    def shown(self, finding: AiFindingRow, groups: frozenset[str] | None) -> bool:
        """Is ``finding`` shown to a user of ``groups`` (None: a role that sees every finding)?"""
        pipeline = self.pipelines.get(finding.pipeline)
        return groups is None or pipeline is None or pipeline.shown_to(groups)

    def findings(self, study_uid: str, groups: frozenset[str] | None = None) -> list[dict[str, Any]]:
        """The study's AI findings with their current verdict (none yet: null); a pilot's findings only for
        users of its groups."""
        current = {v.tracking_uid: v for v in verdicts_of(self.engine, study_uid) if v.current}
        out = []
        for f in findings_of(self.engine, study_uid):
            if not self.shown(f, groups):
                continue
            item = f.as_json()
            verdict = current.get(f.tracking_uid)
            item["verdict"] = verdict.as_json() if verdict is not None else None
            out.append(item)
        return out

    def history(self, study_uid: str) -> list[dict[str, Any]]:
        return [v.as_json() for v in verdicts_of(self.engine, study_uid)]

    def fhir(self, study_uid: str) -> dict[str, Any]:
        """The study's verdicts (amended ones too, marked so) as a FHIR Bundle."""
        return verdicts_bundle(verdicts_of(self.engine, study_uid))

    def record(
        self, study_uid: str, body: Mapping[str, Any], reviewer: str, groups: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """An HTTP verdict (JSON body) as the signed-in ``reviewer`` of ``groups``."""
        return self.store(VerdictRequest.from_json(study_uid, body), reviewer, groups=groups).as_json()

    def store(
        self,
        request: VerdictRequest,
        reviewer: str,
        *,
        via: str = "http",
        evidence_uid: str = "",
        groups: frozenset[str] | None = None,
    ) -> VerdictRow:
        """Check ``request`` and store it as its finding's current verdict; VerdictRefused and nothing stored
        when it names no current, shown AI finding or says something malformed."""
        self._validate(request)
        tracking = request.tracking_uid or str(generate_uid())  # a missed finding gets its own
        return insert_verdict(
            self.engine,
            NewVerdict(
                tracking_uid=tracking,
                sr_uid=request.sr_uid,
                study_uid=request.study_uid,
                kind=request.kind.value,
                reason=self.reasons.get(request.reason.lower(), request.reason),
                correction=request.correction.as_json() if request.correction else None,
                reviewer=reviewer[:128],
                via=via,
                evidence_uid=evidence_uid,
                at=time.time(),
            ),
            self.node,
            lambda found: self._reviewable(request, found, groups),
        )

    def _reviewable(
        self, request: VerdictRequest, found: AiFindingRow | None, groups: frozenset[str] | None
    ) -> None:
        _reviewable(request, found)
        if found is not None and not self.shown(found, groups):
            raise ResultNotReviewable(f"result {found.sr_uid} is a pilot's, not shown to this user's groups")

    def _validate(self, request: VerdictRequest) -> None:
        if not _UID.match(request.study_uid):
            raise VerdictRefused(f"not a Study Instance UID: {request.study_uid!r}")
        if request.kind is VerdictKind.MISSED:
            c = request.correction
            if request.sr_uid or request.tracking_uid:
                raise VerdictRefused("a missed finding names no AI result (no sr_uid, no tracking_uid)")
            if c is None or c.finding_type is None or c.image_uid is None:
                raise VerdictRefused(
                    "a missed finding needs correction.finding_type and correction.image_uid"
                )
            return
        for name in ("sr_uid", "tracking_uid"):
            if not _UID.match(getattr(request, name)):
                raise VerdictRefused(f"{name} must be the AI result's UID, got {getattr(request, name)!r}")
        if request.kind is VerdictKind.REJECT and request.reason.lower() not in self.reasons:
            raise VerdictRefused(
                f"a rejection needs a reason, one of: {', '.join(self.settings.reject_reasons)} "
                f"(got {request.reason!r}; [review] reject_reasons)"
            )
        if request.kind is VerdictKind.MODIFY and (request.correction is None or request.correction.empty):
            raise VerdictRefused("a modification needs a correction: box, finding_type and/or long_axis_mm")
        if request.kind is VerdictKind.ACCEPT and request.correction is not None:
            raise VerdictRefused("an acceptance takes no correction (use kind modify)")


def _reviewable(request: VerdictRequest, found: AiFindingRow | None) -> None:
    """Under the finding's row lock: the verdict must name a current, shown finding of this study."""
    if request.kind is VerdictKind.MISSED:
        return
    if found is None or found.sr_uid != request.sr_uid or found.study_uid != request.study_uid:
        raise UnknownResultError(
            f"no AI finding {request.tracking_uid} in result {request.sr_uid} of study {request.study_uid}"
        )
    if found.superseded_by:
        raise ResultNotReviewable(
            f"result {found.sr_uid} was superseded by {found.superseded_by}: review the current result"
        )
    if found.mode == RolloutMode.SILENT.value:
        raise ResultNotReviewable(
            f"result {found.sr_uid} is of the silent pipeline {found.pipeline}: it was never shown"
        )
