"""The web dashboard, served by the gateway itself (no CDN, no build step: plain HTML, CSS and ES modules under
``dashboard_static/``), and the live feed it listens to.

- ``GET /ui/``: the single-page dashboard. People sign in with the site's OpenID Connect provider
  (authorization code with PKCE, in the browser; ``[http.oidc] authorization_endpoint`` / ``token_endpoint``),
  or paste a service token. Every call it makes is an API call with that bearer token: the roles of
  ``identity`` decide what it shows.
- ``GET /ui/config.json``: what the page needs to start a sign-in (public values only).
- ``GET /events/worklist``: server-sent events (``text/event-stream``) - one ``study`` event per study whose
  state, priority or findings changed, read from the system of record every ``POLL_S``, so every node of a
  cluster feeds the same worklist. The page reads it with ``fetch`` (EventSource cannot send a bearer token).
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at run time.
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from gateway.config.settings import HttpSettings, TokenRole
from gateway.database.queries import StudyFilter
from gateway.ops.identity import Principal

POLL_S = 0.5  # the worklist's delay from a commit to the browser is at most this, plus the network
KEEPALIVE_S = 15.0
STATIC = resources.files("gateway.ops").joinpath("dashboard_static")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
# The page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src *; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _studies_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["state"], row["priority"], row["stat"], row["findings"], row["state_since"])


def dashboard_routes(
    app: FastAPI,
    settings: HttpSettings,
    studies: Callable[[StudyFilter], list[dict[str, Any]]],
    needs: Callable[..., Callable[..., Principal]],
) -> None:
    oidc = settings.oidc

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/ui/", include_in_schema=False)
    def ui_page() -> HTMLResponse:
        return HTMLResponse(STATIC.joinpath("index.html").read_text(), headers=SECURITY_HEADERS)

    @app.get("/ui/config.json", include_in_schema=False)
    def ui_config() -> JSONResponse:
        sign_in = None
        if oidc.enabled and oidc.authorization_endpoint and oidc.token_endpoint:
            sign_in = {
                "issuer": oidc.issuer,
                "client_id": oidc.client_id or oidc.audience,
                "authorization_endpoint": oidc.authorization_endpoint,
                "token_endpoint": oidc.token_endpoint,
                "scope": oidc.scope,
            }
        return JSONResponse({"oidc": sign_in})

    @app.get("/ui/static/{name}", include_in_schema=False)
    def ui_static(name: str) -> Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
            return JSONResponse({"error": "not found"}, status_code=404)
        path = STATIC.joinpath(name)
        if not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(path.read_bytes(), media_type=CONTENT_TYPES[suffix], headers=SECURITY_HEADERS)

    # Not in the OpenAPI document: an endless stream is no operation a conformance run can call and finish.
    @app.get("/events/worklist", response_class=StreamingResponse, include_in_schema=False)
    async def worklist_events(
        request: Request, _: Annotated[Principal, Depends(needs(TokenRole.READ_ONLY))]
    ) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            seen: dict[str, tuple[Any, ...]] = {}
            last_write = time.monotonic()
            yield b"retry: 2000\n\n"
            while not await request.is_disconnected():
                rows = await run_in_threadpool(studies, StudyFilter(limit=200))
                for row in rows:
                    key = _studies_key(row)
                    if seen.get(row["study_uid"]) != key:
                        seen[row["study_uid"]] = key
                        yield f"event: study\ndata: {json.dumps(row)}\n\n".encode()
                        last_write = time.monotonic()
                if time.monotonic() - last_write > KEEPALIVE_S:
                    yield b": keepalive\n\n"
                    last_write = time.monotonic()
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
