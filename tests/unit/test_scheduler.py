"""The scheduler: STAT first, weighted fair share per sending PACS within a class, ageing, STAT findings."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from gateway.config.settings import SchedulingSettings, load_settings
from gateway.core.domain import InstanceRecord, Priority, Series, Study
from gateway.orchestration.routing import InferenceJob
from gateway.orchestration.scheduler import JobQueue

PIPELINE = load_settings().pipelines[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_counter = iter(range(1, 1_000_000))


def job(
    pacs: str, priority: Priority = Priority.ROUTINE, slices: int = 10, at: float = 1000.0
) -> InferenceJob:
    n = next(_counter)
    study, series = f"1.2.{n}", f"1.2.{n}.1"
    records = tuple(
        InstanceRecord(
            sop_instance_uid=f"{series}.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study,
            series_instance_uid=series,
            path=Path("/nonexistent"),
            calling_ae=pacs,
            received_at=at,
            modality="CT",
        )
        for i in range(1, slices + 1)
    )
    s = Series(
        series_instance_uid=series, modality="CT", body_part="HEAD", series_description="", instances=records
    )
    st = Study(
        study_instance_uid=study,
        calling_ae=pacs,
        study_description="",
        series=(s,),
        first_received_at=at,
        last_received_at=at,
    )
    return InferenceJob(study=st, series=s, pipeline=PIPELINE, priority=priority, created_at=at)


def drain(queue: JobQueue, count: int) -> list[InferenceJob]:
    out = []
    for _ in range(count):
        j = queue.pop_next()
        assert j is not None
        out.append(j)
    return out


def test_a_small_site_is_not_starved_by_another_sites_bulk_backfill() -> None:
    queue = JobQueue(clock=Clock())
    for _ in range(40):
        queue.put(job("BACKFILL"))
    for _ in range(5):
        queue.put(job("CLINIC"))
    first_ten = Counter(j.study.calling_ae for j in drain(queue, 10))
    assert first_ten["CLINIC"] == 5  # FIFO would have served 40 backfill studies first


def test_weights_set_the_share_and_cost_is_counted_in_slices() -> None:
    queue = JobQueue(SchedulingSettings(pacs_weights={"MAIN": 3.0}), clock=Clock())
    for _ in range(60):
        queue.put(job("MAIN"))
        queue.put(job("SMALL"))
    served = Counter(j.study.calling_ae for j in drain(queue, 40))
    assert served == {"MAIN": 30, "SMALL": 10}

    queue = JobQueue(clock=Clock())
    for _ in range(20):
        queue.put(job("BIG", slices=200))
        queue.put(job("TINY", slices=20))
    served = Counter(j.study.calling_ae for j in drain(queue, 22))
    assert served == {"BIG": 2, "TINY": 20}  # equal slices, not equal studies


def test_stat_goes_first_whoever_sent_it_and_a_stat_finding_raises_the_rest_of_its_study() -> None:
    queue = JobQueue(clock=Clock())
    for _ in range(10):
        queue.put(job("BACKFILL"))
    stat = job("CLINIC", Priority.STAT)
    queue.put(stat)
    assert queue.pop_next() is stat
    routine = job("CLINIC")
    queue.put(routine)
    assert queue.mark_stat(routine.study.study_instance_uid) == 1
    raised = queue.pop_next()
    assert raised is not None and raised.series is routine.series and raised.priority is Priority.STAT
    assert queue.depth_by_priority() == {"STAT": 0, "URGENT": 0, "ROUTINE": 10}
    assert queue.depth_by_pacs() == {"BACKFILL": 10}


def test_waiting_routine_work_moves_up_one_class_as_its_deadline_approaches_but_never_to_stat() -> None:
    clock = Clock()
    settings = SchedulingSettings(deadline_s={"STAT": 60.0, "URGENT": 300.0, "ROUTINE": 1000.0})
    queue = JobQueue(settings, clock=clock)
    old = job("SITE", Priority.ROUTINE, at=clock.now)
    queue.put(old)
    clock.now += 100.0
    urgent = job("SITE", Priority.URGENT, at=clock.now)
    queue.put(urgent)
    assert queue.pop_next() is urgent  # 100 s of 1000 s: still routine
    queue.put(urgent)
    clock.now += 450.0  # 550 s >= half the routine deadline: urgent now, and older than the urgent job
    assert queue.effective_priority(old) is Priority.URGENT
    assert queue.pop_next() is old
    clock.now += 10_000.0
    queue.put(old)
    assert queue.effective_priority(old) is Priority.URGENT


def test_an_idle_site_does_not_bank_credit() -> None:
    queue = JobQueue(clock=Clock())
    for _ in range(50):
        queue.put(job("BUSY"))
    drain(queue, 40)  # BUSY alone for a while
    for _ in range(10):
        queue.put(job("LATE"))
    served = Counter(j.study.calling_ae for j in drain(queue, 10))
    assert served == {"BUSY": 5, "LATE": 5}  # shares from now on, not 40 jobs of catch-up


def test_get_waits_for_work_and_join_waits_for_task_done() -> None:
    async def run() -> list[str]:
        queue = JobQueue()
        events: list[str] = []

        async def worker() -> None:
            j = await queue.get()
            events.append(j.study.calling_ae)
            queue.task_done()

        task = asyncio.create_task(worker())
        await asyncio.sleep(0.01)
        assert not events
        queue.put(job("SITE"))
        await asyncio.wait_for(queue.join(), timeout=2.0)
        await task
        return events

    assert asyncio.run(run()) == ["SITE"]


def test_a_reserved_stat_worker_takes_only_stat_work_and_general_workers_still_get_routine() -> None:
    async def run() -> tuple[list[str], list[str]]:
        queue = JobQueue(clock=Clock())
        stat_taken: list[str] = []
        general_taken: list[str] = []

        async def worker(stat_only: bool, taken: list[str]) -> None:
            while True:
                j = await queue.get(stat_only=stat_only)
                taken.append(j.priority.name)
                queue.task_done()

        tasks = [
            asyncio.create_task(worker(True, stat_taken)),
            asyncio.create_task(worker(False, general_taken)),
        ]
        queue.put(job("BACKFILL"))
        queue.put(job("BACKFILL"))
        await asyncio.wait_for(queue.join(), timeout=2.0)
        queue.put(job("CLINIC", Priority.STAT))
        await asyncio.wait_for(queue.join(), timeout=2.0)
        for t in tasks:
            t.cancel()
        return stat_taken, general_taken

    stat_taken, general_taken = asyncio.run(run())
    assert "ROUTINE" not in stat_taken  # the reserve never serves routine work
    assert general_taken.count("ROUTINE") == 2
    assert stat_taken.count("STAT") + general_taken.count("STAT") == 1  # the STAT job was served once


def test_pop_next_stat_only_leaves_routine_work_waiting() -> None:
    queue = JobQueue(clock=Clock())
    queue.put(job("BACKFILL"))
    assert queue.pop_next(stat_only=True) is None
    stat = job("CLINIC", Priority.STAT)
    queue.put(stat)
    assert queue.pop_next(stat_only=True) is stat
    assert queue.qsize() == 1
