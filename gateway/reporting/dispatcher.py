"""Study-level reports for the RIS / EHR: a FHIR R4 Bundle and HL7 v2 messages per analysed study.

A finished study's documents are built and written next to its DICOM results in the executor, then sent on the
event loop (FHIR POST over httpx, MLLP over asyncio streams) with timeouts and retries - all in a background
task, so an unreachable endpoint is reported in the log and the audit trail but never delays the DICOM results,
the study's completion or the next study, and holds no thread while it waits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import pydicom

from clients.http_post import HttpPoster
from clients.mllp import send_mllp
from clients.ups import push_completed_workitem
from gateway.config.settings import Settings
from gateway.core.durable import atomic_write
from gateway.core.errors import DeliveryError
from gateway.core.retry import Backoff
from gateway.database.ups_tasks import TaskStore
from gateway.ops.audit import AuditLog
from gateway.reporting.fhir import build_bundle
from gateway.reporting.hl7 import Hl7Parties, build_oru, build_priority_update
from gateway.reporting.ups import (
    StoredObject,
    build_completion,
    build_workitem,
    transaction_uid,
    workitem_uid,
)
from gateway.results.content import SeriesReport

logger = logging.getLogger(__name__)
DELIVERY_POLL_S = 0.25


def stored_objects(folder: Path, results: Sequence[str]) -> list[StoredObject]:
    """The study's stored result objects among the files of its results folder (headers only). Blocking."""
    found = []
    for uid in results:
        for path in folder.glob(f"*_{uid}.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found.append(
                StoredObject(
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                )
            )
    return found


