"""The durable spool: every acknowledged instance is on disk, fsynced, before the SCU hears "success".

Layout (UIDs are validated before they become path parts; no patient identifier is ever a file name)::

    <data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <data_dir>/spool/<StudyInstanceUID>/processed.json     written when the study's results are done
    <data_dir>/spool/<StudyInstanceUID>/.received-by-<node>  in a cluster: which gateway nodes received it

A write goes to a temporary file in the target folder, is fsynced, renamed into place and the folder is
fsynced, so a crash leaves either the whole instance or nothing. ``recover()`` finds the instances of studies
that were acknowledged but not yet processed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom.dsutils import encode_file_meta

from gateway.core.domain import InstanceRecord, is_valid_uid
from gateway.core.durable import atomic_write, fsync_dir
from gateway.core.errors import DatasetMismatchError, InvalidInstanceError, SpoolFullError
from gateway.core.logs import silence_identifier_warnings

logger = logging.getLogger(__name__)

PROCESSED_MARKER = "processed.json"
RECEIVED_BY = ".received-by-"


def node_file_name(node: str) -> str:
    """A node id as a file name part: its own characters where they are safe, else its hash."""
    if node and all(c.isascii() and (c.isalnum() or c in "._-") for c in node) and not node.startswith("."):
        return node
    return "h" + hashlib.sha256(node.encode()).hexdigest()[:32]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def record_from_header(ds: Dataset, path: Path, calling_ae: str, received_at: float) -> InstanceRecord:
    """Build the spool record from a dataset header, refusing instances without valid identifying UIDs."""
    uids = {}
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not is_valid_uid(value):
            raise InvalidInstanceError(f"{keyword} is missing or not a valid UID")
        uids[keyword] = value
    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        path=path,
        calling_ae=calling_ae,
        received_at=received_at,
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        requested_priority=_text(ds, "RequestedProcedurePriority"),
        accession_number=_text(ds, "AccessionNumber")[:64],
        has_pixel_data="PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
    )


class Spool:
    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        silence_identifier_warnings()  # untrusted datasets are parsed here
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise InvalidInstanceError("UID is not valid and cannot name a spool file")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def check_space(self) -> None:
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise SpoolFullError(
                f"spool disk has {free // 2**20} MiB free, below the {self.min_free_bytes // 2**20} MiB watermark"
            )

    def store(self, file_meta: FileMetaDataset, body: bytes, *, calling_ae: str) -> InstanceRecord:
        """Durably write one received instance and return its record.

        ``body`` is the dataset exactly as the SCU encoded it; the calling AE title is kept in the file meta
        (Source Application Entity Title) so that recovery after a restart knows who sent it.
        """
        self.check_space()
        meta = FileMetaDataset(file_meta)
        meta.SourceApplicationEntityTitle = calling_ae
        encoded = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), body))
        try:
            header = pydicom.dcmread(BytesIO(encoded), defer_size=4096)
            record = record_from_header(header, Path(), calling_ae, time.time())
        except InvalidInstanceError:
            raise
        except Exception as exc:  # malformed encodings surface as many exception types
            raise InvalidInstanceError(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc
        if record.sop_class_uid != str(meta.get("MediaStorageSOPClassUID", "")):
            raise DatasetMismatchError("SOP Class UID in the dataset differs from the C-STORE request")
        if record.sop_instance_uid != str(meta.get("MediaStorageSOPInstanceUID", "")):
            raise InvalidInstanceError("SOP Instance UID in the dataset differs from the C-STORE request")
        path = self.path_for(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
        for folder in (path.parent.parent, path.parent):
            if not folder.exists():
                folder.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(folder.parent)
        atomic_write(path, encoded)
        return dataclasses.replace(record, path=path)

    def _marker(self, study_uid: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / study_uid / PROCESSED_MARKER).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def mark_processed(
        self,
        study_uid: str,
        sop_uids: Iterable[str],
        results: dict[str, str] | None = None,
        objects: dict[str, list[str]] | None = None,
    ) -> None:
        """Record that these instances are analysed, the SR each (series, pipeline) produced, and every result
        object it produced (SR, GSPS, SEG), so that a later analysis can withdraw what it replaces."""
        marker = self._marker(study_uid)
        done = set(marker.get("instances", [])) | set(sop_uids)
        known = dict(marker.get("results", {}))
        known.update(results or {})
        made = dict(marker.get("objects", {}))
        made.update(objects or {})
        body = {"processed_at": time.time(), "instances": sorted(done), "results": known, "objects": made}
        atomic_write(self.root / study_uid / PROCESSED_MARKER, json.dumps(body).encode())

    def processed_instances(self, study_uid: str) -> list[str]:
        return list(self._marker(study_uid).get("instances", []))

    def has_unprocessed(self, study_uid: str) -> bool:
        """Whether the spool holds an instance of the study that no completed analysis covered."""
        done = set(self.processed_instances(study_uid))
        return any(path.stem not in done for path in (self.root / study_uid).glob("*/*.dcm"))

    def previous_result(self, study_uid: str, key: str) -> str | None:
        """The SR SOP Instance UID last written for ``key`` ("<series UID>/<pipeline>") in this study."""
        value = self._marker(study_uid).get("results", {}).get(key)
        return str(value) if value else None

    def previous_objects(self, study_uid: str, key: str) -> list[str]:
        """Every result object UID last written for ``key``; only its SR for studies marked by older versions."""
        objects = self._marker(study_uid).get("objects", {}).get(key)
        if objects:
            return [str(uid) for uid in objects]
        previous = self.previous_result(study_uid, key)
        return [previous] if previous else []

    def study_records(self, study_uid: str) -> list[InstanceRecord]:
        """Records of every instance of one study in the spool (read back from the file headers)."""
        records = []
        for path in sorted((self.root / study_uid).glob("*/*.dcm")):
            try:
                records.append(self._read_record(path))
            except Exception as exc:
                logger.warning(
                    "spool: skipping unreadable %s: %s", path.relative_to(self.root), type(exc).__name__
                )
        return records

    def _read_record(self, path: Path) -> InstanceRecord:
        header = pydicom.dcmread(path, defer_size=4096)
        calling_ae = str(header.file_meta.get("SourceApplicationEntityTitle", "")).strip()
        return record_from_header(header, path, calling_ae, path.stat().st_mtime)

    def mark_received_by(self, study_uid: str, node: str) -> None:
        """Say (in a spool shared by several gateways) that ``node`` received instances of the study: until that
        node is gone, no other node adopts the study as one nobody recorded - the receiving node analyses it,
        even when its database writes come late (after an outage). Not fsynced: a crash that loses the mark also
        took the node, whose studies are adopted anyway."""
        folder = self.root / study_uid
        if not is_valid_uid(study_uid) or not folder.is_dir():
            return
        (folder / f"{RECEIVED_BY}{node_file_name(node)}").touch(exist_ok=True)

    def received_by(self, study_uid: str) -> set[str]:
        """The nodes (as file name parts) that marked the study as received; empty for an unmarked study."""
        if not is_valid_uid(study_uid):
            return set()
        return {p.name[len(RECEIVED_BY) :] for p in (self.root / study_uid).glob(f"{RECEIVED_BY}*")}

    def unprocessed_studies(self, *, quiet_for_s: float = 0.0) -> list[str]:
        """Studies with an instance not yet processed (and, with ``quiet_for_s``, no file newer than that:
        nobody is still writing them)."""
        found = []
        now = time.time()
        for study_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name)):
            files = list(study_dir.glob("*/*.dcm"))
            done = set(self.processed_instances(study_dir.name))
            if not any(path.stem not in done for path in files):
                continue
            if quiet_for_s and any(now - path.stat().st_mtime < quiet_for_s for path in files):
                continue
            found.append(study_dir.name)
        return found

    def recover(self, studies: Iterable[str] | None = None) -> list[InstanceRecord]:
        """Records of every spooled instance whose study has not been processed with it yet (of ``studies``
        only, when given: a spool shared by several gateways)."""
        records = []
        dirs = (
            sorted(p for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name))
            if studies is None
            else [
                self.root / uid for uid in sorted(studies) if is_valid_uid(uid) and (self.root / uid).is_dir()
            ]
        )
        for study_dir in dirs:
            done = set(self.processed_instances(study_dir.name))
            for path in sorted(study_dir.glob("*/*.dcm")):
                if path.stem in done:
                    continue
                try:
                    records.append(self._read_record(path))
                except Exception as exc:
                    logger.warning(
                        "spool recovery: skipping unreadable %s: %s", path.relative_to(self.root), exc
                    )
            for tmp in study_dir.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)  # half-written before a crash: never acknowledged
        return records
