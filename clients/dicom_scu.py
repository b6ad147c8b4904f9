"""DICOM C-STORE / C-ECHO client used by `gateway send`, result delivery and the benchmarks."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    Verification,
)

from gateway.config.settings import Peer
from gateway.core.errors import DeliveryError, WorklistError, dimse_accepted

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
FILES_PER_ASSOCIATION = 256


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file or SOP Instance UID, reason)

    @property
    def ok(self) -> bool:
        return not self.failed


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def client_tls_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A DICOM TLS client context trusting ``ca_file``; with a certificate and key for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def _tls(ssl_context: ssl.SSLContext | None, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    return (ssl_context, peer.host) if ssl_context is not None else None


def echo(
    peer: Peer,
    *,
    calling_ae: str = "AI_GATEWAY",
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """C-ECHO; with ``ssl_context`` over DICOM TLS (the server name checked is the peer's host)."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls(ssl_context, peer))
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def find_worklist(
    peer: Peer,
    query: Dataset,
    *,
    calling_ae: str = "AI_GATEWAY",
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[Dataset]:
    """C-FIND on a Modality Worklist SCP: every matching scheduled procedure step. Raises ``WorklistError`` when the
    SCP cannot be reached or its answer ends in a failure."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls(ssl_context, peer))
    if not assoc.is_established:
        raise WorklistError(f"association with worklist {peer} was rejected, aborted or never connected")
    matches: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            code = int(status.Status) if status and "Status" in status else -1
            if code in (0xFF00, 0xFF01):  # pending: one match
                if identifier is not None:
                    matches.append(identifier)
            elif code != 0x0000:
                reason = "no response (aborted or timed out)" if code < 0 else f"status 0x{code:04X}"
                raise WorklistError(f"worklist {peer} query failed: {reason}")
    finally:
        if assoc.is_established:
            assoc.release()
    return matches


class OpenAssociations:
    """The associations a caller's sends hold open, so that a stop can abort them (a hung peer would otherwise hold
    a send, and the process, until the DIMSE timeout). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._open: set[Any] = set()
        self._closing = False

    def add(self, assoc: Any) -> None:
        with self._lock:
            self._open.add(assoc)
            closing = self._closing
        if closing:
            assoc.abort()

    def discard(self, assoc: Any) -> None:
        with self._lock:
            self._open.discard(assoc)
            self._lock.notify_all()

    def close(self, grace_s: float) -> None:
        """Let the open associations finish for up to ``grace_s``, then abort those still open (and any opened from
        now on)."""
        with self._lock:
            self._closing = True
            self._lock.wait_for(lambda: not self._open, timeout=grace_s)
            open_now = list(self._open)
        for assoc in open_now:
            assoc.abort()


def store_datasets(
    datasets: Sequence[Dataset],
    peer: Peer,
    *,
    calling_ae: str = "AI_GATEWAY",
    timeout_s: float = 30.0,
    progress: Iterable[int] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tracked: OpenAssociations | None = None,
) -> SendReport:
    """C-STORE datasets over one association. Raises ``DeliveryError`` when the peer cannot be reached. With
    ``tracked``, the association is registered there while it is open (a stop may abort it)."""
    report = SendReport()
    if not datasets:
        return report
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    if len(pairs) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(pairs)} SOP class / transfer syntax pairs exceed {MAX_CONTEXTS} contexts")
    ae = _make_ae(calling_ae, timeout_s)
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in pairs]
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=_tls(ssl_context, peer))
    if not assoc.is_established:
        raise DeliveryError(f"association with {peer} was rejected, aborted or never connected")
    if tracked is not None:
        tracked.add(assoc)
    ticks = iter(progress) if progress is not None else None
    try:
        for ds in datasets:
            if not assoc.is_established:  # aborted (a stop): the rest is not sent
                report.failed.append((str(ds.SOPInstanceUID), "association aborted"))
                continue
            uid = str(ds.SOPInstanceUID)
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                report.failed.append((uid, f"{type(exc).__name__}: {exc}"))
                continue
            code = int(status.Status) if status and "Status" in status else -1
            if code >= 0 and dimse_accepted(code):
                report.sent += 1
            else:
                reason = (
                    "no response (association aborted or timed out)" if code < 0 else f"status 0x{code:04X}"
                )
                report.failed.append((uid, reason))
            if ticks is not None:
                next(ticks, None)
    finally:
        if tracked is not None:
            tracked.discard(assoc)
        if assoc.is_established:
            assoc.release()
    return report


def store_files(
    paths: Sequence[Path],
    peer: Peer,
    *,
    calling_ae: str = "AI_GATEWAY",
    timeout_s: float = 30.0,
    on_progress: object = None,
    ssl_context: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE files, FILES_PER_ASSOCIATION at a time (only those are held in memory). Unreadable files are
    reported, not sent. ``on_progress`` is a tqdm-like object."""
    report = SendReport()
    for start in range(0, len(paths), FILES_PER_ASSOCIATION):
        chunk = []
        for path in paths[start : start + FILES_PER_ASSOCIATION]:
            try:
                chunk.append(pydicom.dcmread(path))
            except Exception as exc:
                report.failed.append((str(path), f"not a readable DICOM file: {exc}"))
                if on_progress is not None:
                    on_progress.update(1)  # type: ignore[attr-defined]
        if not chunk:
            continue
        ticker = _Ticker(on_progress) if on_progress is not None else None
        sub = store_datasets(
            chunk, peer, calling_ae=calling_ae, timeout_s=timeout_s, progress=ticker, ssl_context=ssl_context
        )
        report.sent += sub.sent
        report.failed.extend(sub.failed)
    return report


class _Ticker:
    """Adapts a tqdm-like ``update`` to the iterator ``store_datasets`` advances once per instance."""

    def __init__(self, bar: object) -> None:
        self.bar = bar

    def __iter__(self) -> _Ticker:
        return self

    def __next__(self) -> int:
        self.bar.update(1)  # type: ignore[attr-defined]
        return 1
