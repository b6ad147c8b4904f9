"""The system of record's writer: what the flow reports (instances stored, studies routed, jobs started, every
audit event) is queued by the caller's thread and written by one writer thread, every queued write of a moment
in one transaction - so neither a C-STORE acknowledgement nor the event loop ever waits for the database.

The spool stays the source of truth: when the database cannot be written (PostgreSQL restarting, a locked
file), the writes wait in memory, in order, and are retried with backoff; the gateway keeps acknowledging and
analysing. ``/health`` shows the backlog and the last error.

Study states follow ``states.ALLOWED``; each move is a ``study_transitions`` row. Audit events also move them:
``study_done`` -> results stored (or failed when every routed series failed), the last ``results_delivered`` ->
delivered, a ``delivery_dead_letter`` -> failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.core.domain import InstanceRecord
from gateway.core.retry import Backoff
from gateway.database.jobs import QueuedJob, RoutedStudy
from gateway.database.writes import EventWrites, StudyWrites

logger = logging.getLogger(__name__)

Write = Callable[[Connection], None]


class AfterCommit:
    """A callback run on the writer thread once every write reported before it is committed."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback


# Instances are grouped (one multi-row insert per run of them); an Event is set, an AfterCommit called, once what
# precedes it is committed - and neither waits for the group commit's linger.
Item = Write | InstanceRecord | threading.Event | AfterCommit
MAX_BACKLOG = 1_000_000
RETRY = Backoff(0.5, 10.0)
BATCH_LINGER_S = 0.2  # how long a first write waits for others to share its commit


class Recorder:
    def __init__(self, engine: Engine, node: str, *, claims_jobs: bool = False) -> None:
        self.engine = engine
        self.node = node
        self._studies = StudyWrites(node, claims_jobs=claims_jobs)
        self._events = EventWrites(self._studies)
        self._pending: list[Item] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.written = 0  # writes committed (for tests and /metrics)
        self.dropped = 0  # writes that failed for a reason other than the database being unreachable

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued (bounded by ``timeout_s`` when the database is down), then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error(
                    "system of record: %d write(s) not written at stop: %s", self.backlog, self.last_error
                )
            self._thread = None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the writer thread) as soon as everything reported so far is committed, without
        the group commit's wait: a study's jobs are then claimable at once, by any node."""
        self._put(AfterCommit(callback))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (tests, ``gateway`` commands); False on timeout."""
        done = threading.Event()
        self._put(done)
        return done.wait(timeout_s)

    # -- what the flow reports (any thread; never blocks on the database) -------------------------------------

    def instance_stored(self, record: InstanceRecord) -> None:
        self._put(record)

    def study_routed(self, study: RoutedStudy, jobs: Sequence[QueuedJob], *, skipped: int, at: float) -> None:
        self._put(lambda c: self._studies.routed(c, study, jobs, skipped, at))

    def job_started(self, job: str, study_uid: str, attempts: int, at: float) -> None:
        self._put(lambda c: self._studies.started(c, job, study_uid, attempts, at))

    def audit_event(self, event: Mapping[str, Any]) -> None:
        fields = dict(event)
        self._put(lambda c: self._events.event(c, fields))

    def _put(self, write: Item) -> None:
        with self._wake:
            if len(self._pending) >= MAX_BACKLOG:
                self._pending.pop(0)
                self.dropped += 1
            self._pending.append(write)
            self._wake.notify()

    # -- the writer thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                linger = not self._closing and not any(
                    isinstance(i, threading.Event | AfterCommit) for i in self._pending
                )
            if linger:
                # Group commit: what arrives in the next moment shares this transaction (and its fsync), so a
                # busy receiver costs a few commits a second, not one per instance (a flush does not wait).
                time.sleep(BATCH_LINGER_S)
            with self._wake:
                batch, self._pending = self._pending, []
            try:
                self._commit(batch)
                failures = 0
            except (OperationalError, DBAPIError) as exc:
                if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                    self._one_by_one(batch)
                    continue
                with self._wake:  # back in front, in order
                    self._pending[:0] = batch
                if not self.last_error:
                    logger.error(
                        "system of record cannot be written (%s): %d write(s) held, retried",
                        type(exc).__name__,
                        self.backlog,
                    )
                self.last_error = str(exc.orig if exc.orig is not None else exc).splitlines()[0][:300]
                failures += 1
                if self._closing and failures > 3:
                    return
                time.sleep(RETRY.delay(failures))

    def _commit(self, batch: list[Item]) -> None:
        """Every write of the batch in order, in one transaction (runs of instances as one insert each)."""
        committed: list[threading.Event | AfterCommit] = []
        with self.engine.begin() as connection:
            run: list[InstanceRecord] = []
            for item in batch:
                if isinstance(item, threading.Event | AfterCommit):
                    committed.append(item)
                    continue
                if isinstance(item, InstanceRecord):
                    run.append(item)
                    continue
                if run:
                    self._studies.stored(connection, run)
                    run = []
                item(connection)
            if run:
                self._studies.stored(connection, run)
        self.written += len(batch) - len(committed)
        if self.last_error:
            logger.info("system of record writable again: held writes written")
            self.last_error = ""
        for done in committed:
            _signal(done)

    def _one_by_one(self, batch: list[Item]) -> None:
        """A batch failed for a reason other than the database being unreachable: keep every write that works."""
        for item in batch:
            try:
                if isinstance(item, threading.Event | AfterCommit):
                    _signal(item)
                    continue
                with self.engine.begin() as connection:
                    if isinstance(item, InstanceRecord):
                        self._studies.stored(connection, [item])
                    else:
                        item(connection)
                self.written += 1
            except Exception as exc:
                self.dropped += 1
                logger.error("system of record: a write was refused and dropped: %s", type(exc).__name__)
                logger.debug("refused write", exc_info=True)


def _signal(done: threading.Event | AfterCommit) -> None:
    if isinstance(done, threading.Event):
        done.set()
        return
    try:
        done.callback()
    except Exception:  # a callback's failure is its own; the writes are committed
        logger.exception("system of record: a commit callback failed")
