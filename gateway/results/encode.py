"""Encoding a series' results (SR, GSPS, SEG) - in worker processes, off the gateway's interpreter lock.

Building the DICOM objects is pure Python (highdicom over pydicom): about half a second per 24-slice head CT on
a small VM, the largest CPU cost per study. Run in the gateway process it holds the interpreter lock that the
receiver, decode and preprocessing also need, so the whole gateway tops out at one core. ``ResultEncoder``
sends the work to a pool of ``encode_processes`` spawned processes instead, awaited by the event loop (0: in the
gateway's thread pool). A pool that breaks (a worker killed) is replaced and the series encoded in the thread
pool, so a result is never lost to it.

STAT series have a process of their own, at the gateway's own CPU priority, while the routine pool runs at a
lower one (``routine_nice``, as ``nice``): on a machine whose cores the routine flood keeps busy, a STAT study's
results are not encoded behind routine ones, nor at their share of the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.results.common import SeriesAnalysis
from gateway.results.content import ReportedFinding
from gateway.results.gsps import build_gsps
from gateway.results.rejection import build_rejection_note
from gateway.results.seg import build_seg
from gateway.results.sr import build_sr

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EncodedResults:
    """The result objects of one series that could be built, and why each of the others could not."""

    datasets: list[Any]  # SR first when it was built
    failures: dict[str, str]  # output ("SR", "GSPS", "SEG") -> reason, for each that raised

    def get(self, modality: str) -> Any | None:
        return next((ds for ds in self.datasets if ds.Modality == modality), None)


def encode_results(
    analysis: SeriesAnalysis,
    reported: list[ReportedFinding],
    mask: np.ndarray | None,
    previous: list[Any],
    withdrawn: Sequence[Any] = (),
) -> EncodedResults:
    """SR always; GSPS when there is something to draw; SEG when the model gave a non-empty mask; an IOCM
    rejection note (KO) withdrawing ``withdrawn``, the objects of an earlier analysis this one replaces.

    Each output is built on its own: one that raises (a highdicom constraint a source header breaks) is
    reported in ``failures`` and never prevents the others, so a SEG problem cannot cost the SR, the GSPS or
    the STAT flag of the series.
    """
    builders: list[tuple[str, Callable[[], Any]]] = [
        ("SR", lambda: build_sr(analysis, findings=reported, previous=previous)),
        ("GSPS", lambda: build_gsps(analysis, mask)),
    ]
    if mask is not None:
        builders.append(("SEG", lambda: build_seg(analysis, mask)))
    if withdrawn:
        builders.append(("KO", lambda: build_rejection_note(analysis, withdrawn)))
    datasets: list[Any] = []
    failures: dict[str, str] = {}
    for output, build in builders:
        try:
            dataset = build()
        except Exception as exc:  # any builder error is contained and reported per output
            failures[output] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if dataset is not None:
            datasets.append(dataset)
    return EncodedResults(datasets=datasets, failures=failures)


def _worker_init(level: int, nice: int = 0, parent: int | None = None) -> None:
    """``parent``: the gateway's PID, given by the gateway - not ``os.getppid()`` here, which is already 1 when the
    gateway died while this process was starting (such a worker then outlived it, seen after CI runs)."""
    from gateway.core.logs import handler_for, silence_identifier_warnings

    if nice > 0:
        os.nice(nice)  # routine work yields the CPU to STAT work and to the gateway itself

    root = logging.getLogger()
    root.handlers[:] = [handler_for(sys.stderr)]
    root.setLevel(level)
    silence_identifier_warnings()
    watched = os.getppid() if parent is None else parent
    threading.Thread(target=_exit_with_parent, args=(watched,), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """An encoder outlives nothing: when the gateway dies (even by SIGKILL) its worker processes follow."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class ResultEncoder:
    def __init__(self, processes: int, *, routine_nice: int = 10) -> None:
        self.processes = processes
        self.routine_nice = routine_nice
        self._lock = threading.Lock()
        self._pools: dict[bool, ProcessPoolExecutor] = {}  # urgent (STAT) or not -> its pool
        self.restarts = 0  # pools replaced after a worker process died

    def _executor(self, urgent: bool) -> ProcessPoolExecutor:
        with self._lock:
            pool = self._pools.get(urgent)
            if pool is None:
                # spawn, not fork: the gateway has threads (receiver, event loop) that a fork would copy mid-flight
                pool = self._pools[urgent] = ProcessPoolExecutor(
                    1 if urgent else self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(
                        logging.getLogger().getEffectiveLevel(),
                        0 if urgent else self.routine_nice,
                        os.getpid(),
                    ),
                )
            return pool

    async def encode(
        self,
        analysis: SeriesAnalysis,
        reported: list[ReportedFinding],
        mask: np.ndarray | None,
        previous: list[Any],
        withdrawn: Sequence[Any] = (),
        *,
        urgent: bool = False,
        fallback: Executor | None = None,
    ) -> EncodedResults:
        """The result datasets of one series, awaited by the event loop straight from the process pool - the
        STAT one when ``urgent`` (``encode_processes = 0``, or a broken pool: in ``fallback``, a thread pool)."""
        loop = asyncio.get_running_loop()
        args = (analysis, reported, mask, previous, list(withdrawn))
        if self.processes <= 0:
            return await loop.run_in_executor(fallback, encode_results, *args)
        pool = self._executor(urgent)
        try:
            return await loop.run_in_executor(pool, encode_results, *args)
        except BrokenProcessPool as exc:
            logger.error(
                "result encoder pool broke (%s); replacing it, this series is encoded in-process", exc
            )
            with self._lock:
                if self._pools.get(urgent) is pool:
                    del self._pools[urgent]
                    self.restarts += 1
            pool.shutdown(wait=False, cancel_futures=True)
            return await loop.run_in_executor(fallback, encode_results, *args)

    def pids(self) -> dict[str, list[int]]:
        """The encoder processes running now: "stat" and "routine"."""
        with self._lock:
            pools = dict(self._pools)
        return {
            "stat" if urgent else "routine": sorted(getattr(pool, "_processes", None) or {})
            for urgent, pool in pools.items()
        }

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
