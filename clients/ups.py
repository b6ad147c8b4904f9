"""DICOM UPS (Unified Procedure Step, PS3.4 CC) as a performer that reports its own work: the workitem is created
(N-CREATE, SCHEDULED), claimed (N-ACTION Change State -> IN PROGRESS with a Transaction UID), given its final
attributes (N-SET) and completed (N-ACTION -> COMPLETED) over one association - the IHE AIW-I "push" of a
finished AI task to a worklist manager. Blocking: call from a thread.

Each step is safe to repeat: the workitem's UID and its Transaction UID are the caller's, deterministic, so a try
that died half-way is finished by the next one (a duplicate N-CREATE reads the workitem's state; a COMPLETED one
is left alone)."""

from __future__ import annotations

import ssl

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
)

from gateway.config.settings import Peer
from gateway.core.errors import DeliveryError

CHANGE_STATE = 1  # N-ACTION Action Type ID: Change UPS State
DUPLICATE = 0x0111
ALREADY_COMPLETED = 0xB306
STATE_TAG = Tag(0x00741000)  # Procedure Step State


def _code(status: Dataset | None) -> int:
    return int(status.Status) if status is not None and "Status" in status else -1


def _state(change: str, transaction_uid: str) -> Dataset:
    ds = Dataset()
    ds.ProcedureStepState = change
    ds.TransactionUID = transaction_uid
    return ds


def push_completed_workitem(
    peer: Peer,
    workitem_uid: str,
    created: Dataset,
    final: Dataset,
    *,
    transaction_uid: str,
    calling_ae: str,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """Bring the workitem to COMPLETED with ``final``'s attributes; returns what was done ("completed" or
    "already completed"). Raises ``DeliveryError`` with the step and status when the manager refuses."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(UnifiedProcedureStepPush)
    ae.add_requested_context(UnifiedProcedureStepPull)
    tls = (ssl_context, peer.host) if ssl_context is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise DeliveryError(
            f"association with worklist manager {peer} was rejected, aborted or never connected"
        )
    try:
        status, _ = assoc.send_n_create(created, UnifiedProcedureStepPush, workitem_uid)
        code, state = _code(status), "SCHEDULED"
        if code == DUPLICATE:  # an earlier try created it: go on from where it stands
            status, current = assoc.send_n_get([STATE_TAG], UnifiedProcedureStepPush, workitem_uid)
            if _code(status) != 0 or current is None:
                raise DeliveryError(f"UPS N-GET of {workitem_uid} at {peer}: status 0x{_code(status):04X}")
            state = str(current.get("ProcedureStepState", ""))
        elif code != 0:
            raise DeliveryError(f"UPS N-CREATE at {peer}: status 0x{code:04X}")
        if state == "COMPLETED":
            return "already completed"
        if state == "SCHEDULED":
            status, _ = assoc.send_n_action(
                _state("IN PROGRESS", transaction_uid), CHANGE_STATE, UnifiedProcedureStepPush, workitem_uid
            )
            if _code(status) != 0:
                raise DeliveryError(f"UPS claim (IN PROGRESS) at {peer}: status 0x{_code(status):04X}")
        final = Dataset(final)
        final.TransactionUID = transaction_uid
        status, _ = assoc.send_n_set(final, UnifiedProcedureStepPush, workitem_uid)
        if _code(status) != 0:
            raise DeliveryError(f"UPS N-SET at {peer}: status 0x{_code(status):04X}")
        status, _ = assoc.send_n_action(
            _state("COMPLETED", transaction_uid), CHANGE_STATE, UnifiedProcedureStepPush, workitem_uid
        )
        if _code(status) not in (0, ALREADY_COMPLETED):
            raise DeliveryError(f"UPS completion at {peer}: status 0x{_code(status):04X}")
        return "completed"
    finally:
        if assoc.is_established:
            assoc.release()


def instance_references(
    study_uid: str, by_series: dict[str, list[tuple[str, str]]], retrieve_ae: str = ""
) -> list[Dataset]:
    """Input / Output Information Sequence items (PS3.3 C.30.4): per series its instances as (SOP Class UID,
    SOP Instance UID), with the AE title they can be retrieved from when given."""
    items = []
    for series_uid, sops in sorted(by_series.items()):
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = series_uid
        refs = []
        for sop_class, sop_uid in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        if retrieve_ae:
            retrieval = Dataset()
            retrieval.RetrieveAETitle = retrieve_ae
            item.DICOMRetrievalSequence = [retrieval]
        items.append(item)
    return items
