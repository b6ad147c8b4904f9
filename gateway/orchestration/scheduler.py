"""Scheduling: which waiting inference job gets the next worker.

1. Class first: STAT before URGENT before ROUTINE. A job's class is its study's priority (the order's
   Requested Procedure Priority), raised to STAT when another series of the same study produced a STAT
   finding, and raised one class (never to STAT) once it has waited ``promote_fraction`` of its class
   deadline - so routine work cannot wait forever behind a stream of urgent studies.
2. Within a class, a weighted fair share per sending PACS (calling AE): stride scheduling over the PACS with
   work waiting. Serving a job advances its PACS's "pass" by cost / weight (cost = the series' slice count), and
   the PACS with the lowest pass goes next; a PACS that was idle joins at the current virtual time, so it
   cannot bank credit. One site's bulk backfill therefore gets its share, not the whole cluster.
3. Within one PACS and class: oldest first.

The queue is in-memory; every job in it comes from a spooled, fsynced study and is rebuilt by recovery after a
restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Callable

from gateway.config.settings import SchedulingSettings
from gateway.core.domain import Priority
from gateway.orchestration.routing import InferenceJob


class JobQueue:
    def __init__(
        self, settings: SchedulingSettings | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings or SchedulingSettings()
        self._clock = clock
        self._fifo: dict[tuple[Priority, str], deque[InferenceJob]] = {}
        self._pass: dict[str, float] = {}
        self._virtual_time = 0.0
        self._available = asyncio.Event()
        self._unfinished = 0
        self._all_done = asyncio.Event()
        self._all_done.set()

    # -- producer side ---------------------------------------------------------------------------------------

    def put(self, job: InferenceJob) -> None:
        pacs = job.study.calling_ae
        if not any(self._fifo.get((p, pacs)) for p in Priority):
            # An idle PACS joins at the current virtual time: no credit for the time it sent nothing.
            self._pass[pacs] = max(self._pass.get(pacs, 0.0), self._virtual_time)
        self._fifo.setdefault((job.priority, pacs), deque()).append(job)
        self._unfinished += 1
        self._all_done.clear()
        self._available.set()

    def mark_stat(self, study_instance_uid: str) -> int:
        """A series of this study produced a STAT finding: its waiting series become STAT jobs (also towards
        Triton). Returns how many were raised."""
        raised = 0
        for (priority, pacs), jobs in list(self._fifo.items()):
            if priority is Priority.STAT:
                continue
            keep = deque(j for j in jobs if j.study.study_instance_uid != study_instance_uid)
            moved = [j for j in jobs if j.study.study_instance_uid == study_instance_uid]
            if not moved:
                continue
            self._fifo[(priority, pacs)] = keep
            stat = self._fifo.setdefault((Priority.STAT, pacs), deque())
            stat.extend(dataclasses.replace(j, priority=Priority.STAT) for j in moved)
            self._fifo[(Priority.STAT, pacs)] = deque(sorted(stat, key=lambda j: j.created_at))
            raised += len(moved)
        return raised

    # -- consumer side ---------------------------------------------------------------------------------------

    async def get(self, *, stat_only: bool = False) -> InferenceJob:
        """The next job; ``stat_only``: wait for a STAT job (a worker held in reserve for STAT work)."""
        while True:
            job = self.pop_next(stat_only=stat_only)
            if job is not None:
                return job
            self._available.clear()
            await self._available.wait()

    def pop_next(self, *, stat_only: bool = False) -> InferenceJob | None:
        """The next job by class, fair share and age (only STAT jobs when ``stat_only``); None when none waits."""
        now = self._clock()
        best: tuple[int, float, float] | None = None
        chosen: tuple[Priority, str] | None = None
        for key, jobs in self._fifo.items():
            if not jobs or (stat_only and key[0] is not Priority.STAT):
                continue
            head = jobs[0]
            rank = (int(self.effective_priority(head, now)), self._pass.get(key[1], 0.0), head.created_at)
            if best is None or rank < best:
                best, chosen = rank, key
        if chosen is None:
            return None
        job = self._fifo[chosen].popleft()
        pacs = chosen[1]
        self._virtual_time = max(self._virtual_time, self._pass.get(pacs, 0.0))
        cost = max(1, len(job.series.instances))
        self._pass[pacs] = self._pass.get(pacs, 0.0) + cost / self.settings.weight(pacs)
        return job

    def effective_priority(self, job: InferenceJob, now: float | None = None) -> Priority:
        if job.priority is Priority.STAT:
            return Priority.STAT
        waited = (self._clock() if now is None else now) - job.created_at
        deadline = self.settings.deadline_s.get(job.priority.name, 3600.0)
        if waited >= self.settings.promote_fraction * deadline:
            return Priority(max(int(Priority.URGENT), int(job.priority) - 1))
        return job.priority

    def task_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished <= 0:
            self._unfinished = 0
            self._all_done.set()

    async def join(self) -> None:
        await self._all_done.wait()

    # -- observation -----------------------------------------------------------------------------------------

    def waiting(self) -> list[InferenceJob]:
        return [job for jobs in self._fifo.values() for job in jobs]

    def depth_by_priority(self) -> dict[str, int]:
        now = self._clock()
        counts: Counter[str] = Counter(self.effective_priority(j, now).name for j in self.waiting())
        return {p.name: counts[p.name] for p in Priority}

    def depth_by_pacs(self) -> dict[str, int]:
        return dict(Counter(j.study.calling_ae for j in self.waiting()))

    def qsize(self) -> int:
        return sum(len(jobs) for jobs in self._fifo.values())
