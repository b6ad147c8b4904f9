"""The result store: every result object is kept under the data directory before it is sent anywhere.

Sending is the outbox's job (``gateway/delivery/outbox.py``): durable per-destination queues with retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from gateway.core.durable import atomic_write, fsync_dir


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

    def load(self, study_uid: str, sop_uid: str, *, header_only: bool = False) -> Dataset | None:
        matches = sorted((self.root / study_uid).glob(f"*_{sop_uid}.dcm"))
        if not matches:
            return None
        return pydicom.dcmread(matches[0], stop_before_pixels=header_only)

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
