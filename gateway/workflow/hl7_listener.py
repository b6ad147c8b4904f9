"""The HL7 v2 listener: an MLLP server on the gateway's event loop that takes the RIS's order and report feeds.

Each message is answered on the connection it came on, in order: ADT^A01 / A04 / A08 are accepted (the gateway
keeps no demographics; the event is audited), ORM^O01 / OMI^O23 are stored as orders and ORU^R01 as final
reports (when a report sink is given) - committed to the system of record *before* the acknowledgement, so an
accepted message is never lost - and anything else is rejected with the reason in ERR. Nothing a sender does (garbage, a half frame, a silent connection, a database that is down)
crashes the listener or passes silently: every message gets its acknowledgement as MSH-15 asks (``hl7v2``) and
one log line without patient data (message type and control id only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from clients.mllp import MAX_FRAME_BYTES, frame, read_frame
from clients.tls import server_tls_context
from gateway.config.settings import OrdersSettings
from gateway.workflow.final_reports import REPORT_MESSAGES, FinalReport, ReportError, report_from_message
from gateway.workflow.hl7v2 import Er7Message, Hl7Error, Outcome, acknowledgement
from gateway.workflow.orders import ORDER_MESSAGES, OrderError, OrderStore, order_from_message

logger = logging.getLogger(__name__)

ADT_EVENTS = {"A01", "A04", "A08"}
IDLE_TIMEOUT_S = 300.0  # a connection silent this long is closed (the RIS reconnects)
WRITE_TIMEOUT_S = 10.0


class Hl7Listener:
    def __init__(
        self,
        store: OrderStore,
        *,
        host: str,
        port: int,
        application: str,
        facility: str,
        executor: Executor | None = None,
        on_event: Callable[..., None] | None = None,
        expected_images_field: str = "OBR-37",
        ssl_context: ssl.SSLContext | None = None,
        reports: Callable[[FinalReport], object] | None = None,
    ) -> None:
        self.store = store
        self.reports = reports  # stores a final report durably (blocking; run in the executor)
        self.expected_images_field = expected_images_field
        self.ssl_context = ssl_context
        self.host = host
        self.requested_port = port
        self.application = application
        self.facility = facility
        self.executor = executor
        self.on_event = on_event or (lambda *a, **k: None)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @classmethod
    def for_settings(
        cls,
        settings: OrdersSettings,
        store: OrderStore,
        *,
        executor: Executor | None = None,
        on_event: Callable[..., None] | None = None,
        reports: Callable[[FinalReport], object] | None = None,
    ) -> Hl7Listener | None:
        """The listener ``[orders]`` asks for, or None when it is off."""
        if not settings.enabled:
            return None
        return cls(
            store,
            host=settings.host,
            port=settings.port,
            application=settings.application,
            facility=settings.facility,
            executor=executor,
            on_event=on_event,
            reports=reports,
            expected_images_field=settings.expected_images_field,
            ssl_context=server_tls_context(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file
            )
            if settings.tls_cert_file is not None and settings.tls_key_file is not None
            else None,
        )

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.requested_port,
            limit=MAX_FRAME_BYTES,
            ssl=self.ssl_context,
            ssl_handshake_timeout=IDLE_TIMEOUT_S if self.ssl_context is not None else None,
        )
        logger.info(
            "HL7 order listener (MLLP%s) on %s:%d",
            " over TLS" if self.ssl_context else "",
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    text = await asyncio.wait_for(read_frame(reader), IDLE_TIMEOUT_S)
                except (ConnectionError, TimeoutError):
                    return
                ack = await self.answer(text)
                if ack is not None:
                    writer.write(frame(ack))
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, text: str) -> str | None:
        """Process one message; return its acknowledgement (None when MSH-15 asks for none)."""
        message: Er7Message | None = None
        try:
            message = Er7Message(text)
        except Hl7Error as exc:
            outcome = Outcome(status="rejected", reason=str(exc), error_code="100")
        else:
            outcome = await self._process(message)
        kind = "^".join(message.message_type) if message is not None else "?"
        control = message.control_id[:40] if message is not None else ""
        if outcome.status == "accepted":
            logger.info("HL7 %s accepted (control id %s)", kind, control)
        else:
            logger.warning("HL7 %s %s (control id %s): %s", kind, outcome.status, control, outcome.reason)
        self.on_event(
            f"hl7_{outcome.status}",
            message=kind,
            control_id=control,
            **({"reason": outcome.reason} if outcome.reason else {}),
        )
        return acknowledgement(message, outcome, application=self.application, facility=self.facility)

    async def _process(self, message: Er7Message) -> Outcome:
        kind = message.message_type
        if kind[0] == "ADT" and kind[1] in ADT_EVENTS:
            return Outcome(status="accepted")
        if kind in REPORT_MESSAGES and self.reports is not None:
            return await self._report(message)
        if kind not in ORDER_MESSAGES:
            return Outcome(
                status="rejected",
                reason=f"message type {kind[0]}^{kind[1]} is not taken here",
                error_code="200",
            )
        try:
            order = order_from_message(message, self.expected_images_field)
        except OrderError as exc:
            return Outcome(status="error", reason=str(exc), error_code="101")
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.store.save, order)
        except Exception as exc:  # the database is down or refuses: the sender keeps the message and resends
            logger.error("HL7 order not stored: %s", type(exc).__name__)
            return Outcome(
                status="error", reason="the order cannot be stored now; send it again", error_code="207"
            )
        return Outcome(status="accepted")

    async def _report(self, message: Er7Message) -> Outcome:
        try:
            report = report_from_message(message)
        except ReportError as exc:
            return Outcome(status="error", reason=str(exc), error_code="101")
        assert self.reports is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.reports, report)
        except Exception as exc:  # the database is down or refuses: the sender keeps the message and resends
            logger.error("HL7 report not stored: %s", type(exc).__name__)
            return Outcome(
                status="error", reason="the report cannot be stored now; send it again", error_code="207"
            )
        return Outcome(status="accepted")
