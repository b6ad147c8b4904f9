"""HTTP routes of the radiologist in the loop: a study's AI findings, verdicts on them, and their FHIR export.

Only roles that may see AI results (radiologist, QA; admin acts as QA) read findings and verdicts; only a
radiologist records a verdict, as the signed-in user (an OpenID Connect subject) or the service token's name.
A verdict that names no current, shown AI result is refused with 404 / 409 and nothing is stored.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at run time.
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway.config.settings import TokenRole
from gateway.core.errors import VerdictRefused
from gateway.ops.api_errors import Error
from gateway.ops.identity import RESULT_READERS, Principal

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
Uid = Annotated[str, Field(pattern=UID_PATTERN, max_length=64)]


class ReviewApi(Protocol):
    """The review side as the API sees it (review.service.Review)."""

    def findings(
        self, study_uid: str, viewer: str | None = None, groups: frozenset[str] | None = None
    ) -> list[dict[str, Any]]: ...

    def record(
        self, study_uid: str, body: dict[str, Any], reviewer: str, groups: frozenset[str] | None = None
    ) -> dict[str, Any]: ...

    def history(self, study_uid: str) -> list[dict[str, Any]]: ...

    def fhir(self, study_uid: str) -> dict[str, Any]: ...

    def comparisons(self, study_uid: str) -> list[dict[str, Any]]: ...

    def pipelines(self) -> dict[str, Any]: ...

    def statistics(self) -> list[dict[str, Any]]: ...

    def discrepancies(self, state: str | None) -> list[dict[str, Any]]: ...

    def assign(self, item: int, to: str, by: str) -> dict[str, Any] | None: ...

    def close(self, item: int, note: str, by: str) -> dict[str, Any] | None: ...


class AssignIn(BaseModel):
    to: str = Field(min_length=1, max_length=128, description="the peer reviewer's user id")


class CloseIn(BaseModel):
    note: str = Field(default="", max_length=200, description="the peer review's outcome, in a few words")


class CorrectionIn(BaseModel):
    finding_type: str | None = Field(default=None, description="a finding type key, e.g. hemorrhage")
    image_uid: Uid | None = Field(default=None, description="SOP Instance UID of the image")
    box: list[float] | None = Field(
        default=None, min_length=4, max_length=4, description="x0, y0, x1, y1 (pixels)"
    )
    long_axis_mm: float | None = Field(default=None, gt=0)


class VerdictIn(BaseModel):
    kind: Literal["accept", "reject", "modify", "missed"]
    sr_uid: Uid | None = Field(default=None, description="the AI result (SR SOP Instance UID)")
    tracking_uid: Uid | None = Field(default=None, description="the finding's Tracking UID in that SR")
    reason: str | None = Field(
        default=None, max_length=64, description="reject: one of [review] reject_reasons"
    )
    correction: CorrectionIn | None = None


_REFUSED: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "the body is not JSON"},
    401: {"model": Error, "description": "missing or invalid bearer token"},
    403: {"model": Error, "description": "the role may not do this"},
    404: {"model": Error, "description": "no such AI result or finding in this study"},
    409: {"model": Error, "description": "the result was superseded, or is silent (never shown)"},
    422: {
        "model": Error,
        "description": "the verdict is malformed (reason not on the list, no correction ...)",
    },
}

StudyUid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64)]


def _pilot_groups(principal: Principal) -> frozenset[str] | None:
    """The groups that decide which pilots' findings a radiologist sees (QA and admin see every finding)."""
    return None if principal.may(TokenRole.QA) else principal.groups


