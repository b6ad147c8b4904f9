"""HTTP endpoints on the gateway's event loop (FastAPI on uvicorn): ``/health`` and ``/metrics`` (read freely on
loopback), ``/admin/*`` (bearer tokens with roles), DICOMweb STOW-RS (``POST /studies``) and the OpenAPI document
at ``/openapi.json``; HTTPS (optionally mutual) when ``[http] tls_cert_file`` is set.

Who may do what is ``identity.ACTS_AS`` (service tokens and OpenID Connect users alike): ``GET
/admin/dead-letters`` needs read-only, ``POST /admin/resend`` operator; AI findings and verdicts (``review_api``)
radiologist or QA. The sender role may only store instances (STOW-RS); admin may too. Tokens are configured by SHA-256 digest only and compared in constant time. Errors are JSON
``{"error": "..."}``. Handlers that block (health reads disk statistics, the dead-letter area is files) are plain
functions, which FastAPI runs in its worker threads, so the loop never waits on them.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at run time, and the
# token dependencies are local to build_app.
import asyncio
import concurrent.futures
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from gateway.config.settings import HttpSettings, TokenRole
from gateway.core.errors import ConfigError, DatabaseError
from gateway.database.queries import StudyFilter
from gateway.ingest.stow import RESPONSE_MEDIA_TYPE, StowRequest, StowRequestError
from gateway.ops.api_errors import Error
from gateway.ops.dashboard import dashboard_routes
from gateway.ops.identity import AuthenticationError, Authenticator, Principal, hash_token
from gateway.ops.review_api import ReviewApi, review_routes

logger = logging.getLogger(__name__)

__all__ = ["ApiBackend", "HttpApi", "build_app", "hash_token"]
MAX_BODY_BYTES = 1 << 20
STOW_FEED_BYTES = 4 << 20  # a STOW-RS body is handed to the storing thread in pieces of about this size
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class CriticalApi(Protocol):
    """The critical-results loop as the API sees it (reporting.critical_alerts.CriticalAlerts)."""

    def acknowledge(self, study_uid: str, by: str) -> dict[str, Any] | None: ...

    def acknowledge_link(
        self, study_uid: str, level: int, expires: int, signature: str
    ) -> dict[str, Any]: ...

    def status(self, study_uid: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, kw_only=True)
class ApiBackend:
    """What the API exposes, as plain callables (the API never reaches into the engine)."""

    health: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]
    dead_letters: Callable[[], list[dict[str, Any]]]
    resend: Callable[[list[str] | None], list[str]]
    studies: Callable[[StudyFilter], list[dict[str, Any]]]
    study: Callable[[str], dict[str, Any] | None]
    # The dashboard's worklist: the studies, each with the pipelines that analysed it and their rollout mode.
    worklist: Callable[[StudyFilter], list[dict[str, Any]]] | None = None
    critical: CriticalApi | None = None  # None: [critical_results] is off
    # STOW-RS: (content type, source AE title, study UID of the path or None) -> a request to feed the body to.
    stow: Callable[[str, str, str | None], StowRequest] | None = None
    review: ReviewApi | None = None  # verdicts on AI findings (None: no system of record to keep them)
    # The dashboard's study view: where the spool keeps an image, and a pipeline's display window.
    image_path: Callable[[str, str], str | None] | None = None
    window_of: Callable[[str], tuple[float, float] | None] | None = None
    mask_of: Callable[[str, str], Any] | None = None  # (study, image) -> the AI's segmentation of it, or None


StateName = Literal[
    "receiving", "complete", "queued", "analysing", "results_stored", "delivered", "failed", "skipped"
]
PriorityName = Literal["STAT", "URGENT", "ROUTINE"]


class Health(BaseModel):
    """The gateway's state; studies are accepted in either status."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded"]
    reasons: list[str] = Field(description="why the gateway is degraded (empty when ok)")


class ResendRequest(BaseModel):
    jobs: list[str] | None = Field(
        default=None, description="ids of the dead-letter jobs to resend; absent or null: all of them"
    )


