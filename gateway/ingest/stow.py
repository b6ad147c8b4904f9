"""DICOMweb STOW-RS (PS3.18 10.5): instances POSTed over HTTP, stored with the same rule as C-STORE.

A request is ``multipart/related; type="application/dicom"``, one DICOM Part 10 file per part. Each part goes
through :meth:`Spool.store` - parsed, checked, written and fsynced with its folder - before the response is sent,
so a 200 means every instance is on disk, exactly as a C-STORE success does. Each stored instance is handed on
(``on_stored``) like a received one, and when the request ends its studies are told the request ended
(``on_end``, as an association's end): a request with refused parts holds its studies for the incomplete-study
guard time.

The response is the Store Instances Response Module as DICOM JSON: Referenced SOP Sequence for what was stored,
Failed SOP Sequence with a Failure Reason for what was not (the C-STORE status the same error gets over DIMSE:
0xA700 out of resources, 0xA900 data set does not match its SOP class, 0xC000 cannot understand, 0x0110
processing failure; 0xA900 also for an instance of another study than the one in the request's path). HTTP
status: 200 every instance stored, 202 some stored, 409 none stored.

This module knows nothing of HTTP servers: the API reads the body and calls :meth:`StowStore.store`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from gateway.core.domain import InstanceRecord
from gateway.core.errors import STATUS_DATASET_MISMATCH, GatewayError, InvalidInstanceError, dimse_status_for
from gateway.ingest.spool import Spool

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
RESPONSE_MEDIA_TYPE = "application/dicom+json"


class StowRequestError(GatewayError):
    """The request itself is wrong (not multipart/related of application/dicom, no boundary, no parts): the
    API answers 415 or 400 with this text and stores nothing."""

    def __init__(self, message: str, *, unsupported_media_type: bool = False) -> None:
        super().__init__(message)
        self.unsupported_media_type = unsupported_media_type


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of the ``application/dicom`` parts of a ``multipart/related`` request body."""
    header = Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/related":
        raise StowRequestError(
            f'Content-Type must be multipart/related; type="{DICOM_MEDIA_TYPE}", got {content_type!r}',
            unsupported_media_type=True,
        )
    kind = str(header.get_param("type") or DICOM_MEDIA_TYPE).lower()
    if kind != DICOM_MEDIA_TYPE:
        raise StowRequestError(
            f"only {DICOM_MEDIA_TYPE} parts are accepted (metadata and bulk data are not), got type={kind!r}",
            unsupported_media_type=True,
        )
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise StowRequestError("the multipart/related Content-Type has no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(b"\r\n" + delimiter)
    # The first delimiter may open the body without a CRLF before it; anything before it is the preamble.
    first = chunks[0]
    if first.startswith(delimiter):
        chunks[0] = first[len(delimiter) :]
    else:
        chunks = chunks[1:]
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):  # the close delimiter: the epilogue follows
            break
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise StowRequestError("a multipart part has no header/body separator")
        part = Message()
        for line in head.decode("latin-1").split("\r\n")[1:]:  # the delimiter line's rest, then headers
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        media = part.get_content_type() if part.get("content-type") else DICOM_MEDIA_TYPE
        if media != DICOM_MEDIA_TYPE:
            raise StowRequestError(f"a part is {media}; only {DICOM_MEDIA_TYPE} parts are accepted",
                                   unsupported_media_type=True)  # fmt: skip
        parts.append(content)
    if not parts:
        raise StowRequestError("the request holds no DICOM part")
    return parts


@dataclass(frozen=True, kw_only=True)
class StowOutcome:
    """What a STOW-RS request stored and refused, as the response the client gets."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, Failure Reason)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self) -> dict[str, Any]:
        """The Store Instances Response Module as DICOM JSON."""
        ds = Dataset()
        ds.ReferencedSOPSequence = [_reference(cls, uid) for cls, uid in self.stored]
        if self.failed:
            failed = []
            for cls, uid, reason in self.failed:
                item = _reference(cls, uid)
                item.FailureReason = reason
                failed.append(item)
            ds.FailedSOPSequence = failed
        return ds.to_json_dict()


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _split_part10(part: bytes) -> tuple[FileMetaDataset, bytes]:
    """A Part 10 file's meta information and the data set as it was encoded (never re-encoded)."""
    stream = BytesIO(part)
    try:
        read_preamble(stream, False)  # the 128-byte preamble and "DICM", or InvalidDicomError
        meta = _read_file_meta_info(stream)  # leaves the stream just past the meta group
    except Exception as exc:  # malformed meta groups surface as many exception types
        raise InvalidInstanceError(f"not a DICOM Part 10 file: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in _REQUIRED_META if not str(meta.get(k, "") or "").strip()]
    if missing:
        raise InvalidInstanceError(f"the file meta information lacks {', '.join(missing)}")
    return meta, part[stream.tell() :]


_REQUIRED_META = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


class StowStore:
    """Stores the parts of STOW-RS requests in the spool and hands each instance on, as the DIMSE receiver does."""

    def __init__(
        self,
        spool: Spool,
        on_stored: Callable[[InstanceRecord], None],
        on_end: Callable[[set[str], str], None] = lambda studies, problem: None,
        on_refused: Callable[[int], None] = lambda status: None,
    ) -> None:
        self.spool = spool
        self.on_stored = on_stored
        self.on_end = on_end
        self.on_refused = on_refused

    def receive(self, content_type: str, body: bytes, source_ae: str, study_uid: str | None) -> StowOutcome:
        """One request: its body split into parts (StowRequestError when it cannot be), each part stored."""
        return self.store(dicom_parts(content_type, body), source_ae=source_ae, study_uid=study_uid)

    def store(self, parts: list[bytes], *, source_ae: str, study_uid: str | None = None) -> StowOutcome:
        """Store every part (blocking: each one written and fsynced); ``study_uid`` from the request's path."""
        outcome = StowOutcome()
        studies: set[str] = set()
        for part in parts:
            sop_class = sop_instance = ""
            try:
                meta, body = _split_part10(part)
                sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
                sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
                if study_uid is not None:
                    _check_study(part, study_uid)
                record = self.spool.store(meta, body, calling_ae=source_ae)
            except Exception as exc:
                reason = (
                    dimse_status_for(exc) if not isinstance(exc, _OtherStudy) else STATUS_DATASET_MISMATCH
                )
                logger.warning("STOW-RS instance from %s refused (0x%04X): %s", source_ae, reason,
                               exc if isinstance(exc, GatewayError) else type(exc).__name__)  # fmt: skip
                outcome.failed.append((sop_class, sop_instance, reason))
                self.on_refused(reason)
                continue
            studies.add(record.study_instance_uid)
            outcome.stored.append((record.sop_class_uid, record.sop_instance_uid))
            try:
                self.on_stored(record)
            except Exception:  # durable already: recovery will pick it up
                logger.exception(
                    "instance stored but not registered for assembly; it is recovered on restart"
                )
        if studies:
            self.on_end(studies, "instances refused" if outcome.failed else "")
        return outcome


class _OtherStudy(InvalidInstanceError):
    """An instance of another study than the one the request's path names."""


def _check_study(part: bytes, study_uid: str) -> None:
    try:
        found = str(
            pydicom.dcmread(BytesIO(part), specific_tags=["StudyInstanceUID"]).get("StudyInstanceUID", "")
        )
    except Exception as exc:  # malformed encodings surface as many exception types
        raise InvalidInstanceError(f"dataset cannot be parsed: {type(exc).__name__}") from exc
    if found != study_uid:
        raise _OtherStudy("the instance belongs to another study than the request's path names")
