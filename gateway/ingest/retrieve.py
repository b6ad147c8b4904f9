"""Fetching a study the gateway was asked to analyse (a UPS task): C-GET from the AE the task names, each
instance written durably to the spool exactly as a C-STORE to the receiver would be. Blocking: call from a thread.

C-GET brings the instances back over the same association (the gateway takes the storage SCP role for the
image classes it proposes), so the source needs no route back to the gateway, unlike C-MOVE."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from gateway.config.settings import Peer
from gateway.core.domain import InstanceRecord
from gateway.core.errors import DeliveryError, GatewayError
from gateway.ingest.spool import Spool

logger = logging.getLogger(__name__)
MAX_STORAGE_CONTEXTS = 120  # with the C-GET context, within the 128 presentation contexts of an association


def retrieve_study(
    peer: Peer, study_uid: str, spool: Spool, *, calling_ae: str, timeout_s: float = 60.0
) -> list[InstanceRecord]:
    """Every instance of the study at ``peer``, spooled; raises ``DeliveryError`` when the retrieval fails or
    brings nothing."""
    records: list[InstanceRecord] = []
    refused: list[str] = []

    def stored(event: Any) -> int:
        try:
            record = spool.store(
                event.file_meta, event.encoded_dataset(include_meta=False), calling_ae=peer.ae_title
            )
        except GatewayError as exc:
            refused.append(str(exc)[:200])
            return 0xA700 if "watermark" in str(exc) else 0xC000
        records.append(record)
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    storage = [c.abstract_syntax for c in StoragePresentationContexts if c.abstract_syntax is not None]
    for sop_class in storage[:MAX_STORAGE_CONTEXTS]:
        ae.add_requested_context(sop_class)
    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in storage[:MAX_STORAGE_CONTEXTS]]
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, stored)]
    )
    if not assoc.is_established:
        raise DeliveryError(f"association with {peer} for C-GET was rejected, aborted or never connected")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final = -1
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                final = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    if final not in (0x0000, 0xB000) or not records:
        detail = f"status 0x{final:04X}" if final >= 0 else "no answer"
        raise DeliveryError(
            f"C-GET of study {study_uid} from {peer}: {detail}, {len(records)} instance(s) received"
            + (f", {len(refused)} refused: {refused[0]}" if refused else "")
        )
    logger.info("study %s: %d instance(s) retrieved from %s", study_uid, len(records), peer.ae_title)
    return records