class ResendResult(BaseModel):
    resent: list[str] = Field(description="ids of the jobs moved back to their delivery queue")


_UNAUTHORISED: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "missing or unknown bearer token"},
    403: {"model": Error, "description": "the token's role may not do this"},
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(settings: HttpSettings, backend: ApiBackend) -> FastAPI:
    """The ASGI application: routes, token roles, error shape and the body size limit."""
    app = FastAPI(
        title="DICOM AI gateway",
        summary="Health, Prometheus metrics and delivery administration of the gateway.",
        version="1",
        docs_url=None,  # Swagger UI loads its scripts from a CDN; hospital networks are often offline
        redoc_url=None,
    )
    needs = _token_roles(settings)
    _errors_and_limits(app)
    _operations(app, backend, needs)
    _studies(app, backend, needs)
    _critical_results(app, backend, needs)
    _stow(app, settings, backend, needs)
    if backend.review is not None:
        review_routes(app, backend.review, needs)
    dashboard_routes(
        app,
        settings,
        backend.worklist or backend.studies,
        needs,
        backend.image_path,
        backend.window_of,
        backend.mask_of,
    )
    return app


Needs = Callable[..., Callable[..., Principal]]


def _token_roles(settings: HttpSettings) -> Needs:
    """``needs(*roles)``: a dependency that admits a principal acting as one of ``roles`` (identity.ACTS_AS)."""
    bearer = HTTPBearer(
        auto_error=False,
        description="a service token made by `gateway token --role ROLE`, or an OpenID Connect token (JWT)",
    )
    authenticator = Authenticator(settings)

    def needs(*roles: TokenRole) -> Callable[..., Principal]:
        def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
            try:
                found = authenticator.principal(credentials.credentials if credentials is not None else None)
            except AuthenticationError as exc:
                raise HTTPException(401, str(exc), {"WWW-Authenticate": "Bearer"}) from None
            if not found.may(*roles):
                held = ", ".join(sorted(r.value for r in found.roles)) or "no role"
                needed = " or ".join(r.value for r in roles)
                raise HTTPException(403, f"{held} may not do this; {needed} is needed")
            return found

        return check

    return needs