class ReportDispatcher:
    def __init__(
        self,
        settings: Settings,
        audit: AuditLog,
        executor: Executor | None = None,
        *,
        http: HttpPoster | None = None,
        backoff_s: float = 1.0,
        tasks: TaskStore | None = None,
        pending_deliveries: Callable[[str], int] | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks  # UPS workitems pushed to the gateway: completed when their study is
        # The study's result deliveries still waiting (the outbox): a UPS workitem lists its outputs once they are
        # at the PACS, not before.
        self.pending_deliveries = pending_deliveries
        self.audit = audit
        self.executor = executor
        self.http = http or HttpPoster()
        self.backoff = Backoff(backoff_s)
        self.parties = Hl7Parties(
            sending_application=settings.receiver.ae_title,
            sending_facility=settings.hl7.sending_facility,
            receiving_application=settings.hl7.receiving_application,
            receiving_facility=settings.hl7.receiving_facility,
        )
        self._in_flight: set[asyncio.Task[None]] = set()

    def submit(
        self, folder: Path, reports: Sequence[SeriesReport], *, stat: bool, results: Sequence[str] = ()
    ) -> None:
        """Write and send the study's documents in the background (only on the event loop); ``results`` are the
        UIDs of the objects stored for the study (the UPS workitem lists them)."""
        if not reports:
            return
        task = asyncio.create_task(self._publish(folder, reports, stat, tuple(results)), name="study-reports")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def study_finished(self, study_uid: str, folder: Path, results: Sequence[str]) -> None:
        """The study is done (analysed, failed or skipped): the UPS tasks that asked for it are completed with the
        objects stored (only on the event loop; in the background)."""
        if self.tasks is None:
            return
        task = asyncio.create_task(self._complete_tasks(study_uid, folder, tuple(results)), name="ups-tasks")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _delivered(self, study_uid: str) -> None:
        """Wait (bounded by ``[ups] delivery_wait_s``) until the study's results are at their destination."""
        if self.pending_deliveries is None:
            return
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.ups.delivery_wait_s
        while await loop.run_in_executor(self.executor, self.pending_deliveries, study_uid):
            if time.monotonic() > deadline:
                logger.warning("study %s: results still not delivered; its UPS workitem goes on", study_uid)
                return
            await asyncio.sleep(DELIVERY_POLL_S)

    async def _complete_tasks(self, study_uid: str, folder: Path, results: tuple[str, ...]) -> None:
        assert self.tasks is not None
        loop = asyncio.get_running_loop()
        try:
            tasks = await loop.run_in_executor(self.executor, self.tasks.open_for_study, study_uid)
            if not tasks:
                return
            outputs = await loop.run_in_executor(self.executor, stored_objects, folder, results)
            await self._delivered(study_uid)
            listed = [[o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid] for o in outputs]
            detail = f"{len(listed)} result object(s) stored" if listed else "nothing to analyse"
            for task in tasks:
                move = functools.partial(
                    self.tasks.move, task.workitem_uid, "COMPLETED", detail=detail, outputs=listed
                )
                await loop.run_in_executor(self.executor, move)
                self.audit.record(
                    "ups_task_completed", study=study_uid, workitem=task.workitem_uid, outputs=len(listed)
                )
        except Exception as exc:  # the task stays in progress; logged, never a cost to anything else
            logger.error("study %s: its UPS task(s) not completed: %s", study_uid, type(exc).__name__)

    async def _publish(
        self, folder: Path, reports: Sequence[SeriesReport], stat: bool, results: tuple[str, ...] = ()
    ) -> None:
        study_uid = str(reports[0].header.StudyInstanceUID)
        loop = asyncio.get_running_loop()
        try:
            built = await loop.run_in_executor(self.executor, self.write_documents, folder, reports, stat)
        except Exception:  # the reports for the RIS must never stop anything else
            logger.exception("study %s: FHIR / HL7 reports could not be written", study_uid)
            return
        sends = []
        bundle = built.get("FHIR")
        if self.settings.fhir.url and bundle is not None:
            sends.append(self._send_fhir(study_uid, bundle))
        address = self.settings.hl7.address()
        messages = [(kind, body.decode()) for kind, body in built.items() if kind != "FHIR"]
        if address is not None and messages:
            sends.append(self._send_hl7(study_uid, address, messages))
        if self.settings.ups.scp is not None and results:
            sends.append(self._send_ups(folder, reports, results, stat))
        await asyncio.gather(*sends)

    async def _send_ups(
        self, folder: Path, reports: Sequence[SeriesReport], results: tuple[str, ...], stat: bool
    ) -> None:
        """The worklist manager's UPS workitem for the study: created, claimed, given its outcome, completed."""
        ups = self.settings.ups
        assert ups.scp is not None
        study_uid = str(reports[0].header.StudyInstanceUID)
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.executor, stored_objects, folder, results)
            created = build_workitem(reports, stat=stat, retrieve_ae=ups.retrieve_ae_title)
            final = build_completion(reports, outputs, stat=stat, retrieve_ae=ups.retrieve_ae_title)
        except Exception as exc:  # never a cost to anything else
            logger.error("study %s: UPS workitem not built: %s", study_uid, type(exc).__name__)
            self.audit.record("ups_failed", study=study_uid, reason=f"{type(exc).__name__}: {exc}"[:300])
            return
        await self._delivered(study_uid)
        workitem = workitem_uid(study_uid, outputs)
        push = functools.partial(
            push_completed_workitem, ups.scp, workitem, created, final,
            transaction_uid=transaction_uid(workitem), calling_ae=self.settings.receiver.ae_title,
            timeout_s=ups.timeout_s,
        )  # fmt: skip
        for attempt in range(1, ups.attempts + 1):
            try:
                done = await loop.run_in_executor(self.executor, push)
            except DeliveryError as exc:
                if attempt == ups.attempts:
                    logger.error("study %s: UPS workitem not completed at %s: %s", study_uid, ups.scp, exc)
                    self.audit.record("ups_failed", study=study_uid, workitem=workitem, reason=str(exc)[:300])
                    return
                await asyncio.sleep(self.backoff.delay(attempt))
                continue
            self.audit.record(
                "ups_completed", study=study_uid, workitem=workitem, outputs=len(outputs), attempts=attempt,
                outcome=done, priority="HIGH" if stat else "MEDIUM",
            )  # fmt: skip
            return

    def write_documents(self, folder: Path, reports: Sequence[SeriesReport], stat: bool) -> dict[str, bytes]:
        """Build each document on its own (one that cannot be built never costs the others) and write it
        into ``folder``; return what was written, by kind (FHIR, ORU, OMI). Blocking."""
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
        for kind, build in documents:
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
        for kind, body in built.items():
            name = (
                f"FHIR_{stamp}_{study_uid}.json" if kind == "FHIR" else f"HL7_{kind}_{stamp}_{study_uid}.hl7"
            )
            atomic_write(folder / name, body)
        return built

    async def _send_fhir(self, study_uid: str, bundle: bytes) -> None:
        fhir = self.settings.fhir
        try:
            tries = await self.http.post(
                fhir.url,
                bundle,
                content_type="application/fhir+json",
                timeout_s=fhir.timeout_s,
                attempts=fhir.attempts,
                backoff=self.backoff,
                what="FHIR POST to",
            )
            self.audit.record("fhir_delivered", study=study_uid, url=fhir.url, attempts=tries)
        except DeliveryError as exc:
            logger.error("FHIR report of study %s not delivered (kept on disk): %s", study_uid, exc)
            self.audit.record("fhir_failed", study=study_uid, url=fhir.url, reason=str(exc))

    async def _send_hl7(
        self, study_uid: str, address: tuple[str, int], messages: list[tuple[str, str]]
    ) -> None:
        hl7 = self.settings.hl7
        for kind, text in messages:  # in order: the ORU before the priority update
            try:
                result = await send_mllp(
                    *address,
                    text,
                    timeout_s=hl7.timeout_s,
                    attempts=hl7.attempts,
                    backoff_s=self.backoff.base_s,
                )
                self.audit.record("hl7_delivered", study=study_uid, message=kind, attempts=result.attempts)
            except DeliveryError as exc:
                logger.error("HL7 %s of study %s not delivered (kept on disk): %s", kind, study_uid, exc)
                self.audit.record("hl7_failed", study=study_uid, message=kind, reason=str(exc))

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for reports in flight; what is still unsent then stays on disk, in the audit trail."""
        if not self._in_flight:
            return
        _, late = await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            logger.warning("%d study report delivery(ies) still retrying at stop: kept on disk", len(late))
            await asyncio.gather(*late, return_exceptions=True)
