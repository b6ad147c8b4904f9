"""Triton's readiness as the gateway sees it: the models each pipeline needs are checked at start-up, and one
probe loop keeps ``ready`` current. While Triton is down the inference gate is closed (workers hold, the queue
keeps every job in priority order, so the backlog is worked off STAT first when it returns); probes back off up to
``retry_max_s``, and a restarted local server wakes the probe at once.

Owned by the event loop: ``ready`` is a plain flag other threads only read; :meth:`wake_threadsafe` is the one
entry from another thread (the Triton supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from clients.triton import TritonClient
from gateway.config.settings import PipelineSettings
from gateway.core.errors import ConfigError
from gateway.core.retry import Backoff

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0


class TritonWatch:
    def __init__(self, client: TritonClient, url: str, *, retry_max_s: float) -> None:
        self.client = client
        self.url = url
        # probes while Triton is down: 4 s, 8 s ... up to retry_max_s
        self.backoff = Backoff(min(2 * WATCH_INTERVAL_S, retry_max_s), retry_max_s)
        self.ready = False
        self.open = asyncio.Event()  # the inference gate: set while Triton is ready
        self.open.set()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    async def check_models(self, pipelines: tuple[PipelineSettings, ...], *, local: bool) -> None:
        """Every pipeline's model ready (a local Triton must have them all; a remote one may load them later)."""
        for pipeline in pipelines:
            if await self.client.is_ready(pipeline.model):
                version = await self.client.model_version(pipeline.model)
                logger.info(
                    "pipeline %s -> model %s version %s ready (mode %s)",
                    pipeline.name,
                    pipeline.model,
                    version,
                    pipeline.mode.value,
                )
            elif local:
                raise ConfigError(
                    f"pipeline {pipeline.name}: model {pipeline.model!r} is not ready on the local Triton"
                )
            else:
                logger.warning(
                    "pipeline %s: model %s not ready on %s; jobs wait until it is",
                    pipeline.name,
                    pipeline.model,
                    self.url,
                )

    def unavailable(self) -> None:
        """A request found Triton unavailable: hold every worker until the probe sees it ready again."""
        self.ready = False
        self.open.clear()

    def unavailable_threadsafe(self) -> None:
        """The server is known to be down (its supervisor saw it exit): close the gate and probe."""

        def down() -> None:
            self.unavailable()
            self._wake.set()

        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(down)

    def wake_threadsafe(self) -> None:
        """Probe now, not after the backoff (called from the Triton supervisor's thread after a restart)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        delay, failures = WATCH_INTERVAL_S, 0
        while True:
            ready = await self.client.is_ready()
            if ready != self.ready:
                log = logger.info if ready else logger.error
                log("Triton at %s is %s", self.url, "ready" if ready else "NOT ready: gateway degraded")
            self.ready = ready
            if ready:
                self.open.set()
                delay, failures = WATCH_INTERVAL_S, 0
            else:
                self.open.clear()
                failures += 1
                delay = self.backoff.delay(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._wake.is_set():
                self._wake.clear()
                delay, failures = WATCH_INTERVAL_S, 0