def _errors_and_limits(app: FastAPI) -> None:
    """Every error as ``{"error": ...}``; bodies over MAX_BODY_BYTES refused."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path (one route each: GET and POST /studies)
            allowed = {
                method
                for route in app.router.routes
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        return _error(exc.status_code, message, headers)

    @app.exception_handler(DatabaseError)
    async def database_down(request: Request, exc: DatabaseError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, problems or "invalid request")

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "POST" and (
            path == "/studies" or (path.startswith("/studies/") and path.count("/") == 2)
        ):
            return await call_next(request)  # STOW-RS: its own limit, counted as the body streams in
        length = request.headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)


def _operations(app: FastAPI, backend: ApiBackend, needs: Needs) -> None:
    """Health, metrics and the delivery administration."""

    @app.get(
        "/health",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "degraded: see reasons (studies are still accepted)"}
        },
        summary="Gateway status and the reasons when degraded",
    )
    def health() -> JSONResponse:
        report = backend.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics (text exposition format)",
    )
    def metrics() -> Response:
        return Response(backend.metrics(), media_type="text/plain; version=0.0.4")

    @app.get(
        "/admin/dead-letters",
        response_model=list[dict[str, Any]],
        responses=_UNAUTHORISED,
        summary="Deliveries that ran out of attempts (read-only role)",
    )
    def dead_letters(_: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))]) -> list[dict[str, Any]]:
        return backend.dead_letters()

    @app.post(
        "/admin/resend",
        response_model=ResendResult,
        responses={**_UNAUTHORISED, 400: {"model": Error, "description": "the body is not a resend request"}},
        summary="Move dead-letter deliveries back to their queue (operator role)",
    )
    def resend(
        _: Annotated[Principal, Depends(needs(TokenRole.OPERATOR))], body: ResendRequest | None = None
    ) -> ResendResult:
        return ResendResult(resent=backend.resend(body.jobs if body is not None else None))


def _studies(app: FastAPI, backend: ApiBackend, needs: Needs) -> None:
    """The system of record: studies and their timelines."""

    @app.get(
        "/studies",
        response_model=list[dict[str, Any]],
        responses={
            **_UNAUTHORISED,
            400: {"model": Error, "description": "a filter is not valid"},
            503: {"model": Error, "description": "the system of record cannot be read now"},
        },
        summary="Studies from the system of record, STAT first then newest (read-only role)",
    )
    def studies(
        _: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))],
        state: Annotated[StateName | None, Query(description="the study's state")] = None,
        priority: Annotated[PriorityName | None, Query(description="STAT, URGENT or ROUTINE")] = None,
        pacs: Annotated[str | None, Query(max_length=16, description="the sending PACS's AE title")] = None,
        since: Annotated[float | None, Query(ge=0, description="first received at or after (Unix s)")] = None,
        until: Annotated[float | None, Query(ge=0, description="first received before (Unix s)")] = None,
        waited_more_than_s: Annotated[
            float | None, Query(ge=0, description="from complete until analysis started")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[dict[str, Any]]:
        return backend.studies(
            StudyFilter(
                state=state,
                priority=priority,
                pacs=pacs,
                since=since,
                until=until,
                waited_more_than_s=waited_more_than_s,
                limit=limit,
            )
        )

    @app.get(
        "/studies/{study_uid}",
        response_model=dict[str, Any],
        responses={
            **_UNAUTHORISED,
            400: {"model": Error, "description": "not a Study Instance UID"},
            404: {"model": Error, "description": "no such study"},
            503: {"model": Error, "description": "the system of record cannot be read now"},
        },
        summary="One study's timeline: every stage with its time, node and outcome (read-only role)",
    )
    def study(
        _: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))],
        study_uid: Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")],
    ) -> dict[str, Any]:
        found = backend.study(study_uid)
        if found is None:
            raise HTTPException(404, f"study {study_uid} is not in the system of record")
        return found


StudyUid = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")]
LinkStudy = Annotated[str, Query(max_length=64, pattern=r"^[0-9.]+$")]
LinkLevel = Annotated[int, Query(ge=1, le=9)]
LinkExpires = Annotated[int, Query(ge=0)]
LinkSignature = Annotated[str, Query(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")]
_LINK_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font: 18px/1.5 system-ui, sans-serif; max-width: 40em; margin: 2em auto; color: #111">
<h1>{title}</h1><p>{text}</p>{form}</body></html>"""


_HTML = {"text/html": {"schema": {"type": "string"}}}
_LINK_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "a parameter of the link is missing or not valid",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    },
    403: {"description": "the link is not valid or has expired", "content": _HTML},
    404: {"description": "critical results are not enabled, or the study has none", "content": _HTML},
}
_CRITICAL_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_UNAUTHORISED,
    400: {"model": Error, "description": "not a Study Instance UID"},
    404: {"model": Error, "description": "no critical result for the study, or critical results are off"},
}


def _page(status: int, title: str, text: str, form: str = "") -> HTMLResponse:
    return HTMLResponse(_LINK_PAGE.format(title=title, text=text, form=form), status_code=status)


