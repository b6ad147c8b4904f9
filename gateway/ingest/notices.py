"""Completeness notices over DIMSE: the receiver is also an MPPS SCP and an IAN SCP, so that a study closes when
the modality or the archive says what it holds rather than after a quiet period.

* **MPPS** (Modality Performed Procedure Step, PS3.4 F.7): N-CREATE with status IN PROGRESS holds the study named
  in its Scheduled Step Attributes open; N-SET with COMPLETED (or DISCONTINUED) and the Performed Series Sequence
  lists the instances made, and the study closes once every one of them is in the spool.
* **IAN** (Instance Availability Notification, PS3.4 R): N-CREATE lists the study's instances by series; the same
  rule applies.

A notice names instances, never a patient: nothing here logs more than UIDs and counts. With a store, every
notice is in the system of record before it is answered (a store that cannot be written answers "processing
failure", so the modality sends it again): after a restart the steps are known again, an N-SET of a step created
before the restart is accepted, and ``restore`` re-applies to the recovered studies what their notices said - a
study held by an MPPS in progress is still held, not closed by the quiet period.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    UnifiedProcedureStepPush,
)

from gateway.core.domain import is_valid_uid
from gateway.database.notices import NoticeStore
from gateway.ingest.ups_tasks import UpsTaskSCP

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
NO_SUCH_INSTANCE = 0x0112  # N-SET of a procedure step we never saw created
DUPLICATE_INSTANCE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
STEP_NOT_IN_PROGRESS = 0xC310  # an N-SET of a step already completed or discontinued (PS3.4 F.7.2.2)
MAX_STEPS = 10_000
PROCESSING_FAILURE = 0x0110

NOTICE_CLASSES = (ModalityPerformedProcedureStep, InstanceAvailabilityNotification)


class Completion(Protocol):
    def hold(self, study_uid: str, source: str) -> None: ...

    def expect(self, study_uid: str, sop_uids: frozenset[str], source: str) -> None: ...


def referenced_instances(series_sequence: Iterable[Dataset], item_keyword: str) -> frozenset[str]:
    """The SOP Instance UIDs of a Performed Series Sequence (``ReferencedImageSequence`` and
    ``ReferencedNonImageCompositeSOPInstanceSequence``) or an IAN's Referenced Series Sequence
    (``ReferencedSOPSequence``)."""
    found = set()
    for series in series_sequence:
        for keyword in (item_keyword, "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(keyword, None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
                if is_valid_uid(uid):
                    found.add(uid)
    return frozenset(found)


class NoticeSCP:
    """The N-CREATE / N-SET handlers (pynetdicom event handlers, on association threads)."""

    def __init__(
        self, completion: Completion, store: NoticeStore | None = None, *, tasks: UpsTaskSCP | None = None
    ) -> None:
        self.completion = completion
        self.store = store
        self.tasks = tasks  # UPS workitems pushed to the gateway (N-CREATE / N-GET of UPS Push)
        self._steps: dict[str, tuple[str, str]] = {}  # MPPS SOP Instance UID -> (study UID, status)
        self._lock = threading.Lock()

    def restore(self, study_uids: Iterable[str]) -> int:
        """Re-apply the stored notices of these (recovered) studies; returns how many. Blocking."""
        if self.store is None:
            return 0
        applied = 0
        for notice in self.store.for_studies(study_uids):
            if notice.kind == "MPPS":
                with self._lock:
                    self._steps[notice.notice_uid] = (notice.study_uid, notice.status)
            if notice.status == "IN PROGRESS":
                self.completion.hold(notice.study_uid, "MPPS in progress")
            else:
                source = "IAN" if notice.kind == "IAN" else f"MPPS {notice.status.lower()}"
                self.completion.expect(notice.study_uid, notice.expected, source)
            applied += 1
        return applied

    def _keep(self, notice_uid: str, kind: str, study: str, status: str, expected: frozenset[str]) -> bool:
        """The notice in the system of record before it is answered; False when that failed."""
        if self.store is None:
            return True
        try:
            self.store.save(notice_uid, kind, study, status, expected)
        except Exception as exc:
            logger.error(
                "%s %s for study %s not kept (%s): refused", kind, notice_uid, study, type(exc).__name__
            )
            return False
        return True

    def _known(self, uid: str) -> tuple[str, str] | None:
        with self._lock:
            known = self._steps.get(uid)
        if known is not None or self.store is None:
            return known
        try:
            stored = self.store.find(uid)  # created before a restart
        except Exception:
            return None
        return (stored.study_uid, stored.status) if stored is not None and stored.kind == "MPPS" else None

    @property
    def handlers(self) -> list[Any]:
        handlers: list[Any] = [(evt.EVT_N_CREATE, self.handle_n_create), (evt.EVT_N_SET, self.handle_n_set)]
        if self.tasks is not None:
            handlers.append((evt.EVT_N_GET, self.tasks.handle_n_get))
        return handlers

    @property
    def sop_classes(self) -> tuple[str, ...]:
        """The SOP classes to accept on the receiver's port."""
        return (*NOTICE_CLASSES, *((UnifiedProcedureStepPush,) if self.tasks is not None else ()))

    def handle_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request: Any = event.request
        cls = str(request.AffectedSOPClassUID)
        ds = event.attribute_list
        if cls == UnifiedProcedureStepPush and self.tasks is not None:
            return self.tasks.handle_n_create(event)
        if cls == InstanceAvailabilityNotification:
            return self._availability(str(request.AffectedSOPInstanceUID or "").strip(), ds), None
        if cls != ModalityPerformedProcedureStep:
            return 0x0122, None  # SOP class not supported
        uid = str(request.AffectedSOPInstanceUID or "").strip()
        if not is_valid_uid(uid):
            return INVALID_ATTRIBUTE_VALUE, None
        status = str(ds.get("PerformedProcedureStepStatus", "")).strip().upper()
        if status != "IN PROGRESS":
            return INVALID_ATTRIBUTE_VALUE, None  # PS3.4 F.7.2.1: a step is created in progress
        steps = ds.get("ScheduledStepAttributesSequence", None) or []
        studies = {str(s.get("StudyInstanceUID", "")).strip() for s in steps}
        studies = {s for s in studies if is_valid_uid(s)}
        if len(studies) != 1:
            return MISSING_ATTRIBUTE, None
        study = studies.pop()
        if self._known(uid) is not None:
            return DUPLICATE_INSTANCE, None
        if not self._keep(uid, "MPPS", study, status, frozenset()):
            return PROCESSING_FAILURE, None
        with self._lock:
            if len(self._steps) >= MAX_STEPS:
                self._steps.pop(next(iter(self._steps)))
            self._steps[uid] = (study, status)
        self.completion.hold(study, "MPPS in progress")
        logger.info("MPPS %s in progress for study %s: held open until it completes", uid, study)
        return SUCCESS, ds

    def handle_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request: Any = event.request
        uid = str(request.RequestedSOPInstanceUID or "").strip()
        ds = event.modification_list
        known = self._known(uid)
        if known is None:
            return NO_SUCH_INSTANCE, None
        study, current = known
        if current != "IN PROGRESS":
            return STEP_NOT_IN_PROGRESS, None
        status = str(ds.get("PerformedProcedureStepStatus", "")).strip().upper() or current
        if status not in ("IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            return INVALID_ATTRIBUTE_VALUE, None
        expected = (
            referenced_instances(ds.get("PerformedSeriesSequence", None) or [], "ReferencedImageSequence")
            if status != "IN PROGRESS"
            else frozenset()
        )
        if not self._keep(uid, "MPPS", study, status, expected):
            return PROCESSING_FAILURE, None
        with self._lock:
            self._steps[uid] = (study, status)
        if status == "IN PROGRESS":
            return SUCCESS, ds
        self.completion.expect(study, expected, f"MPPS {status.lower()}")
        logger.info(
            "MPPS %s %s for study %s: %d instance(s) listed", uid, status.lower(), study, len(expected)
        )
        return SUCCESS, ds

    def _availability(self, uid: str, ds: Dataset) -> int:
        study = str(ds.get("StudyInstanceUID", "")).strip()
        if not is_valid_uid(study):
            return MISSING_ATTRIBUTE
        expected = referenced_instances(
            ds.get("ReferencedSeriesSequence", None) or [], "ReferencedSOPSequence"
        )
        if not expected:
            return MISSING_ATTRIBUTE
        if not self._keep(
            uid if is_valid_uid(uid) else f"IAN-{study}"[:64], "IAN", study, "AVAILABLE", expected
        ):
            return PROCESSING_FAILURE
        self.completion.expect(study, expected, "IAN")
        logger.info("IAN for study %s: %d instance(s) available", study, len(expected))
        return SUCCESS
