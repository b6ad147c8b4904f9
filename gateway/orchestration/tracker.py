"""The study tracker: owns every study from "complete" to "done".

It re-opens a study that was analysed before (late instances, a re-send: the whole study is analysed again as it
stands in the spool; intake waits for an analysis still in flight to finish before it re-opens its study), counts the series still outstanding, collects what each series produced (result UIDs, the
reports for the RIS, STAT, header repairs, timings) and, when the last one is done, completes the study: FHIR /
HL7 reports dispatched, the ``study_done`` event recorded, then the spool's processed marker written. Only the
event loop calls it.

The marker is written on the audit's writer thread, after the ``study_done`` event is on disk: a crash between the
two leaves a study audited as done and not marked, which the restarted gateway analyses again (deterministic
result UIDs: the same objects) - never a study marked processed that the audit never saw finish. Until its marker
is written a study is "settling", and intake waits for that before it re-opens the study.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.core.domain import Study, timing_log_fields
from gateway.delivery.store import ResultStore
from gateway.ingest.assembler import assemble_study
from gateway.ingest.spool import Spool
from gateway.ops.events import EventSink
from gateway.orchestration.routing import study_priority
from gateway.reporting.dispatcher import ReportDispatcher
from gateway.results.content import SeriesReport

logger = logging.getLogger(__name__)


@dataclass
class StudyProgress:
    study: Study
    completed_at: float
    outstanding: int
    findings: int = 0
    stat: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)
    reports: list[SeriesReport] = field(default_factory=list)
    sr_by_series: dict[str, str] = field(default_factory=dict)  # "<series>/<pipeline>" -> SR SOP Instance UID
    notified: set[str] = field(default_factory=set)  # "<series>/<pipeline>" whose STAT event went out
    objects_by_series: dict[str, list[str]] = field(default_factory=dict)  # every result UID per key
    repairs: set[tuple[str, str]] = field(default_factory=set)  # header hygiene: (attribute, action)
    failed: int = 0  # routed series that could not be analysed (each got a failure SR where possible)
    skipped: int = 0  # series no pipeline applies to

    def add_timings(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class StudyTracker:
    def __init__(
        self, spool: Spool, results: ResultStore, reports: ReportDispatcher, events: EventSink
    ) -> None:
        self.spool = spool
        self.results = results
        self.reports = reports
        self.events = events
        self._progress: dict[str, StudyProgress] = {}
        self._settling: dict[str, asyncio.Future[None]] = {}  # study -> its marker still being written
        self._idle_waiters: dict[str, list[asyncio.Future[None]]] = {}  # study -> who waits for its finish
        # Cluster mode: asked before a study is completed; False when another node took the study over.
        self.completion_guard: Callable[[str], Awaitable[bool]] | None = None

    def __len__(self) -> int:
        return len(self._progress)

    def get(self, study_uid: str) -> StudyProgress | None:
        return self._progress.get(study_uid)

    def busy(self, study_uid: str) -> bool:
        """Whether the study is being analysed here (opened, not yet finished)."""
        return study_uid in self._progress

    async def idle(self, study_uid: str) -> None:
        """Wait until the study's analysis in flight (if any) is finished and its processed marker written."""
        while study_uid in self._progress:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.setdefault(study_uid, []).append(waiter)
            await waiter
        await self.settled(study_uid)

    async def settled(self, study_uid: str) -> None:
        """Wait until the study's last completion (its processed marker) is written."""
        marking = self._settling.get(study_uid)
        if marking is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(marking)

    async def drain(self) -> None:
        """Wait for every processed marker still being written (a stopping gateway)."""
        await asyncio.gather(*list(self._settling.values()), return_exceptions=True)

    def as_it_stands(self, study: Study) -> Study:
        """The study to analyse: a study analysed before is re-assembled from everything the spool holds
        (headers read from disk: call it in an executor, after ``settled``)."""
        if not self.spool.processed_instances(study.study_instance_uid):
            return study
        return dataclasses.replace(
            assemble_study(
                self.spool.study_records(study.study_instance_uid),
                calling_ae=study.calling_ae,
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
            ),
            incomplete_reason=study.incomplete_reason,
        )

    def open(self, study: Study, *, jobs: int, skipped: int) -> StudyProgress:
        """Start tracking ``study`` with ``jobs`` series to analyse; with none it is done at once."""
        progress = StudyProgress(study=study, completed_at=time.time(), outstanding=jobs, skipped=skipped)
        progress.timings["receive"] = study.last_received_at - study.first_received_at
        progress.timings["wait_complete"] = progress.completed_at - study.last_received_at
        self._progress[study.study_instance_uid] = progress
        if jobs == 0:
            self.finish(study.study_instance_uid)
        return progress

    def job_done(self, study_uid: str) -> None:
        progress = self._progress.get(study_uid)
        if progress is None:
            return
        progress.outstanding -= 1
        if progress.outstanding <= 0:
            self.finish(study_uid)

    def finish(self, study_uid: str) -> None:
        progress = self._progress.pop(study_uid)
        guard = self.completion_guard
        marking: asyncio.Future[None] = (
            self._complete(study_uid, progress)
            if guard is None
            else asyncio.ensure_future(self._complete_if_allowed(guard, study_uid, progress))
        )
        self._settling[study_uid] = marking

        def settled(done: asyncio.Future[None]) -> None:
            if self._settling.get(study_uid) is done:
                del self._settling[study_uid]
            if not done.cancelled() and done.exception() is not None:
                logger.error("study %s: processed marker not written: %r", study_uid, done.exception())

        marking.add_done_callback(settled)
        for waiter in self._idle_waiters.pop(study_uid, []):
            if not waiter.done():
                waiter.set_result(None)

    async def _complete_if_allowed(
        self, guard: Callable[[str], Awaitable[bool]], study_uid: str, progress: StudyProgress
    ) -> None:
        if await guard(study_uid):
            await self._complete(study_uid, progress)

    def _complete(self, study_uid: str, progress: StudyProgress) -> asyncio.Future[None]:
        """Reports dispatched, ``study_done`` recorded, then (on the audit's thread) the processed marker."""
        if progress.reports:  # written and sent in the background: never a cost to the study's completion
            self.reports.submit(
                self.results.root / study_uid, progress.reports, stat=progress.stat, results=progress.results
            )
        self.reports.study_finished(study_uid, self.results.root / study_uid, progress.results)
        self._study_done(study_uid, progress)
        return asyncio.wrap_future(
            self.events.after_recorded(lambda: self._mark_processed(study_uid, progress))
        )

    def _mark_processed(self, study_uid: str, progress: StudyProgress) -> None:
        study = progress.study
        try:
            self.spool.mark_processed(
                study_uid,
                (r.sop_instance_uid for s in study.series for r in s.instances),
                progress.sr_by_series,
                progress.objects_by_series,
            )
        except OSError as exc:  # results are stored and queued; only a restart would analyse the study again
            logger.error(
                "study %s: processed marker not written (%s); a restart re-analyses it", study_uid, exc
            )

    def _study_done(self, study_uid: str, progress: StudyProgress) -> None:
        study = progress.study
        total = time.time() - study.last_received_at
        fields = {
            "study": study_uid,
            "calling_ae": study.calling_ae,
            "series": len(study.series),
            "instances": study.instance_count,
            "findings": progress.findings,
            "stat": progress.stat,
            "failed": progress.failed,
            "skipped": progress.skipped,
            "possibly_incomplete": study.incomplete_reason,
            "results": progress.results,
            "last_instance_to_done_ms": round(total * 1000.0, 1),
            **timing_log_fields(progress.timings),
        }
        self.events.study_done(
            fields,
            repairs=progress.repairs,
            priority=study_priority(study).name,
            waits={stage: progress.timings.get(stage, 0.0) for stage in ("receive", "wait_complete")},
        )