def _critical_results(app: FastAPI, backend: ApiBackend, needs: Needs) -> None:
    """Critical results: their ladder, and acknowledgement by a token or by the signed link of a message."""

    def loop() -> CriticalApi:
        if backend.critical is None:
            raise HTTPException(404, "critical results are not enabled here ([critical_results] enabled)")
        return backend.critical

    @app.post(
        "/critical-results/{study_uid}/acknowledge",
        response_model=dict[str, Any],
        responses=_CRITICAL_RESPONSES,
        summary="Acknowledge a study's critical result as the token's holder (any role); stops its escalation",
    )
    def acknowledge(
        token: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))], study_uid: StudyUid
    ) -> dict[str, Any]:
        found = loop().acknowledge(study_uid, token.name)
        if found is None:
            raise HTTPException(404, f"study {study_uid} has no critical result")
        return found

    @app.get(
        "/critical-results/acknowledge",
        response_class=HTMLResponse,
        responses=_LINK_RESPONSES,
        summary="The page a message's signed link opens: one button that acknowledges (a GET changes nothing, "
        "so a mail scanner that follows links acknowledges nothing)",
    )
    def link_page(
        study: LinkStudy,
        level: LinkLevel,
        expires: LinkExpires,
        sig: LinkSignature,
    ) -> HTMLResponse:
        if backend.critical is None:
            return _page(404, "Not available", "Critical results are not enabled on this gateway.")
        query = f"study={study}&amp;level={level}&amp;expires={expires}&amp;sig={sig}"
        action = f"/critical-results/acknowledge/confirm?{query}"
        form = f'<form method="post" action="{action}"><button type="submit" style="font-size: 1.2em; padding: .5em 1.5em">Acknowledge</button></form>'
        return _page(
            200,
            "Critical AI finding",
            f"Study {study}: an AI result marked critical is waiting for review (level {level}). "
            "Acknowledging says you have taken it on; it stops the escalation.",
            form,
        )

    @app.post(
        "/critical-results/acknowledge/confirm",
        response_class=HTMLResponse,
        responses=_LINK_RESPONSES,
        summary="Acknowledge by a message's signed link",
    )
    def acknowledge_by_link(
        study: LinkStudy,
        level: LinkLevel,
        expires: LinkExpires,
        sig: LinkSignature,
    ) -> HTMLResponse:
        if backend.critical is None:
            return _page(404, "Not available", "Critical results are not enabled on this gateway.")
        found = backend.critical.acknowledge_link(study, level, expires, sig)
        if "error" in found:
            status = 404 if found["error"].startswith("no critical") else 403
            return _page(status, "Not acknowledged", found["error"] + ".")
        who = "you" if found["first"] else f"{found['by']} (earlier)"
        return _page(200, "Acknowledged", f"Study {study}: acknowledged by {who}.")

    # After the link's routes: "acknowledge" would otherwise be taken for a study UID (and need a token).
    @app.get(
        "/critical-results/{study_uid}",
        response_model=list[dict[str, Any]],
        responses=_CRITICAL_RESPONSES,
        summary="A study's critical-result ladder: each level told, when, and its acknowledgement (read-only role)",
    )
    def critical_status(
        _: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))], study_uid: StudyUid
    ) -> list[dict[str, Any]]:
        rows = loop().status(study_uid)
        if not rows:
            raise HTTPException(404, f"study {study_uid} has no critical result")
        return rows


_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (fsynced) - the Store Instances Response Module as DICOM JSON",
          "content": {RESPONSE_MEDIA_TYPE: {"schema": {"type": "object"}}}},
    202: {"description": "some instances stored; the Failed SOP Sequence gives each failure's reason",
          "content": {RESPONSE_MEDIA_TYPE: {"schema": {"type": "object"}}}},
    400: {"model": Error, "description": "not a well-formed multipart/related body"},
    401: {"model": Error, "description": "missing or unknown bearer token"},
    403: {"model": Error, "description": "the token's role may not store instances (sender or admin)"},
    409: {"description": "no instance stored; the Failed SOP Sequence gives each failure's reason",
          "content": {RESPONSE_MEDIA_TYPE: {"schema": {"type": "object"}}}},
    413: {"model": Error, "description": "the body is over [http] stow_max_bytes"},
    415: {"model": Error, "description": 'not multipart/related; type="application/dicom"'},
}  # fmt: skip


