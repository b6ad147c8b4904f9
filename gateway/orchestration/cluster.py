"""The cluster's job queue on the event loop: the workers' queue when ``[cluster] enabled``.

It has the in-memory queue's interface (``get``, ``put``, ``mark_stat``, the depths for ``/health``) over the
shared queue in the database (``gateway.database.queue``): intake hands it each routed study, routing's writes
put the jobs in the database, and a worker's ``get`` claims the next job of the whole cluster. A job of a study
that this node did not route (another node routed it, or died holding it) is rebuilt from the shared spool and
the same routing rules. Its background task renews this node's leases, refreshes the depths and adopts the
studies of a node that died while receiving them. The database calls run in an executor; while the database is
down the workers wait (the receivers keep acknowledging into the spool) and carry on when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from gateway.config.settings import ClusterSettings, SchedulingSettings
from gateway.core.domain import Priority, Study
from gateway.core.errors import DatabaseError
from gateway.core.retry import Backoff
from gateway.database.jobs import job_id
from gateway.database.queue import ClaimedJob, QueueDepth, SharedQueue
from gateway.ingest.assembler import assemble_study
from gateway.ingest.spool import Spool
from gateway.orchestration.routing import InferenceJob, Router, RoutingDecision
from gateway.orchestration.tracker import StudyTracker

logger = logging.getLogger(__name__)

DATABASE_RETRY = Backoff(0.5, 5.0)
QUEUE_THREADS = 3  # claims, completions and the heartbeat may wait on the database at the same time


class ClusterQueue:
    def __init__(
        self,
        shared: SharedQueue,
        settings: ClusterSettings,
        scheduling: SchedulingSettings,
        *,
        tracker: StudyTracker,
        router: Router,
        spool: Spool,
        executor: Executor | None = None,
        adopt: Callable[[list[str]], None] | None = None,
        after_commit: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.shared = shared
        # The system of record's writer: calls back once a routed study's jobs are committed (claimable).
        self.after_commit = after_commit
        self.cluster = settings
        self.settings = scheduling
        self.tracker = tracker
        self.router = router
        self.spool = spool
        # The database calls: threads of their own, so a slow database never holds up intake or analysis.
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(
            max_workers=QUEUE_THREADS, thread_name_prefix="cluster-queue"
        )
        self.adopt = adopt  # feeds a dead node's unrouted studies to this node's assembler (blocking)
        self._jobs: dict[str, InferenceJob] = {}  # routed here, or rebuilt: job id -> job
        self._held: set[str] = set()  # studies leased to this node and open in its tracker
        self._skips: dict[str, int] = {}  # study -> series no pipeline applies to (from its routing)
        self._wake = asyncio.Event()
        self._depth = QueueDepth(
            by_priority={p.name: 0 for p in Priority}, by_pacs={}, running=0, nodes_alive=0
        )
        self.last_error = ""
        self._background: set[asyncio.Task[None]] = set()
        tracker.completion_guard = self._finish_study

    # -- intake's side ----------------------------------------------------------------------------------------

    def routed(self, study: Study, decision: RoutingDecision, *, reopened: bool) -> None:
        """A study this node routed; its jobs reach the database through the system of record's writer."""
        if not decision.jobs:
            self.tracker.open(study, jobs=0, skipped=len(decision.skipped))
            return
        self._skips[study.study_instance_uid] = len(decision.skipped)
        for job in decision.jobs:
            self._jobs[self._id(job)] = job
        if reopened:
            self._in_background(self.shared.reopen, [study.study_instance_uid])
        if self.after_commit is None:
            self._wake.set()
            return
        # Wake this node's idle workers when the jobs are in the database, not before (a claim before the
        # commit finds nothing and then sleeps for poll_s).
        loop = asyncio.get_running_loop()

        def committed() -> None:  # on the writer's thread; a loop that has stopped has no one to wake
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

        self.after_commit(committed)

    # -- the workers' side ------------------------------------------------------------------------------------

    async def get(self, *, stat_only: bool = False) -> InferenceJob:
        attempt = 0
        while True:
            try:
                claimed = await self._call(self.shared.claim, stat_only=stat_only)
                attempt = 0
            except DatabaseError as exc:
                attempt += 1
                self._failed("claiming a job", exc)
                await asyncio.sleep(DATABASE_RETRY.delay(attempt))
                continue
            if claimed is not None:
                job = await self._job_for(claimed)
                if job is not None:
                    return job
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.cluster.poll_s)

    def put(self, job: InferenceJob) -> None:
        """A job that could not run now goes back to the queue (still this node's: its study is held here)."""
        key = self._id(job)
        self._jobs[key] = job
        self._in_background(self.shared.release, key)
        self._wake.set()

    def task_done(self) -> None:
        pass

    def mark_stat(self, study_instance_uid: str) -> int:
        raised = 0
        for key, job in list(self._jobs.items()):
            if job.study.study_instance_uid == study_instance_uid and job.priority is not Priority.STAT:
                self._jobs[key] = dataclasses.replace(job, priority=Priority.STAT)
                raised += 1
        self._in_background(self.shared.raise_to_stat, study_instance_uid)
        return raised

    async def _job_for(self, claimed: ClaimedJob) -> InferenceJob | None:
        """The claimed job, its study opened in this node's tracker on its first claim here."""
        uid = claimed.study_uid
        if claimed.takeover or uid not in self._held:
            if claimed.takeover or claimed.job_id not in self._jobs:
                await self._rebuild(claimed)
            jobs = [j for j in self._jobs.values() if j.study.study_instance_uid == uid]
            if jobs and self.tracker.get(uid) is None:
                self.tracker.open(jobs[0].study, jobs=len(jobs), skipped=self._skips.get(uid, 0))
            self._held.add(uid)
        job = self._jobs.get(claimed.job_id)
        if job is None:
            logger.error(
                "job %s is not one this node's routing rules make (is every node configured alike?); not run",
                claimed.job_id,
            )
            self._in_background(self.shared.abandon, claimed.job_id)
            return None
        return dataclasses.replace(job, priority=Priority.parse(claimed.priority), attempts=claimed.attempts)

    async def _rebuild(self, claimed: ClaimedJob) -> None:
        """A study routed elsewhere: assembled from the shared spool and routed by the same rules."""
        records = await self._call(self.spool.study_records, claimed.study_uid)
        if not records:
            return
        study = assemble_study(
            records,
            calling_ae=claimed.calling_ae,
            first_received_at=min(r.received_at for r in records),
            last_received_at=max(r.received_at for r in records),
        )
        decision = self.router.route(study)
        self._skips[claimed.study_uid] = len(decision.skipped)
        for job in decision.jobs:
            self._jobs[self._id(job)] = job
        if claimed.takeover:
            logger.warning("study %s taken over: analysed here as it stands in the spool", claimed.study_uid)

    async def _finish_study(self, study_uid: str) -> bool:
        """The tracker's completion guard: only the study's lease owner completes it (once)."""
        if study_uid not in self._held:
            return True  # nothing to analyse: never leased
        attempt = 0
        while True:
            try:
                done = bool(await self._call(self.shared.finish_study, study_uid))
                break
            except DatabaseError as exc:
                attempt += 1
                self._failed(f"completing study {study_uid}", exc)
                await asyncio.sleep(DATABASE_RETRY.delay(attempt))
        self._held.discard(study_uid)
        self._skips.pop(study_uid, None)
        for key in [k for k, j in self._jobs.items() if j.study.study_instance_uid == study_uid]:
            del self._jobs[key]
        if not done:
            logger.warning("study %s was taken over by another node, which completes it", study_uid)
        return done

    # -- background: heartbeat, depths, adoption ----------------------------------------------------------

    async def run(self) -> None:
        """Renew this node's leases every ``heartbeat_s`` until cancelled; adopt dead nodes' studies, and once a
        lease period sweep the shared spool for studies nobody recorded (a node killed before its writes went in)."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.cluster.lease_s
        while True:
            try:
                await self._call(self.shared.heartbeat)
                self._depth = await self._call(self.shared.depth)
                adopted: list[str] = []
                for node in await self._call(self.shared.dead_nodes):
                    studies = await self._call(self.shared.adopt, node)
                    logger.warning(
                        "node %s stopped: %d of its unrouted studies adopted here", node, len(studies)
                    )
                    adopted.extend(studies)
                sweep = loop.time() >= next_sweep and self.shared.may_take_over(self.shared.now())
                if self.adopt is not None and (adopted or sweep):
                    await self._call(self.adopt, adopted)
                if sweep:
                    next_sweep = loop.time() + self.cluster.lease_s
                self.last_error = ""
            except DatabaseError as exc:
                self._failed("heartbeat", exc)
            await asyncio.sleep(self.cluster.heartbeat_s)

    async def stopped(self) -> None:
        """A clean stop: the studies held here and not finished go back to the cluster at once."""
        try:
            await self._call(self.shared.stopped)
        except DatabaseError as exc:
            self._failed("releasing this node's studies", exc)
        if self._own_executor and isinstance(self.executor, ThreadPoolExecutor):
            self.executor.shutdown(wait=False, cancel_futures=True)

    # -- observation ----------------------------------------------------------------------------------------

    def depth_by_priority(self) -> dict[str, int]:
        return dict(self._depth.by_priority)

    def depth_by_pacs(self) -> dict[str, int]:
        return dict(self._depth.by_pacs)

    def qsize(self) -> int:
        return sum(self._depth.by_priority.values())

    def state(self) -> dict[str, Any]:
        """For ``/health``: the cluster as this node last saw it."""
        return {
            "nodes_alive": self._depth.nodes_alive,
            "running": self._depth.running,
            "studies_held": len(self._held),
            "lease_s": self.cluster.lease_s,
            "error": self.last_error,
        }

    # -- helpers --------------------------------------------------------------------------------------------

    @staticmethod
    def _id(job: InferenceJob) -> str:
        return job_id(job.study.study_instance_uid, job.series.series_instance_uid, job.pipeline.name)

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: function(*args, **kwargs))

    def _in_background(self, function: Callable[..., Any], *args: Any) -> None:
        async def call() -> None:
            attempt = 0
            while True:
                try:
                    await self._call(function, *args)
                    return
                except DatabaseError as exc:
                    attempt += 1
                    self._failed(getattr(function, "__name__", "a queue write"), exc)
                    await asyncio.sleep(DATABASE_RETRY.delay(attempt))

        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _failed(self, what: str, exc: Exception) -> None:
        if str(exc) != self.last_error:
            logger.warning("cluster queue: %s failed (%s); retrying", what, exc)
        self.last_error = str(exc)
