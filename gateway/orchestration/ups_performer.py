"""Performing the UPS tasks a worklist manager pushed to the gateway (IHE AIW-I): the task's study is retrieved
by C-GET from the peer it names (off the association thread), every instance spooled and handed to assembly like
a received one (a HIGH workitem's study scheduled as STAT), and the study declared complete once the retrieval
has brought it all - no quiet period. The
workitem is IN PROGRESS from the retrieval on; the report dispatcher completes it with the objects stored, and a
retrieval that fails cancels it with the reason."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from gateway.config.settings import Settings
from gateway.core.domain import InstanceRecord
from gateway.core.errors import GatewayError
from gateway.database.ups_tasks import TaskStore, UpsTask
from gateway.ingest.assembler import StudyAssembler
from gateway.ingest.retrieve import retrieve_study
from gateway.ingest.spool import Spool

logger = logging.getLogger(__name__)


class TaskPerformer:
    def __init__(
        self,
        settings: Settings,
        tasks: TaskStore,
        spool: Spool,
        assembler: StudyAssembler,
        *,
        on_stored: Callable[[InstanceRecord], None],
        on_event: Callable[..., None],
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.spool = spool
        self.assembler = assembler
        self.on_stored = on_stored
        self.on_event = on_event
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-ups-task")

    def received(self, task: UpsTask) -> None:
        """On an association thread: queue the retrieval, return at once."""
        with contextlib.suppress(RuntimeError):  # stopping
            self._executor.submit(self._perform, task)

    def _perform(self, task: UpsTask) -> None:
        peer = next((p for p in self.settings.peers if p.ae_title == task.source_ae), None)
        try:
            if peer is None:
                raise GatewayError(f"{task.source_ae} is not a configured peer")
            self.tasks.move(task.workitem_uid, "IN PROGRESS", detail=f"retrieving from {task.source_ae}")
            records = retrieve_study(
                peer,
                task.study_uid,
                self.spool,
                calling_ae=self.settings.receiver.ae_title,
                timeout_s=self.settings.ups.retrieve_timeout_s,
            )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
            logger.error("UPS task %s canceled: %s", task.workitem_uid, reason)
            with contextlib.suppress(Exception):
                self.tasks.move(task.workitem_uid, "CANCELED", detail=reason)
            self.on_event(
                "ups_task_canceled", study=task.study_uid, workitem=task.workitem_uid, reason=reason
            )
            return
        urgent = task.priority == "HIGH"  # the manager's HIGH: scheduled as STAT, like a STAT order
        for record in records:
            self.on_stored(dataclasses.replace(record, requested_priority="STAT") if urgent else record)
        self.tasks.move(task.workitem_uid, "IN PROGRESS", detail=f"analysing {len(records)} instance(s)")
        self.assembler.expect(
            task.study_uid, frozenset(r.sop_instance_uid for r in records), f"UPS task {task.workitem_uid}"
        )
        self.on_event(
            "ups_task_started", study=task.study_uid, workitem=task.workitem_uid, instances=len(records)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
