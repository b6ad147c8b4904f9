"""Scheduling: an asyncio priority queue of inference jobs. STAT before URGENT before ROUTINE; first come,
first served within a class."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from gateway.domain import Priority
from gateway.routing import InferenceJob


class JobQueue:
    def __init__(self) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, InferenceJob]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._waiting: Counter[Priority] = Counter()

    def put(self, job: InferenceJob) -> None:
        self._waiting[job.priority] += 1
        self._queue.put_nowait((int(job.priority), next(self._seq), job))

    async def get(self) -> InferenceJob:
        _, _, job = await self._queue.get()
        self._waiting[job.priority] -= 1
        return job

    def depth_by_priority(self) -> dict[str, int]:
        return {p.name: self._waiting[p] for p in Priority}

    def task_done(self) -> None:
        self._queue.task_done()

    async def join(self) -> None:
        await self._queue.join()

    def qsize(self) -> int:
        return self._queue.qsize()
