"""What runs on the event loop: the Triton client and its watch, the cross-study batcher, the job queue, the
worker pool and the background tasks (intake, outbox, retention). Built on the loop, run until told to stop,
stopped in order (workers, then the studies' last bookkeeping, then the reports in flight). Everything here is
owned by the loop; ``snapshot`` copies what ``/health`` shows and runs on the loop too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clients.http_post import HttpPoster
from clients.triton import TritonClient
from gateway.database.queue import SharedQueue
from gateway.delivery.outbox import Outbox
from gateway.inference.batcher import CrossStudyBatcher
from gateway.inference.watch import TritonWatch
from gateway.ops import retention
from gateway.ops.health import LoopState
from gateway.orchestration.cluster import ClusterQueue
from gateway.orchestration.failures import FailurePublisher
from gateway.orchestration.intake import StudyIntake
from gateway.orchestration.scheduler import JobQueue
from gateway.orchestration.series_pipeline import PipelineParts, SeriesPipeline
from gateway.orchestration.workers import WorkerPool
from gateway.reporting.dispatcher import ReportDispatcher

REPORTS_DRAIN_S = 10.0  # how long a stopping gateway waits for FHIR / HL7 deliveries in flight


class LoopRuntime:
    def __init__(
        self,
        parts: PipelineParts,
        *,
        triton_url: str,
        local_triton: bool,
        intake: StudyIntake,
        outbox: Outbox,
        reports: ReportDispatcher,
        http: HttpPoster,
        shared_queue: SharedQueue | None = None,
        adopt: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.parts = parts
        self.triton_url = triton_url
        self.local_triton = local_triton
        self.intake = intake
        self.outbox = outbox
        self.reports = reports
        self.http = http
        self.stopping = asyncio.Event()
        tri = parts.settings.triton
        self.client = TritonClient(
            triton_url,
            timeout_s=tri.request_timeout_s,
            max_slices_per_request=tri.max_slices_per_request,
            observe=self._observe_request,
            transport=tri.transport,
        )
        self.batcher = (
            CrossStudyBatcher(
                self.client,
                max_slices=tri.max_slices_per_request,
                max_delay_s=tri.batch_delay_ms / 1000.0,
                observe=lambda model, studies: parts.metrics.triton_request_studies.labels(model).observe(
                    studies
                ),
            )
            if tri.cross_study_batching
            else None
        )
        self.watch = TritonWatch(self.client, triton_url, retry_max_s=tri.retry_max_s)
        settings = parts.settings
        # One gateway: the queue in memory. A cluster: the queue in the shared database (``[cluster] enabled``).
        self.queue: JobQueue | ClusterQueue = (
            JobQueue(settings.scheduling)
            if shared_queue is None
            else ClusterQueue(
                shared_queue,
                settings.cluster,
                settings.scheduling,
                tracker=parts.tracker,
                router=intake.router,
                spool=parts.spool,
                adopt=adopt,
                after_commit=parts.events.record_of.after_commit if parts.events.record_of else None,
            )
        )
        self.pool = WorkerPool(
            queue=self.queue,
            client=self.client,
            pipeline=SeriesPipeline(parts, shared_batcher=self.batcher, raise_to_stat=self.queue.mark_stat),
            failures=FailurePublisher(parts),
            tracker=parts.tracker,
            watch=self.watch,
            metrics=parts.metrics,
        )

    async def prepare(self) -> None:
        """Before anything is accepted: the configured models are checked against Triton (when it answers)."""
        await self.watch.check_models(self.parts.settings.pipelines, local=self.local_triton)

    async def run(self) -> None:
        """Run every part until ``stopping`` is set, then stop them in order."""
        settings = self.parts.settings
        tasks = [
            asyncio.create_task(self.intake.run(self.queue), name="assembler"),
            asyncio.create_task(self.watch.run(), name="triton-watch"),
            asyncio.create_task(self.outbox.run(), name="outbox"),
            asyncio.create_task(
                retention.purge_periodically(
                    settings, self.parts.executor, self.parts.metrics, self.parts.events
                ),
                name="retention",
            ),
        ]
        if isinstance(self.queue, ClusterQueue):
            tasks.append(asyncio.create_task(self.queue.run(), name="cluster-heartbeat"))
        critical = self.parts.critical
        if critical is not None:
            tasks.append(asyncio.create_task(critical.run(self.stopping), name="critical-results"))
        try:
            self.pool.start(settings.workers, settings.scheduling.stat_workers)
            await self.stopping.wait()
            await self.pool.stop()
            await self.parts.tracker.drain()
            if isinstance(self.queue, ClusterQueue):
                await self.queue.stopped()
            await self.reports.drain(REPORTS_DRAIN_S)
            if critical is not None:
                await critical.drain(REPORTS_DRAIN_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.close()

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()

    def snapshot(self) -> LoopState:
        """What the loop owns, copied for ``/health``; only ever run on the loop."""
        return LoopState(
            triton_ready=self.watch.ready,
            endpoints=self.client.endpoints,
            queue=self.queue.depth_by_priority(),
            queue_by_pacs=self.queue.depth_by_pacs(),
            studies_in_flight=len(self.parts.tracker),
            workers_alive=self.pool.alive,
            workers_started=self.pool.started,
            resource_error=self.pool.resource_error,
            cluster=self.queue.state() if isinstance(self.queue, ClusterQueue) else {},
        )

    def _observe_request(self, model: str, seconds: float, slices: int) -> None:
        self.parts.metrics.triton_request_seconds.labels(model).observe(seconds)
        self.parts.metrics.triton_request_slices.labels(model).observe(slices)
