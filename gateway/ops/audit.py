"""The audit trail: one JSON line per analysed or skipped series, fsynced, traceable to a model version.

Holds UIDs, pipeline, model and algorithm versions, findings, results written and stage timings - no patient
names, IDs or birth dates.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)


MAX_BACKLOG = 100_000
T = TypeVar("T")


class AuditLog:
    """Append-only, fsynced. A write that fails (a full disk) never raises into the caller: the event is kept in
    memory and written, in order, before the next event once the disk takes writes again.

    By default ``record`` writes and fsyncs before it returns. A running gateway calls ``start_writer``: events
    are then written by one writer thread, in the order recorded, several per fsync when they arrive together
    (no caller - the event loop above all - waits for the disk), ``then`` runs a step after every event
    recorded so far is on disk, ``read`` sees every event recorded before it, and ``close`` writes what is left.
    """

    def __init__(
        self, path: Path, *, node: str = "", mirror: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.node = node  # this gateway's node id, in every event it records
        self.mirror = mirror  # also handed every event (the system of record's audit table); must not block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file_lock = threading.Lock()  # one writer of the file at a time (appends, a purge's rewrite)
        self._pending_lock = threading.Lock()  # the events not yet on disk; never held across a write
        self._pending: list[bytes] = []
        self._writer: ThreadPoolExecutor | None = None
        self.last_error = ""

    @property
    def backlog(self) -> int:
        """Events recorded and not yet on disk (held in memory while the trail cannot be written)."""
        return len(self._pending)

    def start_writer(self) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")

    def close(self) -> None:
        """Write every event still queued and stop the writer thread (later events are written at once)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        self.flush()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": time.time(), "event": event, **({"node": self.node} if self.node else {}), **fields}
        line = json.dumps(entry, sort_keys=True, default=str)
        if self.mirror is not None:
            self.mirror(json.loads(line))  # what the file holds, JSON types only
        with self._pending_lock:
            self._pending.append((line + "\n").encode())
        self._in_order(self.flush)

    def then(self, step: Callable[[], T]) -> Future[T]:
        """Run ``step`` once every event recorded so far is on disk (on the writer thread when one runs)."""

        def after_flush() -> T:
            self.flush()
            return step()

        return self._in_order(after_flush)

    def _in_order(self, step: Callable[[], T]) -> Future[T]:
        writer = self._writer
        if writer is not None:
            try:
                return writer.submit(step)
            except RuntimeError:  # the writer is shutting down: write here
                pass
        done: Future[T] = Future()
        try:
            done.set_result(step())
        except BaseException as exc:
            done.set_exception(exc)
        return done

    def flush(self) -> None:
        """Write every event recorded so far (on the writer's thread when one runs: see ``then``)."""
        with self._file_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self._write(b"".join(batch))
            except OSError as exc:
                if not self.last_error:
                    logger.error(
                        "audit trail %s cannot be written (%s): events kept in memory", self.path, exc
                    )
                self.last_error = str(exc)
                with (
                    self._pending_lock
                ):  # before anything recorded meanwhile, the oldest dropped past the cap
                    self._pending = (batch + self._pending)[-MAX_BACKLOG:]
                return
            if self.last_error:
                logger.info("audit trail writable again: %d held event(s) written", len(batch))
            self.last_error = ""

    def _write(self, data: bytes) -> None:
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a purge in another process rewrites the file under the same lock
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if os.fstat(fd).st_ino == current:
                break
            os.close(fd)  # the file was replaced by a purge while we waited: append to the new one
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave half a line: the held events are written whole later
                raise
        finally:
            os.close(fd)

    def count_before(self, cutoff: float) -> int:
        """How many events are older than ``cutoff`` (epoch seconds)."""
        return sum(1 for event in self.read() if float(event.get("time", 0.0)) < cutoff)

    def prune_before(self, cutoff: float) -> int:
        """Remove the events older than ``cutoff``; returns how many. Safe against concurrent writers (the
        running gateway and a ``gateway purge`` share the file lock)."""
        if not self.path.exists():
            return 0
        with self._file_lock:
            fd = os.open(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                kept, removed = [], 0
                with open(fd, "rb", closefd=False) as stream:
                    for line in stream:
                        try:
                            old = float(json.loads(line).get("time", 0.0)) < cutoff
                        except ValueError:
                            old = False
                        if old:
                            removed += 1
                        else:
                            kept.append(line)
                if removed:
                    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                    tmp.write_bytes(b"".join(kept))
                    with open(tmp, "rb") as synced:
                        os.fsync(synced.fileno())
                    os.replace(tmp, self.path)
            finally:
                os.close(fd)
        return removed

    def read(self) -> list[dict[str, Any]]:
        """Every complete event; a last line still being written (no newline yet) is left for the next read."""
        if self._writer is not None:
            self.then(lambda: None).result()
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]
        return [json.loads(line) for line in lines if line.strip()]