def _stow(app: FastAPI, settings: HttpSettings, backend: ApiBackend, needs: Needs) -> None:
    """DICOMweb STOW-RS: instances stored with the C-STORE rule (on disk, fsynced, before the answer)."""
    sender = needs(TokenRole.SENDER)

    async def store(request: Request, token: Principal, study_uid: str | None) -> Response:
        if backend.stow is None:
            raise HTTPException(404, "not found")
        length = request.headers.get("content-length", "")
        limit = settings.stow_max_bytes
        if length and (not length.isdigit() or int(length) > limit):
            return _error(413, f"request body over {limit} bytes ([http] stow_max_bytes)")
        try:
            stow = backend.stow(request.headers.get("content-type", ""), token.source_ae, study_uid)
        except StowRequestError as exc:
            return _error(415 if exc.unsupported_media_type else 400, str(exc))
        # Parts are stored as they complete (off the loop, a few MB at a time): one part in memory, not the body.
        pending, size = bytearray(), 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if (
                    size > limit
                ):  # what was stored stays (durable; held as an incomplete study, then analysed)
                    stow.abandon("association aborted")
                    return _error(413, f"request body over {limit} bytes ([http] stow_max_bytes)")
                pending += chunk
                if len(pending) >= STOW_FEED_BYTES:
                    await run_in_threadpool(stow.feed, bytes(pending))
                    pending.clear()
        except ClientDisconnect:
            stow.abandon("association aborted")
            raise
        try:
            if pending:
                await run_in_threadpool(stow.feed, bytes(pending))
            outcome = await run_in_threadpool(stow.finish)
        except StowRequestError as exc:
            return _error(400, str(exc))
        return JSONResponse(
            outcome.response(), status_code=outcome.http_status, media_type=RESPONSE_MEDIA_TYPE
        )

    @app.post(
        "/studies",
        responses=_STOW_RESPONSES,
        summary="STOW-RS: store instances of any studies (sender role)",
        openapi_extra={"requestBody": {"required": True, "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}},
    )  # fmt: skip
    async def stow(request: Request, token: Annotated[Principal, Depends(sender)]) -> Response:
        return await store(request, token, None)

    @app.post(
        "/studies/{study_uid}",
        responses=_STOW_RESPONSES,
        summary="STOW-RS: store instances of one study; others are refused (sender role)",
        openapi_extra={"requestBody": {"required": True, "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}},
    )  # fmt: skip
    async def stow_study(
        request: Request, token: Annotated[Principal, Depends(sender)], study_uid: StudyUid
    ) -> Response:
        return await store(request, token, study_uid)


class HttpApi:
    """The API served by uvicorn on the gateway's event loop, on a socket bound at start (so that a port in use
    is a clear error at start-up, not a log line)."""

    def __init__(self, settings: HttpSettings, backend: ApiBackend) -> None:
        import uvicorn  # only a gateway with HTTP enabled needs it

        self.settings = settings
        self.app = build_app(settings, backend)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat ours
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_config=None,  # the gateway's logging stays as configured
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
                server_header=False,
                ssl_certfile=settings.tls_cert_file,
                ssl_keyfile=settings.tls_key_file,
                ssl_ca_certs=settings.tls_ca_file,
                ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_ca_file else ssl.CERT_NONE,
            )
        )
        self._socket: socket.socket | None = None
        self._serving: concurrent.futures.Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sock = socket.create_server((self.settings.host, self.settings.port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve HTTP on {self.settings.host}:{self.settings.port}: {exc.strerror}; "
                "set [http] port (0 picks a free one) or enabled = false"
            ) from exc
        self._socket = sock
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(sockets=[sock]), loop)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the HTTP server on {self.settings.host}:{self.port} did not start")
            time.sleep(0.01)
        logger.info(
            "HTTP%s health/metrics/admin/STOW-RS on %s:%d",
            "S" if self.settings.tls_cert_file else "",
            self.settings.host,
            self.port,
        )

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1]) if self._socket is not None else self.settings.port

    def stop(self) -> None:
        self._server.should_exit = True
        if self._serving is not None:
            try:
                self._serving.result(timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # a server that does not stop must not keep the gateway from stopping
                logger.warning("HTTP server did not stop cleanly: %s", type(exc).__name__)
            self._serving = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
