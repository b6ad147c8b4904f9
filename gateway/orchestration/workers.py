"""The analysis workers: ``workers`` general ones and ``stat_workers`` that take STAT jobs only, so a STAT study
never waits for a routine series to finish. Each takes the next job from the queue while the inference gate is
open and runs it through the series pipeline with every outcome contained:

* Triton unavailable -> the gate closes, the job goes back to the queue (priority kept), nothing is lost;
* a permanent error (undecodable, inconsistent geometry ...) -> a failure SR;
* a resource ran out (results disk full, no file descriptors, memory) -> the job runs again later, with backoff,
  and the gateway reports itself degraded meanwhile;
* anything else -> logged with its stack and a failure SR.

A worker task that dies anyway is logged, counted and replaced: the loop never loses one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from gateway.core.errors import InferenceUnavailable, PermanentError, ResourceExhausted, as_resource_error
from gateway.core.retry import Backoff
from gateway.database.jobs import job_id
from gateway.inference.watch import TritonWatch
from gateway.ops.metrics import Metrics
from gateway.orchestration.analysis import Inferrer
from gateway.orchestration.cluster import ClusterQueue
from gateway.orchestration.failures import FailurePublisher
from gateway.orchestration.routing import InferenceJob
from gateway.orchestration.scheduler import JobQueue
from gateway.orchestration.series_pipeline import SeriesPipeline
from gateway.orchestration.tracker import StudyTracker

logger = logging.getLogger(__name__)

NOTIFY_DRAIN_S = 10.0  # how long a stopping gateway waits for STAT webhooks still in flight
RESOURCE_BACKOFF = Backoff(1.0, 10.0)  # waits before a job deferred by a full disk runs again


class WorkerPool:
    def __init__(
        self,
        *,
        queue: JobQueue | ClusterQueue,
        client: Inferrer,
        pipeline: SeriesPipeline,
        failures: FailurePublisher,
        tracker: StudyTracker,
        watch: TritonWatch,
        metrics: Metrics,
    ) -> None:
        self.queue = queue
        self.client = client
        self.pipeline = pipeline
        self.failures = failures
        self.tracker = tracker
        self.watch = watch
        self.metrics = metrics
        self.resource_error = ""  # set while a job is deferred by a full disk / no file descriptors / memory
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    @property
    def alive(self) -> int:
        return sum(1 for task in list(self._tasks.values()) if not task.done())

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self, workers: int, stat_workers: int) -> None:
        for i in range(workers):
            self._spawn(f"worker-{i}", stat_only=False)
        for i in range(stat_workers):
            self._spawn(f"stat-worker-{i}", stat_only=True)

    async def stop(self) -> None:
        self._stopping = True
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pipeline.parts.notifications.drain(NOTIFY_DRAIN_S)

    def _spawn(self, name: str, *, stat_only: bool) -> None:
        task = asyncio.create_task(self._work(stat_only=stat_only), name=name)
        self._tasks[name] = task

        def died(done: asyncio.Task[None]) -> None:
            if done.cancelled() or self._tasks.get(name) is not done or self._stopping:
                return
            exc = done.exception()
            logger.error("analysis %s died (%s); starting a new one", name, f"{type(exc).__name__}: {exc}")
            self.metrics.worker_restarts.inc()
            self._spawn(name, stat_only=stat_only)

        task.add_done_callback(died)

    async def _work(self, *, stat_only: bool) -> None:
        while True:
            await self.watch.open.wait()
            job = await self.queue.get(stat_only=stat_only)
            try:
                await self.run(job)
            finally:
                self.queue.task_done()

    async def run(self, job: InferenceJob) -> None:
        """One job, with every outcome contained: nothing it raises (a full disk included) ends the worker."""
        study_uid = job.study.study_instance_uid
        self.tracker.events.series_started(
            job_id(study_uid, job.series.series_instance_uid, job.pipeline.name),
            study_uid,
            attempts=job.attempts + 1,
        )
        try:
            await self.pipeline.run(job, self.client)
            self.resource_error = ""
            self.tracker.job_done(job.study.study_instance_uid)
        except InferenceUnavailable as exc:
            self.metrics.inference_retries.inc()
            self.watch.unavailable()
            logger.warning(
                "inference unavailable for series %s (try %d); queued until Triton is back: %s",
                job.series.series_instance_uid,
                job.attempts + 1,
                exc,
            )
            self.queue.put(dataclasses.replace(job, attempts=job.attempts + 1))
        except PermanentError as exc:
            logger.warning(
                "series %s not analysed by %s: %s", job.series.series_instance_uid, job.pipeline.name, exc
            )
            await self._fail(job, str(exc), type(exc).__name__)
        except Exception as exc:
            resource = as_resource_error(exc)
            if resource is not None:
                self._defer(job, resource)
                return
            logger.exception(
                "series %s: unexpected error in %s", job.series.series_instance_uid, job.pipeline.name
            )
            await self._fail(job, f"{type(exc).__name__}: {exc}", type(exc).__name__)

    async def _fail(self, job: InferenceJob, reason: str, kind: str) -> None:
        await self.failures.fail(job, reason, kind)
        try:
            self.tracker.job_done(job.study.study_instance_uid)
        except Exception:
            logger.exception("study %s could not be completed after a failure", job.study.study_instance_uid)

    def _defer(self, job: InferenceJob, exc: ResourceExhausted) -> None:
        delay = RESOURCE_BACKOFF.delay(job.attempts + 1)
        self.resource_error = str(exc)
        self.metrics.resource_errors.labels(str(exc).split(" (")[0]).inc()
        logger.error(
            "series %s: %s; analysis deferred %.0f s (try %d), the gateway reports itself degraded",
            job.series.series_instance_uid,
            exc,
            delay,
            job.attempts + 1,
        )
        retry = dataclasses.replace(job, attempts=job.attempts + 1)
        asyncio.get_running_loop().call_later(delay, self.queue.put, retry)
