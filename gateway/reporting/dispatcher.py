"""Study-level reports for the RIS / EHR: a FHIR R4 Bundle and HL7 v2 messages per analysed study.

They are written next to the DICOM results first, then sent in the background (FHIR POST, MLLP) with retries,
so an unreachable endpoint is reported in the log and the audit trail but never delays or blocks the DICOM
results or the next study.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from clients.mllp import send_mllp
from gateway.config.settings import Settings
from gateway.core.durable import atomic_write
from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff
from gateway.ops.audit import AuditLog
from gateway.reporting.fhir import build_bundle
from gateway.reporting.hl7 import Hl7Parties, build_oru, build_priority_update
from gateway.results.content import SeriesReport

logger = logging.getLogger(__name__)


def post_fhir(url: str, body: bytes, *, timeout_s: float, attempts: int, backoff_s: float = 1.0) -> int:
    """POST a transaction Bundle; return the number of tries it took. Raises ``DeliveryError``."""
    last = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if 200 <= response.status < 300:
                    return attempt
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            time.sleep(Backoff(backoff_s).delay(attempt))
    raise DeliveryError(f"FHIR POST to {url} failed after {attempts} tries: {last}")


class ReportDispatcher:
    def __init__(self, settings: Settings, audit: AuditLog, *, backoff_s: float = 1.0) -> None:
        self.settings = settings
        self.audit = audit
        self.backoff_s = backoff_s
        self.parties = Hl7Parties(
            sending_application=settings.receiver.ae_title,
            sending_facility=settings.hl7.sending_facility,
            receiving_application=settings.hl7.receiving_application,
            receiving_facility=settings.hl7.receiving_facility,
        )
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-reports")
        self.pending: list[Future[None]] = []

    def dispatch(self, folder: Path, reports: Sequence[SeriesReport], *, stat: bool) -> list[Path]:
        """Write the study's FHIR and HL7 documents into ``folder`` and queue their delivery."""
        if not reports:
            return []
        study_uid = str(reports[0].header.StudyInstanceUID)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        documents: list[tuple[str, Callable[[], bytes]]] = [
            ("FHIR", lambda: build_bundle(reports, stat=stat).model_dump_json(indent=2).encode()),
            ("ORU", lambda: build_oru(reports, stat=stat, parties=self.parties).to_er7().encode()),
        ]
        if stat:
            documents.append(
                ("OMI", lambda: build_priority_update(reports, parties=self.parties).to_er7().encode())
            )
        built: dict[str, bytes] = {}
        for kind, build in documents:  # each on its own: one that cannot be built never costs the others
            try:
                built[kind] = build()
            except Exception as exc:
                logger.error(
                    "study %s: %s report could not be built: %s", study_uid, kind, type(exc).__name__
                )
                self.audit.record(
                    "report_failed",
                    study=study_uid,
                    message=kind,
                    reason=f"{type(exc).__name__}: {exc}"[:300],
                )
        written = []
        for kind, body in built.items():
            name = (
                f"FHIR_{stamp}_{study_uid}.json" if kind == "FHIR" else f"HL7_{kind}_{stamp}_{study_uid}.hl7"
            )
            atomic_write(folder / name, body)
            written.append(folder / name)
        bundle = built.get("FHIR")
        messages = [(kind, body.decode()) for kind, body in built.items() if kind != "FHIR"]
        self.pending = [f for f in self.pending if not f.done()]
        if self.settings.fhir.url and bundle is not None:
            self.pending.append(self._pool.submit(self._send_fhir, study_uid, bundle))
        address = self.settings.hl7.address()
        if address is not None and messages:
            self.pending.append(self._pool.submit(self._send_hl7, study_uid, address, messages))
        return written

    def _send_fhir(self, study_uid: str, bundle: bytes) -> None:
        fhir = self.settings.fhir
        try:
            tries = post_fhir(
                fhir.url, bundle, timeout_s=fhir.timeout_s, attempts=fhir.attempts, backoff_s=self.backoff_s
            )
            self.audit.record("fhir_delivered", study=study_uid, url=fhir.url, attempts=tries)
        except DeliveryError as exc:
            logger.error("FHIR report of study %s not delivered (kept on disk): %s", study_uid, exc)
            self.audit.record("fhir_failed", study=study_uid, url=fhir.url, reason=str(exc))

    def _send_hl7(self, study_uid: str, address: tuple[str, int], messages: list[tuple[str, str]]) -> None:
        hl7 = self.settings.hl7
        for kind, text in messages:
            try:
                result = send_mllp(
                    *address, text, timeout_s=hl7.timeout_s, attempts=hl7.attempts, backoff_s=self.backoff_s
                )
                self.audit.record("hl7_delivered", study=study_uid, message=kind, attempts=result.attempts)
            except DeliveryError as exc:
                logger.error("HL7 %s of study %s not delivered (kept on disk): %s", kind, study_uid, exc)
                self.audit.record("hl7_failed", study=study_uid, message=kind, reason=str(exc))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
