"""HTTP POST with retries on asyncio (httpx): webhooks and FHIR transaction Bundles.

One timeout per try covers connect, send and the answer; the waits between tries are ``asyncio.sleep`` with
the gateway's jittered backoff, so a dead or slow endpoint costs no thread and holds no analysis worker. The
client (its connection pool and TLS context, about 0.1 s to build) is made once, off the event loop.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff


class HttpPoster:
    def __init__(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False)
        # What httpx imports at its first request (its asyncio backend), imported here so that the first webhook
        # does not stall the event loop on imports.
        import anyio._backends._asyncio  # noqa: F401
        import httpcore._backends.anyio  # noqa: F401

    async def post(
        self,
        url: str,
        body: bytes,
        *,
        content_type: str,
        timeout_s: float,
        attempts: int,
        backoff: Backoff,
        what: str,
    ) -> int:
        """POST ``body`` until a 2xx answer; return the number of tries it took. Raises ``DeliveryError``."""
        headers = {"Content-Type": content_type, "Accept": content_type}
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                response = await self._client.post(
                    url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s)
                )
                if 200 <= response.status_code < 300:
                    return attempt
                last = f"HTTP {response.status_code}"
            except httpx.TimeoutException:
                last = f"no answer within {timeout_s:g} s"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < attempts:
                await asyncio.sleep(backoff.delay(attempt))
        raise DeliveryError(f"{what} {url} failed after {attempts} tries: {last}")

    async def aclose(self) -> None:
        await self._client.aclose()