def review_routes(app: FastAPI, review: ReviewApi, needs: Callable[..., Callable[..., Principal]]) -> None:
    readers = needs(*RESULT_READERS)

    @app.get(
        "/studies/{study_uid}/findings",
        summary="The study's AI findings, each with its current verdict",
        responses=_REFUSED,
        tags=["review"],
    )
    def findings(
        principal: Annotated[Principal, Depends(readers)], study_uid: StudyUid
    ) -> list[dict[str, Any]]:
        # A radiologist opening the findings is what makes a later report "AI-assisted".
        return review.findings(
            study_uid,
            principal.name if principal.may(TokenRole.RADIOLOGIST) else None,
            _pilot_groups(principal),
        )

    @app.get(
        "/studies/{study_uid}/comparisons",
        summary="The study's AI-vs-final-report comparisons, per pipeline and finding type",
        responses=_REFUSED,
        tags=["review"],
    )
    def study_comparisons(
        _: Annotated[Principal, Depends(readers)], study_uid: StudyUid
    ) -> list[dict[str, Any]]:
        return review.comparisons(study_uid)

    qa = needs(TokenRole.QA)

    @app.get(
        "/models/statistics",
        summary="Per model version and site: volumes, positive rate, score histogram, acceptance, time to verdict, "
        "sensitivity and PPV against the reports, PSI, CUSUM and drift alarms",
        responses=_REFUSED,
        tags=["review"],
    )
    def statistics(_: Annotated[Principal, Depends(qa)]) -> list[dict[str, Any]]:
        return review.statistics()

    @app.get(
        "/admin/pipelines",
        summary="Every pipeline's model, rollout mode, pilot and thresholds, and each audited change of them",
        responses=_REFUSED,
        tags=["admin"],
    )
    def pipelines(_: Annotated[Principal, Depends(needs(TokenRole.ADMIN))]) -> dict[str, Any]:
        return review.pipelines()

    @app.get(
        "/qa/discrepancies",
        summary="Discordant AI-vs-report cases for peer review (newest first)",
        responses=_REFUSED,
        tags=["qa"],
    )
    def discrepancies(
        _: Annotated[Principal, Depends(qa)],
        state: Annotated[Literal["open", "assigned", "closed"] | None, Query()] = None,
    ) -> list[dict[str, Any]]:
        return review.discrepancies(state)

    @app.post(
        "/qa/discrepancies/{item}/assign",
        summary="Assign a discrepancy for peer review",
        responses=_REFUSED,
        tags=["qa"],
    )
    def assign(
        principal: Annotated[Principal, Depends(qa)], item: Annotated[int, Path(ge=1)], body: AssignIn
    ) -> Any:
        found = review.assign(item, body.to, principal.name)
        return found if found is not None else JSONResponse({"error": "no such open item"}, status_code=404)

    @app.post(
        "/qa/discrepancies/{item}/close",
        summary="Close a discrepancy after peer review",
        responses=_REFUSED,
        tags=["qa"],
    )
    def close(
        principal: Annotated[Principal, Depends(qa)], item: Annotated[int, Path(ge=1)], body: CloseIn
    ) -> Any:
        found = review.close(item, body.note, principal.name)
        return found if found is not None else JSONResponse({"error": "no such open item"}, status_code=404)

    @app.get(
        "/studies/{study_uid}/verdicts",
        summary="Every verdict on the study's AI findings, amendments included (oldest first)",
        responses=_REFUSED,
        tags=["review"],
    )
    def history(_: Annotated[Principal, Depends(readers)], study_uid: StudyUid) -> list[dict[str, Any]]:
        return review.history(study_uid)

    @app.get(
        "/studies/{study_uid}/verdicts/fhir",
        summary="The study's current verdicts as a FHIR R4 Bundle of Observations derived from the AI results",
        responses=_REFUSED,
        tags=["review"],
    )
    def fhir(_: Annotated[Principal, Depends(readers)], study_uid: StudyUid) -> dict[str, Any]:
        return review.fhir(study_uid)

    @app.post(
        "/studies/{study_uid}/verdicts",
        status_code=201,
        summary="Record a radiologist's verdict on an AI finding (or a finding the AI missed)",
        responses=_REFUSED,
        tags=["review"],
    )
    async def record(
        principal: Annotated[Principal, Depends(needs(TokenRole.RADIOLOGIST))],
        study_uid: StudyUid,
        body: VerdictIn,
    ) -> Any:
        try:
            return await run_in_threadpool(
                review.record,
                study_uid,
                body.model_dump(exclude_none=True),
                principal.name,
                _pilot_groups(principal),
            )
        except VerdictRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
