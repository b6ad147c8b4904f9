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
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from gateway.config.settings import HttpSettings, TokenRole
from gateway.database.queries import StudyFilter
from gateway.ops.api_errors import Error
from gateway.ops.identity import RESULT_READERS, Principal
from gateway.ops.review_api import UID_PATTERN

POLL_S = 0.5  # the worklist's delay from a commit to the browser is at most this, plus the network
KEEPALIVE_S = 15.0
STATIC = resources.files("gateway.ops").joinpath("dashboard_static")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
# The page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src *; img-src 'self' data: blob:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _studies_key(row: dict[str, Any]) -> tuple[Any, ...]:
    pipelines = tuple((p["name"], p["mode"]) for p in row.get("pipelines", ()))
    return (row["state"], row["priority"], row["stat"], row["findings"], row["state_since"], pipelines)


def render_png(
    path: Path, window: tuple[float, float] | None = None, max_side: int = 1024
) -> tuple[bytes, int, int]:
    """One image as a PNG for the page: modality LUT, a window (the pipeline's, else the image's own, else its
    range), MONOCHROME1 inverted, at most ``max_side`` pixels across; with the image's own columns and rows
    (the page draws the overlay in those coordinates)."""
    import io

    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    frame = ds.pixel_array[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    pixels = frame.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        window = (float(center), float(width))
    if window is None:
        low, high = float(np.percentile(pixels, 1)), float(np.percentile(pixels, 99))
        window = ((low + high) / 2, max(high - low, 1.0))
    center, width = window
    grey = np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    image = Image.fromarray((grey * 255).astype(np.uint8))
    columns, rows = image.size  # the overlay's coordinates: the image's own, whatever size is sent
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), int(columns), int(rows)


# What the image routes answer besides the PNG (the OpenAPI document lists them).
IMAGE_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "a malformed UID"},
    401: {"model": Error, "description": "missing or invalid bearer token"},
    403: {"model": Error, "description": "the role may not see AI results"},
}


def heatmap_png(mask: np.ndarray, max_side: int = 1024) -> bytes:
    """The segmented pixels as a translucent warm overlay (RGBA PNG), the size ``render_png`` sends the image."""
    import io

    from PIL import Image

    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (255, 96, 0, 120)
    image = Image.fromarray(rgba, mode="RGBA")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def dashboard_routes(
    app: FastAPI,
    settings: HttpSettings,
    studies: Callable[[StudyFilter], list[dict[str, Any]]],
    needs: Callable[..., Callable[..., Principal]],
    image_path: Callable[[str, str], str | None] | None = None,
    window_of: Callable[[str], tuple[float, float] | None] | None = None,
    mask_of: Callable[[str, str], np.ndarray | None] | None = None,
) -> None:
    oidc = settings.oidc

    if image_path is not None:

        @app.get(
            "/studies/{study_uid}/images/{sop_uid}/rendered",
            summary="One image of the study as a PNG (for the dashboard's study view)",
            response_class=Response,
            tags=["dashboard"],
            responses={
                200: {"content": {"image/png": {}}, "description": "the image, with X-Image-Columns / -Rows"},
                **IMAGE_REFUSALS,
                404: {"model": Error, "description": "unknown or purged image"},
            },
        )
        def rendered(
            _: Annotated[Principal, Depends(needs(*RESULT_READERS))],
            study_uid: Annotated[str, PathParam(pattern=UID_PATTERN, max_length=64)],
            sop_uid: Annotated[str, PathParam(pattern=UID_PATTERN, max_length=64)],
            pipeline: Annotated[str | None, Query(max_length=64)] = None,
        ) -> Response:
            found = image_path(study_uid, sop_uid)
            if found is None or not Path(found).is_file():
                return JSONResponse(
                    {"error": "no such image in the spool (unknown, or purged)"}, status_code=404
                )
            window = window_of(pipeline) if (window_of is not None and pipeline) else None
            png, columns, rows = render_png(Path(found), window)
            headers = {
                "Cache-Control": "private, max-age=300",
                "X-Image-Columns": str(columns),
                "X-Image-Rows": str(rows),
            }
            return Response(png, media_type="image/png", headers=headers)

    if mask_of is not None:

        @app.get(
            "/studies/{study_uid}/images/{sop_uid}/heatmap",
            summary="The AI's segmentation (SEG) of one image as a translucent PNG overlay",
            response_class=Response,
            tags=["dashboard"],
            responses={
                200: {
                    "content": {"image/png": {}},
                    "description": "the mask, the size of the rendered image",
                },
                **IMAGE_REFUSALS,
                404: {"model": Error, "description": "no AI segmentation of this image"},
            },
        )
        def heatmap(
            _: Annotated[Principal, Depends(needs(*RESULT_READERS))],
            study_uid: Annotated[str, PathParam(pattern=UID_PATTERN, max_length=64)],
            sop_uid: Annotated[str, PathParam(pattern=UID_PATTERN, max_length=64)],
        ) -> Response:
            mask = mask_of(study_uid, sop_uid)
            if mask is None:
                return JSONResponse({"error": "no AI segmentation of this image"}, status_code=404)
            return Response(
                heatmap_png(mask), media_type="image/png", headers={"Cache-Control": "private, max-age=300"}
            )

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
