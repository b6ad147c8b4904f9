"""The DICOM receiver: C-ECHO and C-STORE SCP on pynetdicom.

The C-STORE handler writes the instance durably to the spool, hands the record on, and returns; it never
calls Triton or anything slow. Unknown calling AE titles are rejected at association. When the spool is
above its disk watermark, stores are answered "out of resources" instead of being accepted and dropped.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from clients.tls import server_tls_context
from gateway.config.settings import ReceiverSettings
from gateway.core.domain import InstanceRecord
from gateway.core.errors import STATUS_SUCCESS, ConfigError, GatewayError, dimse_status_for
from gateway.ingest.notices import NoticeSCP
from gateway.ingest.spool import Spool

logger = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """The one place where pynetdicom's global switches are set: no patient identifiers in its logs."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class AssociationTracker:
    """Which studies each open association stored, and how the association ended.

    When the connection closes, ``on_end(study_uids, problem)`` is called with ``problem`` empty for a normal
    release without refusals, else "association aborted" (an A-ABORT or a dropped connection) or "instances
    refused": the
    assembler then holds those studies for the incomplete-study guard time.
    """

    def __init__(self, on_end: Callable[[set[str], str], None]) -> None:
        self._on_end = on_end
        self._lock = threading.Lock()
        self._studies: dict[int, set[str]] = {}
        self._refused: set[int] = set()

    def stored(self, assoc: Any, study_uid: str) -> None:
        with self._lock:
            self._studies.setdefault(id(assoc), set()).add(study_uid)

    def refused(self, assoc: Any) -> None:
        with self._lock:
            self._refused.add(id(assoc))

    def closed(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            studies = self._studies.pop(id(assoc), set())
            refused = id(assoc) in self._refused
            self._refused.discard(id(assoc))
        if not studies:
            return
        if not assoc.is_released:  # an A-ABORT from either side, or a connection that dropped
            problem = "association aborted"
        elif refused:
            problem = "instances refused"
        else:
            problem = ""
        if problem:
            logger.warning(
                "association from %s (AE %s) ended badly (%s): %d study(ies) wait for the incomplete-study guard",
                assoc.requestor.address,
                assoc.requestor.ae_title,
                problem,
                len(studies),
            )
        self._on_end(studies, problem)


def handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS


class StoreIntercept(Protocol):
    """Takes some instances instead of the spool (a radiologist's verdict stored back by a viewer): called
    for the SOP classes it names, it answers None (not one of its own: spool it) or the status to send."""

    sop_classes: frozenset[str]

    def __call__(self, ds: Dataset, calling_ae: str) -> int | Dataset | None: ...


def handle_store(
    event: evt.Event,
    spool: Spool,
    on_stored: Callable[[InstanceRecord], None],
    on_refused: Callable[[int], None],
    tracker: AssociationTracker | None = None,
    intercept: StoreIntercept | None = None,
) -> int | Dataset:
    calling_ae = event.assoc.requestor.ae_title.strip()
    if intercept is not None and str(event.request.AffectedSOPClassUID) in intercept.sop_classes:
        try:
            answer = intercept(event.dataset, calling_ae)
        except Exception as exc:  # a broken object must never take the receiver down
            logger.exception("C-STORE from %s: the verdict check failed: %s", calling_ae, type(exc).__name__)
            answer = None  # stored as any instance; nothing is lost
        if answer is not None:
            return answer
    try:
        record = spool.store(
            event.file_meta, event.encoded_dataset(include_meta=False), calling_ae=calling_ae
        )
    except GatewayError as exc:
        status = dimse_status_for(exc)
        logger.warning("C-STORE from %s refused (status 0x%04X): %s", calling_ae, status, exc)
        on_refused(status)
        if tracker is not None:
            tracker.refused(event.assoc)
        return status
    except Exception as exc:  # a broken file must never take the receiver down
        status = dimse_status_for(exc)
        logger.exception("C-STORE from %s failed (status 0x%04X): %s", calling_ae, status, type(exc).__name__)
        on_refused(status)
        if tracker is not None:
            tracker.refused(event.assoc)
        return status
    if tracker is not None:
        tracker.stored(event.assoc, record.study_instance_uid)
    try:
        on_stored(record)
    except Exception:  # durable already: recovery will pick it up
        logger.exception("instance stored but not registered for assembly; it is recovered on restart")
    return STATUS_SUCCESS


def abort_malformed_request(event: evt.Event) -> None:
    """Abort an association at once when a request's command set lacks what its service needs (a C-STORE-RQ
    without its Affected SOP Instance UID, say). pynetdicom would only log such a request and leave the
    association open until the network timeout, holding a slot and the sender; DCMTK aborts. The abort goes
    through the association's own state machine (event 19, "invalid PDU"), as pynetdicom does for a DIMSE
    message it cannot convert."""
    message = event.message
    if not type(message).__name__.endswith("_RQ"):
        return
    try:
        valid = bool(getattr(message.message_to_primitive(), "is_valid_request", True))
    except Exception:
        valid = False
    if not valid:
        logger.warning(
            "malformed %s from %s (AE %s): required command elements missing; association aborted",
            type(message).__name__.replace("_", "-"),
            event.assoc.requestor.address,
            event.assoc.requestor.ae_title,
        )
        event.assoc.dul.event_queue.put("Evt19")


def log_rejection(event: evt.Event) -> None:
    logger.warning(
        "association from %s (AE %s) rejected", event.assoc.requestor.address, event.assoc.requestor.ae_title
    )


def check_port_free(host: str, port: int) -> None:
    """Fail fast, before anything slow starts, when the DICOM port is taken."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; "
                "is another DICOM service using the port? Choose one with --port"
            ) from exc


class AllowListServer(ThreadedAssociationServer):
    """The pynetdicom server, closing connections from source addresses that are not allowed."""

    allowed_addresses: frozenset[str] = frozenset()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allowed_addresses and client_address[0] not in self.allowed_addresses:
            logger.warning(
                "connection from %s refused: address not in receiver.allowed_addresses", client_address[0]
            )
            return False
        return True


def tls_context(settings: ReceiverSettings) -> ssl.SSLContext | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return server_tls_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


class StoreSCP:
    """A running C-STORE / C-ECHO server bound to the configured address."""

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        on_stored: Callable[[InstanceRecord], None],
        *,
        allowed_calling_aes: frozenset[str],
        on_refused: Callable[[int], None] = lambda status: None,
        on_association_end: Callable[[set[str], str], None] = lambda studies, problem: None,
        notices: NoticeSCP | None = None,
        intercept: StoreIntercept | None = None,
    ) -> None:
        configure_pynetdicom()
        self.settings = settings
        ae = AE(ae_title=settings.ae_title)
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.maximum_pdu_size = settings.max_pdu_size
        ae.maximum_associations = 64
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        if notices is not None:
            for sop_class in notices.sop_classes:
                ae.add_supported_context(sop_class)
        if allowed_calling_aes:
            ae.require_calling_aet = sorted(allowed_calling_aes)
        else:
            logger.warning("no calling AE allow-list configured: any AE on the network may send studies")
        self.ae = ae
        self.tracker = AssociationTracker(on_association_end)
        self.handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [spool, on_stored, on_refused, self.tracker, intercept]),
            (evt.EVT_CONN_CLOSE, self.tracker.closed),
            (evt.EVT_REJECTED, log_rejection),
            (evt.EVT_DIMSE_RECV, abort_malformed_request),
            *(notices.handlers if notices is not None else []),
        ]
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        try:
            server: AllowListServer = self.ae.make_server(
                (self.settings.host, self.settings.port),
                evt_handlers=self.handlers,
                ssl_context=tls_context(self.settings),
                server_class=AllowListServer,
            )  # type: ignore[assignment]
        except OSError:
            check_port_free(self.settings.host, self.settings.port)  # raises the explanatory ConfigError
            raise
        server.allowed_addresses = frozenset(self.settings.allowed_addresses)
        self.ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it again
        thread = threading.Thread(target=server.serve_forever, name="dicom-receiver", daemon=True)
        thread.start()
        self.server = server
        logger.info(
            "DICOM receiver %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port
        )

    @property
    def port(self) -> int:
        if self.server is None:
            return self.settings.port
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
