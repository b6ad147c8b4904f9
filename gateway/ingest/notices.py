"""Completeness notices over DIMSE: the receiver is also an MPPS SCP and an IAN SCP, so that a study closes when
the modality or the archive says what it holds rather than after a quiet period.

* **MPPS** (Modality Performed Procedure Step, PS3.4 F.7): N-CREATE with status IN PROGRESS holds the study named
  in its Scheduled Step Attributes open; N-SET with COMPLETED (or DISCONTINUED) and the Performed Series Sequence
  lists the instances made, and the study closes once every one of them is in the spool.
* **IAN** (Instance Availability Notification, PS3.4 R): N-CREATE lists the study's instances by series; the same
  rule applies.

A notice names instances, never a patient: nothing here logs more than UIDs and counts. Procedure steps are kept
in memory: after a restart an unknown step's N-SET is answered "no such object instance" and the quiet period
applies again (the modality's step is complete; nothing is lost, only the early close).
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
)

from gateway.core.domain import is_valid_uid

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
NO_SUCH_INSTANCE = 0x0112  # N-SET of a procedure step we never saw created
DUPLICATE_INSTANCE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
STEP_NOT_IN_PROGRESS = 0xC310  # an N-SET of a step already completed or discontinued (PS3.4 F.7.2.2)
MAX_STEPS = 10_000

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

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self._steps: dict[str, tuple[str, str]] = {}  # MPPS SOP Instance UID -> (study UID, status)
        self._lock = threading.Lock()

    @property
    def handlers(self) -> list[Any]:
        return [(evt.EVT_N_CREATE, self.handle_n_create), (evt.EVT_N_SET, self.handle_n_set)]

    def handle_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request: Any = event.request
        cls = str(request.AffectedSOPClassUID)
        ds = event.attribute_list
        if cls == InstanceAvailabilityNotification:
            return self._availability(ds), None
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
        with self._lock:
            if uid in self._steps:
                return DUPLICATE_INSTANCE, None
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
        with self._lock:
            known = self._steps.get(uid)
        if known is None:
            return NO_SUCH_INSTANCE, None
        study, current = known
        if current != "IN PROGRESS":
            return STEP_NOT_IN_PROGRESS, None
        status = str(ds.get("PerformedProcedureStepStatus", "")).strip().upper() or current
        if status not in ("IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            return INVALID_ATTRIBUTE_VALUE, None
        with self._lock:
            self._steps[uid] = (study, status)
        if status == "IN PROGRESS":
            return SUCCESS, ds
        expected = referenced_instances(
            ds.get("PerformedSeriesSequence", None) or [], "ReferencedImageSequence"
        )
        self.completion.expect(study, expected, f"MPPS {status.lower()}")
        logger.info(
            "MPPS %s %s for study %s: %d instance(s) listed", uid, status.lower(), study, len(expected)
        )
        return SUCCESS, ds

    def _availability(self, ds: Dataset) -> int:
        study = str(ds.get("StudyInstanceUID", "")).strip()
        if not is_valid_uid(study):
            return MISSING_ATTRIBUTE
        expected = referenced_instances(
            ds.get("ReferencedSeriesSequence", None) or [], "ReferencedSOPSequence"
        )
        if not expected:
            return MISSING_ATTRIBUTE
        self.completion.expect(study, expected, "IAN")
        logger.info("IAN for study %s: %d instance(s) available", study, len(expected))
        return SUCCESS
