"""Orders from a Modality Worklist SCP (C-FIND), for sites without an HL7 order feed.

The query asks by accession number for what the gateway needs and nothing more (no patient name is requested);
a match becomes the same ``Order`` the HL7 feed gives:

    accession number   Accession Number (0008,0050)
    study              Study Instance UID (0020,000D)
    priority           Requested Procedure Priority (0040,1003): STAT -> STAT, HIGH -> URGENT, else ROUTINE
    reason for exam    Reason for the Requested Procedure (0040,1002), else the meaning of its code (0040,100A)
    procedure          Requested Procedure Code Sequence (0032,1064) code value, Requested Procedure
                       Description (0032,1060)
    patient            Patient ID with its issuer, kept only as a SHA-256 (as for HL7 orders)
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from pydicom.dataset import Dataset

from clients.dicom_scu import find_worklist
from gateway.config.settings import Peer
from gateway.workflow.orders import Order, patient_key

WORKLIST_PRIORITY = {"STAT": "STAT", "HIGH": "URGENT"}
Finder = Callable[..., list[Dataset]]


def worklist_query(accession_number: str) -> Dataset:
    """The C-FIND identifier: match on the accession number, return only the order's context."""
    query = Dataset()
    query.AccessionNumber = accession_number
    query.StudyInstanceUID = ""
    query.PatientID = ""
    query.IssuerOfPatientID = ""
    query.RequestedProcedureID = ""
    query.RequestedProcedurePriority = ""
    query.ReasonForTheRequestedProcedure = ""
    query.RequestedProcedureDescription = ""
    query.RequestedProcedureCodeSequence = []
    step = Dataset()
    step.Modality = ""
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = ""
    query.ScheduledProcedureStepSequence = [step]
    return query


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def order_from_worklist(item: Dataset) -> Order | None:
    """The order a worklist match describes; None when it names no accession number."""
    accession = _text(item, "AccessionNumber")[:64]
    if not accession:
        return None
    codes = item.get("RequestedProcedureCodeSequence") or []
    reason_codes = item.get("ReasonForRequestedProcedureCodeSequence") or []
    reason = _text(item, "ReasonForTheRequestedProcedure") or (
        _text(reason_codes[0], "CodeMeaning") if reason_codes else ""
    )
    study_uid = _text(item, "StudyInstanceUID")
    return Order(
        accession_number=accession,
        patient_key=patient_key(_text(item, "PatientID"), _text(item, "IssuerOfPatientID")),
        study_uid=study_uid if len(study_uid) <= 64 else "",
        priority=WORKLIST_PRIORITY.get(_text(item, "RequestedProcedurePriority").upper(), "ROUTINE"),
        reason=reason[:1000],
        procedure_code=(_text(codes[0], "CodeValue") if codes else "")[:64],
        procedure_text=_text(item, "RequestedProcedureDescription")[:1000],
        status="active",
        message_type="MWL",
        control_id="",
    )


class WorklistLookup:
    """Asks one Modality Worklist SCP for the order of an accession number. Blocking: call from a thread."""

    def __init__(
        self,
        scp: Peer,
        *,
        calling_ae: str,
        timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        finder: Finder = find_worklist,
    ) -> None:
        self.scp = scp
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._find = finder

    def order(self, accession_number: str) -> Order | None:
        """The worklist's order of this accession number (the first match); None when it has none. Raises
        ``WorklistError`` when the SCP cannot be asked."""
        matches = self._find(
            self.scp,
            worklist_query(accession_number),
            calling_ae=self.calling_ae,
            timeout_s=self.timeout_s,
            ssl_context=self.ssl_context,
        )
        for item in matches:
            order = order_from_worklist(item)
            if order is not None and order.accession_number == accession_number:
                return order
        return None
