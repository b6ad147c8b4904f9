"""Result delivery: keep every result under the data directory, then C-STORE it to the destination.

The destination is ``[delivery].destination`` when set, otherwise the known peer that sent the study. Transient
failures are retried with exponential backoff; a failure after the last try raises ``DeliveryError`` and the
results stay on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from clients.dicom_scu import store_datasets
from gateway.errors import DeliveryError
from gateway.settings import Peer, Settings
from gateway.spool import atomic_write, fsync_dir

logger = logging.getLogger(__name__)


def encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class ResultStore:
    """``<data_dir>/results/<StudyInstanceUID>/<Modality>_<SOPInstanceUID>.dcm``"""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load(self, study_uid: str, sop_uid: str) -> Dataset | None:
        matches = sorted((self.root / study_uid).glob(f"*_{sop_uid}.dcm"))
        return pydicom.dcmread(matches[0]) if matches else None

    def save(self, study_uid: str, datasets: Sequence[Dataset]) -> list[Path]:
        folder = self.root / study_uid
        if not folder.exists():
            folder.mkdir(mode=0o700)
            fsync_dir(self.root)
        paths = []
        for ds in datasets:
            path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            atomic_write(path, encode(ds))
            paths.append(path)
        return paths


class Deliverer:
    def __init__(self, settings: Settings, *, attempts: int = 3, backoff_s: float = 1.0) -> None:
        self.settings = settings
        self.attempts = attempts
        self.backoff_s = backoff_s

    def destination_for(self, calling_ae: str) -> Peer | None:
        return self.settings.delivery.destination or self.settings.peer_for(calling_ae)

    def deliver(self, datasets: Sequence[Dataset], destination: Peer) -> None:
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                report = store_datasets(
                    datasets,
                    destination,
                    calling_ae=self.settings.receiver.ae_title,
                    timeout_s=self.settings.delivery.timeout_s,
                )
                if report.ok:
                    return
                last = DeliveryError(
                    f"{destination} refused {len(report.failed)} result(s): {report.failed[0][1]}"
                )
            except DeliveryError as exc:
                last = exc
            if attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "delivery to %s failed (try %d/%d), retrying in %.1fs: %s",
                    destination,
                    attempt,
                    self.attempts,
                    delay,
                    last,
                )
                time.sleep(delay)
        raise DeliveryError(f"delivery to {destination} failed after {self.attempts} tries: {last}")
