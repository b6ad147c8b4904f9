"""The native C-STORE receiver (``gateway-storescp``, DCMTK, built by ``make native``), run and supervised by the
gateway: ``[receiver] engine = "native"``.

The binary does what the pynetdicom receiver's C-STORE handler does, at C++ speed, with the same rule: an instance
is acknowledged only once it is durable - in its journal (``[receiver] journal_mb``, fdatasync'ed; its spool file
written just after), or without a journal its file and folder fsynced in the spool. Instances the journal held
past its last checkpoint when the process died are put in the spool by the next start and reported here
(``REPLAYED``); those not yet analysed are assembled like received ones. Its policy is built here from the one set
of settings - AE title, host and port, the calling AE titles and source addresses allowed, the disk watermark,
timeouts, and the SOP classes and transfer syntaxes the pynetdicom receiver accepts - so both receivers apply the
same rules. It reports each event as a line on its stdout (see the binary's header); a thread here turns them into
the same calls the pynetdicom receiver makes (``on_stored`` with the instance's record - its fields as the receiver
read them from the header it checked, or, where a value is not plain ASCII, read again here after the
acknowledgement; ``on_refused``; ``on_association_end``), so nothing polls the spool.

The process is started with the gateway, restarted with backoff when it dies (its port is free again at once: a
sender retries), and stopped with the gateway; it also stops when its stdin closes or its parent dies, so a
SIGKILLed gateway leaves nothing listening.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

from gateway.config.settings import ReceiverSettings
from gateway.core.domain import InstanceRecord
from gateway.core.errors import ConfigError
from gateway.core.retry import Backoff
from gateway.ingest.spool import Spool, record_from_header

logger = logging.getLogger(__name__)

BINARY_NAME = "gateway-storescp"
READY_TIMEOUT_S = 10.0
RESTART_BACKOFF = Backoff(0.5, 10.0)


def native_binary() -> Path | None:
    """The built receiver: ``build/gateway-storescp`` of the source tree (``make native``), else on PATH."""
    built = Path(__file__).resolve().parents[2] / "build" / BINARY_NAME
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(BINARY_NAME)
    return Path(found) if found else None


def unsupported_reason(settings: ReceiverSettings, *, ups_tasks: bool) -> str:
    """Why the native receiver cannot serve these settings ("" when it can)."""
    if (settings.accept_notices or ups_tasks) and settings.services_port is None:
        return (
            "MPPS / IAN notices and UPS tasks need the pynetdicom receiver: give them a port of their own "
            "([receiver] services_port), or set [receiver] accept_notices = false and [ups] accept_tasks = false"
        )
    return ""


class NativeReceiver:
    """The native receiver process, with the interface of :class:`gateway.ingest.receiver.StoreSCP`."""

    engine = "native"

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        on_stored: Callable[[InstanceRecord], None],
        *,
        allowed_calling_aes: frozenset[str],
        on_refused: Callable[[int], None] = lambda status: None,
        on_association_end: Callable[[set[str], str], None] = lambda studies, problem: None,
        node_id: str = "",
        binary: Path | None = None,
    ) -> None:
        found = binary or native_binary()
        if found is None:
            raise ConfigError(
                f'[receiver] engine = "native" but {BINARY_NAME} is not built: run `make native` '
                '(needs Debian\'s libdcmtk-dev), or set engine = "pynetdicom"'
            )
        self.binary = found
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.on_refused = on_refused
        self.on_association_end = on_association_end
        self.allowed_calling_aes = allowed_calling_aes
        self.restarts = 0
        self.profile = (
            False  # the binary prints where each acknowledgement's time went when it stops (benchmarks)
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._log = spool.root.parent / "native-receiver.log"
        # Instances being received: inside the spool (the rename into place stays on one file system), one folder
        # per node (a shared spool), emptied at each start (nothing in it was acknowledged).
        self.incoming = (
            spool.root / f".incoming-{''.join(c if c.isalnum() else '_' for c in node_id) or 'local'}"
        )

    def command(self) -> list[str]:
        s = self.settings
        if not self.allowed_calling_aes:
            logger.warning("no calling AE allow-list configured: any AE on the network may send studies")
        return [
            str(self.binary),
            "--spool", str(self.spool.root),
            "--incoming", str(self.incoming),
            "--host", s.host,
            "--port", str(s.port),
            "--aet", s.ae_title,
            "--allow-ae", ",".join(sorted(self.allowed_calling_aes)),
            "--allow-address", ",".join(s.allowed_addresses),
            "--min-free-bytes", str(self.spool.min_free_bytes),
            "--max-pdu", str(s.max_pdu_size or 16384),
            "--acse-timeout", str(max(1, round(s.acse_timeout_s))),
            "--dimse-timeout", str(max(1, round(s.dimse_timeout_s))),
            "--sop-classes", ",".join(str(c.abstract_syntax) for c in StoragePresentationContexts),
            "--transfer-syntaxes", ",".join(ALL_TRANSFER_SYNTAXES),
            *(["--tls-cert", str(s.tls_cert_file), "--tls-key", str(s.tls_key_file)] if s.tls_cert_file else []),
            *(["--tls-ca", str(s.tls_ca_file)] if s.tls_ca_file else []),
            *(["--journal", str(self.journal), "--journal-bytes", str(s.journal_mb * 2**20)] if s.journal_mb else []),
            *(["--profile", "1"] if self.profile else []),
        ]  # fmt: skip

    @property
    def journal(self) -> Path:
        return self.incoming / "journal"

    def start(self) -> None:
        process = self._launch()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(process,), name="native-receiver", daemon=True
        )
        self._supervisor.start()
        logger.info(
            "DICOM receiver %s (native) listening on %s:%d",
            self.settings.ae_title,
            self.settings.host,
            self.port,
        )

    def _launch(self) -> subprocess.Popen[bytes]:
        if self.incoming.is_dir():
            for partial in self.incoming.glob("*.tmp"):
                partial.unlink(missing_ok=True)
        with open(self._log, "ab") as log:
            process = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, close_fds=True
            )
        assert process.stdout is not None
        replayed: list[list[str]] = []
        # The journal's instances come first, then READY. A hung start is not waited out: killed at the deadline,
        # its stdout ends. (Not select() per line: the buffered reader may already hold the next lines.)
        deadline = threading.Timer(
            READY_TIMEOUT_S + self.settings.journal_mb / 64, process.kill
        )  # + writing it out
        deadline.start()
        try:
            while (first := process.stdout.readline()).startswith(b"REPLAYED"):
                replayed.append(first.decode("utf-8", "replace").rstrip("\n").split("\t"))
        finally:
            deadline.cancel()
        if replayed:
            logger.warning(
                "native receiver: %d acknowledged instance(s) put in the spool from its journal",
                len(replayed),
            )
        for fields in replayed:  # in the spool now, whether or not this start goes on
            self._replayed(fields)
        if not first.startswith(b"READY"):
            process.kill()
            process.wait()
            tail = (
                self._log.read_text(errors="replace").strip().splitlines()[-3:] if self._log.exists() else []
            )
            raise ConfigError(
                f"the native receiver did not start on {self.settings.host}:{self.settings.port}: "
                + (" / ".join(tail) or "no reason given")
            )
        self._process = process
        return process

    def _replayed(self, fields: list[str]) -> None:
        """An instance acknowledged before the receiver died, now in the spool from its journal: assembled unless
        its study was analysed with it already."""
        path, calling_ae, received_at = Path(fields[1]), fields[2], float(fields[3])
        try:
            record = record_from_header(pydicom.dcmread(path, defer_size=1024), path, calling_ae, received_at)
        except Exception as exc:
            logger.error("journalled instance %s could not be read back (%s)", path.name, type(exc).__name__)
            return
        if record.sop_instance_uid in self.spool.processed_instances(record.study_instance_uid):
            return
        self.on_stored(record)
        self.on_association_end({record.study_instance_uid}, "")  # its association is long gone

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _supervise(self, process: subprocess.Popen[bytes]) -> None:
        failures = 0
        while True:
            self._read_events(process)
            process.wait()
            if self._stopping.is_set():
                return
            failures += 1
            self.restarts += 1
            logger.error(
                "native receiver exited (code %s); restarting (restart %d)", process.returncode, self.restarts
            )
            while not self._stopping.is_set():
                self._stopping.wait(RESTART_BACKOFF.delay(failures))
                if self._stopping.is_set():
                    return
                try:
                    process = self._launch()
                    break
                except ConfigError as exc:  # the port still held, say: try again later
                    failures += 1
                    logger.error("native receiver restart failed: %s", exc)

    def _read_events(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            fields = raw.decode("utf-8", "replace").rstrip("\n").split("\t")
            try:
                self._event(fields)
            except Exception:  # one bad line must not stop the reader; the spool keeps what was acknowledged
                logger.exception("native receiver: event %r not handled", fields[0])

    def _event(self, fields: list[str]) -> None:
        kind = fields[0]
        if kind == "STORED":
            path, calling_ae, received_at = Path(fields[1]), fields[2], float(fields[3])
            try:
                record = (
                    _record_from_fields(path, calling_ae, received_at, fields[4:])
                    if len(fields) == 14
                    else record_from_header(
                        pydicom.dcmread(path, defer_size=1024), path, calling_ae, received_at
                    )
                )
            except Exception as exc:  # durable already: recovery reads it again after a restart
                logger.error("stored instance %s could not be read back (%s)", path.name, type(exc).__name__)
                return
            self.on_stored(record)
        elif kind == "REFUSED":
            status = int(fields[1], 16)
            logger.warning("C-STORE from %s refused (status 0x%04X): %s", fields[2], status, fields[3])
            self.on_refused(status)
        elif kind == "END":
            studies = {uid for uid in fields[3].split(",") if uid}
            if studies:
                self.on_association_end(studies, fields[2])
        elif kind == "REJECTED":
            logger.warning("association from %s rejected: %s", fields[1] or "an address", fields[2])

    def stop(self) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()  # the receiver exits when its stdin closes
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
            self._supervisor = None
        self._process = None


def _record_from_fields(path: Path, calling_ae: str, received_at: float, fields: list[str]) -> InstanceRecord:
    """The record from the fields the receiver read from the header it checked (as ``record_from_header``
    builds it from a parsed header)."""
    sop_class, study, series, modality, body_part, study_desc, series_desc, priority, accession, pixels = (
        fields
    )
    return InstanceRecord(
        sop_instance_uid=path.stem,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        series_instance_uid=series,
        path=path,
        calling_ae=calling_ae,
        received_at=received_at,
        modality=modality.upper(),
        body_part=body_part.upper(),
        study_description=study_desc,
        series_description=series_desc,
        requested_priority=priority,
        accession_number=accession[:64],
        has_pixel_data=pixels == "1",
    )
