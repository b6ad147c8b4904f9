"""The gateway as a UPS performer that a worklist manager pushes work to (IHE AIW-I): N-CREATE of a UPS Push
workitem names a study and the AE to retrieve it from; the gateway keeps the task (before it answers), retrieves
the study by C-GET, analyses it like any other, and completes the workitem with the objects it stored. The manager
follows the workitem with N-GET (state; on completion the Output Information Sequence).

Handlers run on the receiver's association threads; the retrieval is handed to ``on_task`` at once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from pydicom.dataset import Dataset

from clients.ups import instance_references
from gateway.core.domain import is_valid_uid
from gateway.database.ups_tasks import TaskStore, UpsTask

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
DUPLICATE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110
PRIORITIES = ("HIGH", "MEDIUM", "LOW")


def _retrieve_ae(item: Dataset) -> str:
    for retrieval in item.get("DICOMRetrievalSequence", None) or []:
        ae = str(retrieval.get("RetrieveAETitle", "")).strip()
        if ae:
            return ae
    return str(item.get("RetrieveAETitle", "") or "").strip()


class UpsTaskSCP:
    def __init__(
        self, store: TaskStore, *, sources: Collection[str], on_task: Callable[[UpsTask], None]
    ) -> None:
        self.store = store
        self.sources = set(sources)  # AE titles the gateway can retrieve from (its configured peers)
        self.on_task = on_task

    def handle_n_create(self, event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        ds = event.attribute_list
        if not is_valid_uid(uid):
            return INVALID_ATTRIBUTE_VALUE, None
        if str(ds.get("ProcedureStepState", "")).strip().upper() != "SCHEDULED":
            return INVALID_ATTRIBUTE_VALUE, None  # PS3.4 CC.2.5.1: created SCHEDULED
        inputs = ds.get("InputInformationSequence", None) or []
        studies = {str(i.get("StudyInstanceUID", "")).strip() for i in inputs}
        sources = {_retrieve_ae(i) for i in inputs} - {""}
        if len(studies) != 1 or not is_valid_uid(next(iter(studies))) or len(sources) != 1:
            return MISSING_ATTRIBUTE, None
        source = sources.pop()
        if source not in self.sources:
            logger.warning("UPS task %s refused: %s is not a configured peer to retrieve from", uid, source)
            return INVALID_ATTRIBUTE_VALUE, None
        priority = str(ds.get("ScheduledProcedureStepPriority", "MEDIUM")).strip().upper()
        task = UpsTask(
            workitem_uid=uid,
            study_uid=studies.pop(),
            source_ae=source,
            requester_ae=event.assoc.requestor.ae_title.strip()[:16],
            state="SCHEDULED",
            priority=priority if priority in PRIORITIES else "MEDIUM",
            outputs=[],
            detail="",
        )
        try:
            if not self.store.create(task):
                return DUPLICATE, None
        except Exception as exc:  # not kept: the manager sends it again
            logger.error("UPS task %s not kept (%s): refused", uid, type(exc).__name__)
            return PROCESSING_FAILURE, None
        logger.info("UPS task %s: study %s to retrieve from %s", uid, task.study_uid, source)
        self.on_task(task)
        return SUCCESS, ds

    def handle_n_get(self, event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "").strip()
        try:
            task = self.store.get(uid)
        except Exception:
            return PROCESSING_FAILURE, None
        if task is None:
            return NO_SUCH_INSTANCE, None
        return SUCCESS, workitem_state(task)


def workitem_state(task: UpsTask) -> Dataset:
    """What an N-GET of the task answers: its state, priority, progress and, once completed, its outputs."""
    ds = Dataset()
    ds.ProcedureStepState = task.state
    ds.ScheduledProcedureStepPriority = task.priority
    source = Dataset()
    source.StudyInstanceUID = task.study_uid
    ds.InputInformationSequence = [source]
    progress = Dataset()
    progress.ProcedureStepProgress = 100 if task.state == "COMPLETED" else 0
    progress.ProcedureStepProgressDescription = (task.detail or task.state.lower())[:64]
    ds.ProcedureStepProgressInformationSequence = [progress]
    if task.state == "COMPLETED":
        by_series: dict[str, list[tuple[str, str]]] = {}
        for sop_class, sop_uid, series_uid in task.outputs:
            by_series.setdefault(series_uid, []).append((sop_class, sop_uid))
        performed = Dataset()
        performed.OutputInformationSequence = instance_references(task.study_uid, by_series)
        ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    return ds
