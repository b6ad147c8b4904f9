"""Durable result delivery: one queue per destination, retries with backoff, a dead-letter area.

A delivery job (destination + result files) is a JSON file under ``<data_dir>/outbox/pending/<destination>/``,
written durably before the study is reported done, so results are sent even across a crash. Each destination
has a task on the gateway's event loop that sends up to ``MAX_JOBS_PER_ASSOCIATION`` jobs per association (the
blocking C-STORE and the job files in the executor), STAT results first, otherwise oldest first - and never a
job before an earlier job of the same study (a superseding SR stays behind the one it replaces). A failing
destination waits with exponential backoff and never holds up the others. After ``max_attempts`` a job moves to
``outbox/dead/`` and is reported; ``gateway resend`` (or POST /admin/resend) moves dead jobs back to pending.

A job queued in this process wakes its destination at once; jobs another process put in the pending area (the
``gateway resend`` command) are found by a rescan every ``RESCAN_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from clients.dicom_scu import OpenAssociations, store_datasets
from gateway.config.settings import DeliverySettings, Peer
from gateway.core.durable import atomic_write
from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff

logger = logging.getLogger(__name__)

STOP_GRACE_S = 2.0  # how long a stop lets the sends in flight finish before it aborts them
RESCAN_S = 1.0  # how often the pending area is read again for jobs written by another process
# The outbox's own threads for job files and C-STORE (never queued behind analysis work). A destination sends
# one association at a time per lane (its STAT lane beside it), so with threads for every destination's lanes
# none waits for another's send (a STAT PACS behind five routine ones did, with four); threads are only started
# as sends need them.
IO_THREADS = 32
MAX_JOBS_PER_ASSOCIATION = 16
_RANK = {"STAT": 0, "URGENT": 1, "ROUTINE": 2}


@dataclass
class DeliveryJob:
    job_id: str
    study_uid: str
    destination: str  # AET@host:port
    paths: list[str]
    created_at: float
    attempts: int = 0
    next_try_at: float = 0.0
    last_error: str = ""
    priority: str = "ROUTINE"  # STAT | URGENT | ROUTINE: STAT results overtake other studies' results

    @property
    def peer(self) -> Peer:
        return Peer.parse(self.destination)


def _folder_name(destination: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", destination)


class Outbox:
    def __init__(
        self,
        root: Path,
        settings: DeliverySettings,
        *,
        calling_ae: str,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.dead_dir = self.root / "dead"
        for folder in (self.pending_dir, self.dead_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.settings = settings
        self.calling_ae = calling_ae
        self.on_event = on_event or (lambda *a, **k: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        # destination folder -> "look again", one event per lane (loop-owned)
        self._wake: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}
        self._in_flight: dict[str, set[str]] = {}  # destination folder -> job ids being sent (loop-owned)
        self._found = asyncio.Event()  # a destination folder may have appeared (loop-owned)
        self._failing: dict[str, str] = {}  # destination -> last error, while it keeps failing
        self._failing_lock = threading.Lock()  # written in the outbox's threads, read by HTTP threads
        self._io: ThreadPoolExecutor | None = None
        self._open = OpenAssociations()  # the sends in flight: aborted when the outbox stops

    @property
    def failing(self) -> dict[str, str]:
        """A copy of the failing destinations and their last error, taken under the lock."""
        with self._failing_lock:
            return dict(self._failing)

    # -- queue --------------------------------------------------------------------------------------------

    def enqueue(
        self, destination: Peer, study_uid: str, paths: list[Path], *, priority: str = "ROUTINE"
    ) -> DeliveryJob:
        job = DeliveryJob(
            job_id=f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}",
            study_uid=study_uid,
            destination=str(destination),
            paths=[str(p) for p in paths],
            created_at=time.time(),
            priority=priority if priority in _RANK else "ROUTINE",
        )
        self._write(self.pending_dir / _folder_name(job.destination), job)
        self.on_event(
            "delivery_queued",
            study=study_uid,
            job=job.job_id,
            destination=job.destination,
            objects=len(paths),
        )
        self._notify(_folder_name(job.destination))
        return job

    def _notify(self, folder_name: str) -> None:
        """Wake the destination's task (from any thread); nothing when the outbox is not running here."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def wake() -> None:
            if folder_name in self._wake:
                for event in self._wake[folder_name]:
                    event.set()
            else:
                self._found.set()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the job is on disk
            loop.call_soon_threadsafe(wake)

    def _write(self, folder: Path, job: DeliveryJob) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(folder / f"{job.job_id}.json", json.dumps(asdict(job)).encode())

    @staticmethod
    def _read(path: Path) -> DeliveryJob | None:
        try:
            return DeliveryJob(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def pending(self) -> dict[str, int]:
        return {d.name: len(list(d.glob("*.json"))) for d in sorted(self.pending_dir.iterdir()) if d.is_dir()}

    def pending_for_study(self, study_uid: str) -> int:
        """How many of the study's delivery jobs are still waiting (blocking: reads the job files)."""
        return sum(
            1
            for folder in self.pending_dir.iterdir()
            if folder.is_dir()
            for job in self._jobs(folder)
            if job.study_uid == study_uid
        )

    def dead_letters(self) -> list[DeliveryJob]:
        return [j for p in sorted(self.dead_dir.glob("*.json")) if (j := self._read(p)) is not None]

    def resend(self, job_ids: list[str] | None = None) -> list[str]:
        """Move dead-letter jobs (all for ``None``, else only the given ids: ``[]`` moves none) back to their
        pending queue with a fresh retry budget."""
        moved = []
        for path in sorted(self.dead_dir.glob("*.json")):
            job = self._read(path)
            if job is None or (job_ids is not None and job.job_id not in job_ids):
                continue
            job.attempts, job.next_try_at, job.last_error = 0, 0.0, ""
            self._write(self.pending_dir / _folder_name(job.destination), job)
            path.unlink()
            moved.append(job.job_id)
            self._notify(_folder_name(job.destination))
        return moved

    # -- workers -------------------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="delivery-io")
        return self._io

    async def submit(
        self, destination: Peer, study_uid: str, paths: list[Path], *, priority: str = "ROUTINE"
    ) -> DeliveryJob:
        """``enqueue`` from the event loop: the job file is written in the outbox's own threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor(), lambda: self.enqueue(destination, study_uid, paths, priority=priority)
        )

    async def run(self) -> None:
        """Deliver until cancelled: one task per destination folder, on this event loop; the blocking parts
        (job files, C-STORE) in the outbox's own threads, so results never wait behind analysis work."""
        self._loop = loop = asyncio.get_running_loop()
        executor = self._executor()
        self._open = OpenAssociations()
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                self._found.clear()
                for name in await loop.run_in_executor(executor, self._destinations):
                    if name not in tasks or tasks[name].done():
                        self._wake[name] = (asyncio.Event(), asyncio.Event())
                        self._in_flight[name] = set()
                        tasks[name] = asyncio.create_task(
                            self._deliver(self.pending_dir / name, executor, lane=0), name=f"outbox-{name}"
                        )
                        tasks[f"{name} STAT"] = asyncio.create_task(
                            self._deliver(self.pending_dir / name, executor, lane=1),
                            name=f"outbox-{name}-stat",
                        )
                await _wait(self._found, RESCAN_S)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self._loop = None
            # A send in flight may finish for STOP_GRACE_S, then it is aborted (a hung destination would hold the
            # process until its DIMSE timeout); an aborted job stays pending and goes again at the next start.
            await asyncio.to_thread(self._open.close, STOP_GRACE_S)
            executor.shutdown(wait=False)
            self._io = None

    def _destinations(self) -> list[str]:
        return [d.name for d in sorted(self.pending_dir.iterdir()) if d.is_dir()]

    def _jobs(self, folder: Path) -> list[DeliveryJob]:
        return [j for p in sorted(folder.glob("*.json")) if (j := self._read(p)) is not None]

    async def _deliver(self, folder: Path, executor: ThreadPoolExecutor, *, lane: int) -> None:
        """One destination's lane: lane 0 sends every job, in batches (STAT first); lane 1 sends only STAT
        results (with any earlier job of their study), on an association of its own, while lane 0 is busy - a STAT
        result never waits for a batch of routine results already on its way."""
        loop = asyncio.get_running_loop()
        wake, in_flight = self._wake[folder.name][lane], self._in_flight[folder.name]
        while True:
            wake.clear()
            listed = await loop.run_in_executor(executor, self._jobs, folder)
            jobs = [j for j in listed if j.job_id not in in_flight]
            if lane == 1:  # only while lane 0 is sending: an idle lane 0 takes STAT jobs first itself
                urgent = {j.study_uid for j in jobs if j.priority == "STAT"}
                busy = {j.study_uid for j in listed if j.job_id in in_flight}  # their order comes first
                jobs = [j for j in jobs if j.study_uid in urgent - busy] if in_flight else []
            if not jobs:
                await _wait(wake, RESCAN_S)
                continue
            wait = max(j.next_try_at for j in jobs) - time.time()
            if wait > 0:  # the destination is backing off after a failure
                await _wait(wake, min(wait, RESCAN_S))
                continue
            batch = next_batch(jobs)
            ids = {j.job_id for j in batch}
            in_flight |= ids  # taken here, on the loop: the other lane passes them over
            try:
                await loop.run_in_executor(executor, self._attempt, folder, batch)
            finally:
                in_flight -= ids
                for event in self._wake[folder.name]:
                    event.set()  # what the other lane passed over may be free now

    def _attempt(self, folder: Path, batch: list[DeliveryJob]) -> None:
        """Send the jobs over one association; each job succeeds or fails on its own objects. A job the other lane
        delivered since this one listed them (its file gone) is not sent again."""
        batch = [job for job in batch if (folder / f"{job.job_id}.json").exists()]
        if not batch:
            return
        started = time.perf_counter()
        failed: dict[str, str] = {}  # job id -> reason
        try:
            datasets = {job.job_id: [pydicom.dcmread(p) for p in job.paths] for job in batch}
            report = store_datasets(
                [ds for group in datasets.values() for ds in group],
                batch[0].peer,
                calling_ae=self.calling_ae,
                timeout_s=self.settings.timeout_s,
                tracked=self._open,
            )
            refused = dict(report.failed)
            for job in batch:
                reasons = [
                    refused[str(ds.SOPInstanceUID)]
                    for ds in datasets[job.job_id]
                    if str(ds.SOPInstanceUID) in refused
                ]
                if reasons:
                    failed[job.job_id] = f"{job.destination} refused {len(reasons)} object(s): {reasons[0]}"
        except (DeliveryError, OSError, ValueError) as exc:
            failed = {job.job_id: str(exc) for job in batch}
        for job in batch:
            if job.job_id in failed:
                self._failed(folder, job, failed[job.job_id])
            else:
                self._delivered(folder, job, started)

    def _failed(self, folder: Path, job: DeliveryJob, error: str) -> None:
        job.attempts += 1
        job.last_error = error[:500]
        with self._failing_lock:
            self._failing[job.destination] = job.last_error
        if job.attempts >= self.settings.max_attempts:
            self._write(self.dead_dir, job)
            (folder / f"{job.job_id}.json").unlink(missing_ok=True)
            logger.error(
                "delivery job %s to %s moved to dead letters after %d tries: %s",
                job.job_id,
                job.destination,
                job.attempts,
                job.last_error,
            )
            self.on_event(
                "delivery_dead_letter",
                study=job.study_uid,
                job=job.job_id,
                destination=job.destination,
                reason=job.last_error,
            )
            return
        delay = Backoff(self.settings.retry_base_s, self.settings.retry_max_s).delay(job.attempts)
        job.next_try_at = time.time() + delay
        self._write(folder, job)
        logger.warning(
            "delivery to %s failed (try %d/%d), next in %.0fs: %s",
            job.destination,
            job.attempts,
            self.settings.max_attempts,
            delay,
            job.last_error,
        )

    def _delivered(self, folder: Path, job: DeliveryJob, started: float) -> None:
        (folder / f"{job.job_id}.json").unlink(missing_ok=True)
        with self._failing_lock:
            self._failing.pop(job.destination, None)
        self.on_event(
            "results_delivered",
            study=job.study_uid,
            job=job.job_id,
            destination=job.destination,
            objects=len(job.paths),
            attempts=job.attempts + 1,
            deliver_ms=round((time.perf_counter() - started) * 1000.0, 1),
            queued_ms=round((time.time() - job.created_at) * 1000.0, 1),
            priority=job.priority,
        )


def next_batch(jobs: list[DeliveryJob], limit: int = MAX_JOBS_PER_ASSOCIATION) -> list[DeliveryJob]:
    """The jobs to send next over one association: STAT before URGENT before ROUTINE, oldest first within a
    class, and a job only together with or after every earlier job of its study."""
    earlier: dict[str, list[DeliveryJob]] = {}
    for job in sorted(jobs, key=lambda j: j.created_at):
        earlier.setdefault(job.study_uid, []).append(job)
    chosen: list[DeliveryJob] = []
    taken: set[str] = set()
    for job in sorted(jobs, key=lambda j: (_RANK.get(j.priority, 2), j.created_at)):
        if len(chosen) >= limit:
            break
        for prior in earlier[
            job.study_uid
        ]:  # the study's jobs in arrival order, up to and including this one
            if prior.job_id not in taken and len(chosen) < limit:
                chosen.append(prior)
                taken.add(prior.job_id)
            if prior is job:
                break
    return chosen


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` is set or ``timeout_s`` has passed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
