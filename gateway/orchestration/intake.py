"""assemble -> route -> schedule: each study, once complete, is routed and its series jobs queued.

Runs on the event loop. It sleeps until the next pending study's quiet period ends, or until the receiver wakes
it because a study started waiting while none was - no polling.

A study that closes again while its earlier part is still being analysed (the rest of it arrived late) is routed
only once that analysis is finished and settled, and then as the spool holds it: the whole study, never the late
part on its own (one routing at a time per study; parts that close meanwhile join the one waiting) - and not at
all when the spool holds nothing that analysis did not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import Executor

from gateway.core.domain import Study
from gateway.database.jobs import QueuedJob, RoutedStudy, job_id
from gateway.ingest.assembler import StudyAssembler
from gateway.ops.events import EventSink
from gateway.orchestration.cluster import ClusterQueue
from gateway.orchestration.routing import Router, study_priority
from gateway.orchestration.scheduler import JobQueue
from gateway.orchestration.tracker import StudyTracker
from gateway.workflow.context import OrderContext

logger = logging.getLogger(__name__)
ASSEMBLY_SLACK_S = 0.01  # past a deadline, so the study is complete when the loop wakes


class StudyIntake:
    def __init__(
        self,
        assembler: StudyAssembler,
        router: Router,
        tracker: StudyTracker,
        events: EventSink,
        executor: Executor | None = None,
        orders: OrderContext | None = None,
    ) -> None:
        self.assembler = assembler
        self.router = router
        self.tracker = tracker
        self.events = events
        self.executor = executor
        self.orders = orders
        # Studies whose routing waits for their analysis in flight: the study to route (its latest part), or
        # None while that routing runs.
        self._later: dict[str, Study | None] = {}
        self._later_tasks: set[asyncio.Task[None]] = set()

    async def run(self, queue: JobQueue | ClusterQueue) -> None:
        """Route each study when it becomes complete, until cancelled."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()

        def wake_up() -> None:  # on a receiver thread; a loop that is shutting down has nothing to wake
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

        self.assembler.on_earlier_deadline = wake_up
        try:
            while True:
                wake.clear()
                for study in self.assembler.pop_complete():
                    await self._route_in_turn(study, queue)
                delay = self.assembler.seconds_until_next()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        wake.wait(), timeout=None if delay is None else delay + ASSEMBLY_SLACK_S
                    )
        finally:
            for task in self._later_tasks:
                task.cancel()

    async def _route_in_turn(self, study: Study, queue: JobQueue | ClusterQueue) -> None:
        """Route the study now, or after its analysis in flight (see the module's text)."""
        uid = study.study_instance_uid
        if uid in self._later:  # a routing of this study already waits (or runs): this part joins it
            waiting = self._later[uid]
            self._later[uid] = study if waiting is None else _joined(waiting, study)
        elif self.tracker.busy(uid):
            logger.info("study %s: more instances while it is analysed; analysed again once it is done", uid)
            self._later[uid] = study
            task = asyncio.ensure_future(self._route_when_idle(uid, queue))
            self._later_tasks.add(task)
            task.add_done_callback(self._later_tasks.discard)
        else:
            await self.route(study, queue)

    async def _route_when_idle(self, uid: str, queue: JobQueue | ClusterQueue) -> None:
        try:
            loop = asyncio.get_running_loop()
            while (study := self._later.get(uid)) is not None:
                await self.tracker.idle(uid)
                study = self._later[uid] or study
                self._later[uid] = None
                # Nothing the finished analysis did not cover (the same instances closed again: a re-send, or
                # a cluster node adopting a study the database had not heard of yet): no second analysis.
                if await loop.run_in_executor(self.executor, self.tracker.spool.has_unprocessed, uid):
                    await self.route(study, queue)  # a part that closed meanwhile is routed in the next round
                else:
                    logger.info("study %s closed again with nothing new; its analysis stands", uid)
            self._later.pop(uid, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # the study stays in the spool: a restart's recovery analyses it
            self._later.pop(uid, None)
            logger.exception("study %s: routing after its analysis in flight failed", uid)

    def _with_order(self, study: Study) -> Study:
        """The study with its active order's priority, reason for exam and procedure (the HL7 feed or the
        worklist); as it is when there is none or the system of record cannot be read (the images' own priority
        still applies). Blocking."""
        assert self.orders is not None
        try:
            order = self.orders.for_study(study.accession_number, study.study_instance_uid)
        except Exception as exc:
            logger.warning(
                "study %s: its order could not be read (%s)", study.study_instance_uid, type(exc).__name__
            )
            return study
        if order is None:
            return study
        return dataclasses.replace(
            study,
            order_priority=order.priority,
            order_reason=order.reason,
            order_procedure_code=order.procedure_code,
        )

    async def route(self, study: Study, queue: JobQueue | ClusterQueue) -> None:
        """Route ``study`` and queue its jobs (call it through ``_route_in_turn`` while intake runs)."""
        # A study analysed before is re-read from the spool (its headers): after its last completion is
        # written, and in the executor.
        await self.tracker.settled(study.study_instance_uid)
        loop = asyncio.get_running_loop()
        arrived = study
        study = await loop.run_in_executor(self.executor, self.tracker.as_it_stands, study)
        reopened = study is not arrived
        if self.orders is not None:
            study = await loop.run_in_executor(self.executor, self._with_order, study)
        decision = self.router.route(study)
        self.events.study_routed(
            RoutedStudy(
                study_uid=study.study_instance_uid,
                calling_ae=study.calling_ae,
                priority=study_priority(study).name,
                instances=study.instance_count,
                series=len(study.series),
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
                accession_number=study.accession_number,
            ),
            [
                QueuedJob(
                    job_id=job_id(
                        study.study_instance_uid, job.series.series_instance_uid, job.pipeline.name
                    ),
                    study_uid=study.study_instance_uid,
                    series_uid=job.series.series_instance_uid,
                    pipeline=job.pipeline.name,
                    priority=job.priority.name,
                    calling_ae=study.calling_ae,
                    cost=max(1, len(job.series.instances)),
                    deadline_s=queue.settings.deadline_s.get(job.priority.name, 3600.0),
                )
                for job in decision.jobs
            ],
            skipped=len(decision.skipped),
        )
        for skip in decision.skipped:
            self.events.series_skipped(
                study=study.study_instance_uid,
                series=skip.series_instance_uid,
                reason=skip.reason,
                modality=skip.modality,
            )
        if isinstance(queue, ClusterQueue):  # the cluster's queue opens the study where it is analysed
            queue.routed(study, decision, reopened=reopened)
            return
        self.tracker.open(study, jobs=len(decision.jobs), skipped=len(decision.skipped))
        for job in decision.jobs:
            queue.put(job)


def _joined(earlier: Study, later: Study) -> Study:
    """Two closings of one study waiting for the same routing: the later, received since the earlier began."""
    return dataclasses.replace(
        later, first_received_at=min(earlier.first_received_at, later.first_received_at)
    )
