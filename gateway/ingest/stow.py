"""DICOMweb STOW-RS (PS3.18 10.5): instances POSTed over HTTP, stored with the same rule as C-STORE.

A request is ``multipart/related; type="application/dicom"``, one DICOM Part 10 file per part. The body is split
as it streams in and each part goes through :meth:`Spool.store` - parsed, checked, written and fsynced with its
folder - as soon as it is complete (one part in memory at a time), all before the response is sent, so a 200
means every instance is on disk, exactly as a C-STORE success does. Each stored instance is handed on
(``on_stored``) like a received one, and when the request ends its studies are told the request ended
(``on_end``, as an association's end): a request with refused parts holds its studies for the incomplete-study
guard time.

The response is the Store Instances Response Module as DICOM JSON: Referenced SOP Sequence for what was stored,
Failed SOP Sequence with a Failure Reason for what was not (the C-STORE status the same error gets over DIMSE:
0xA700 out of resources, 0xA900 data set does not match its SOP class, 0xC000 cannot understand, 0x0110
processing failure; 0xA900 also for an instance of another study than the one in the request's path). HTTP
status: 200 every instance stored, 202 some stored, 409 none stored.

This module knows nothing of HTTP servers: the API opens a :class:`StowRequest` (:meth:`StowStore.open`), feeds it
the body's chunks and asks it to ``finish``.
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
from gateway.core.errors import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    GatewayError,
    InvalidInstanceError,
    dimse_status_for,
)
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


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request's Content-Type (StowRequestError when it is not one)."""
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
    return boundary.encode("latin-1")


class PartReader:
    """Splits a multipart body into its parts as the body streams in: ``feed`` returns every part completed by
    the data so far as (media type, content), ``close`` the last one. Only one part (and the chunk that completes
    it) is held in memory. A body without its close delimiter ends with the data after the last delimiter."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")  # so that a first delimiter without a CRLF before it is found alike
        self._scan_from = 0
        self._in_part = False  # a delimiter has been seen: what follows is a part (or "--", the close)
        self._closed = False  # the close delimiter has been seen: the rest is the epilogue

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        if self._closed:
            return []
        self._buffer += data
        parts = []
        while not self._closed:
            at = self._buffer.find(self._delimiter, self._scan_from)
            if at < 0:  # the delimiter may straddle this chunk and the next: search its possible start again
                self._scan_from = max(0, len(self._buffer) - len(self._delimiter) + 1)
                break
            if self._in_part:
                part = self._part(bytes(self._buffer[:at]))
                if part is not None:
                    parts.append(part)
            self._in_part = True  # what precedes the first delimiter is the preamble
            del self._buffer[: at + len(self._delimiter)]
            self._scan_from = 0
        return parts

    def close(self) -> list[tuple[str, bytes]]:
        if self._closed or not self._in_part:
            return []
        last = self._part(bytes(self._buffer))
        self._buffer.clear()
        return [last] if last is not None else []

    def _part(self, raw: bytes) -> tuple[str, bytes] | None:
        if raw.startswith(b"--"):  # the close delimiter
            self._closed = True
            return None
        head, separator, content = raw.partition(b"\r\n\r\n")
        if not separator:
            raise StowRequestError("a multipart part has no header/body separator")
        headers = Message()
        for line in head.decode("latin-1").split("\r\n")[1:]:  # the delimiter line's rest, then the headers
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        media = headers.get_content_type() if headers.get("content-type") else DICOM_MEDIA_TYPE
        return media, content


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of the parts of a whole ``multipart/related`` request body (StowRequestError when a part is
    not application/dicom or there is none)."""
    reader = PartReader(boundary_of(content_type))
    parts = reader.feed(body) + reader.close()
    for media, _ in parts:
        if media != DICOM_MEDIA_TYPE:
            raise StowRequestError(f"a part is {media}; only {DICOM_MEDIA_TYPE} parts are accepted",
                                   unsupported_media_type=True)  # fmt: skip
    if not parts:
        raise StowRequestError("the request holds no DICOM part")
    return [content for _, content in parts]


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
        """A whole request body at once (what ``open`` / ``feed`` / ``finish`` do as it streams in)."""
        request = self.open(content_type, source_ae, study_uid)
        request.feed(body)
        return request.finish()

    def open(self, content_type: str, source_ae: str, study_uid: str | None) -> StowRequest:
        """A request whose body is about to stream in (StowRequestError for a Content-Type that is not STOW-RS)."""
        return StowRequest(
            self, PartReader(boundary_of(content_type)), source_ae=source_ae, study_uid=study_uid
        )


class StowRequest:
    """One STOW-RS request as its body streams in: each part stored as soon as it is complete (blocking calls:
    run them off the event loop), the outcome when the body has ended."""

    def __init__(
        self, store: StowStore, reader: PartReader, *, source_ae: str, study_uid: str | None
    ) -> None:
        self._store = store
        self._reader = reader
        self.source_ae = source_ae
        self.study_uid = study_uid
        self.outcome = StowOutcome()
        self._studies: set[str] = set()
        self._broken = ""  # why the body could not be split further (parts before it are kept)

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            parts = self._reader.feed(data)
        except StowRequestError as exc:
            self._broken = str(exc)
            return
        for media, content in parts:
            self.store_part(media, content)

    def finish(self) -> StowOutcome:
        """The outcome; the request's studies told it ended. StowRequestError when the body held no part at all,
        or could not be split before any part was stored (nothing is kept then)."""
        if not self._broken:
            try:
                for media, content in self._reader.close():
                    self.store_part(media, content)
            except StowRequestError as exc:
                self._broken = str(exc)
        outcome = self.outcome
        if self._broken and not outcome.stored and not outcome.failed:
            raise StowRequestError(self._broken)
        if self._broken:  # what came after the break was not understood: one failure stands for it
            outcome.failed.append(("", "", STATUS_CANNOT_UNDERSTAND))
        if not outcome.stored and not outcome.failed:
            raise StowRequestError("the request holds no DICOM part")
        if self._studies:
            self._store.on_end(self._studies, "instances refused" if outcome.failed else "")
        return outcome

    def abandon(self, problem: str) -> None:
        """The body will not be finished (the client went away, or it is over the size limit): what was stored
        stays, and its studies are told, like an aborted association, so they wait for the rest."""
        if self._studies:
            self._store.on_end(self._studies, problem)
            self._studies = set()

    def store_part(self, media: str, part: bytes) -> None:
        store, outcome = self._store, self.outcome
        sop_class = sop_instance = ""
        try:
            if media != DICOM_MEDIA_TYPE:
                raise InvalidInstanceError(f"a part is {media}; only {DICOM_MEDIA_TYPE} parts are stored")
            meta, body = _split_part10(part)
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
            sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
            if self.study_uid is not None:
                _check_study(part, self.study_uid)
            record = store.spool.store(meta, body, calling_ae=self.source_ae)
        except Exception as exc:
            reason = dimse_status_for(exc) if not isinstance(exc, _OtherStudy) else STATUS_DATASET_MISMATCH
            logger.warning("STOW-RS instance from %s refused (0x%04X): %s", self.source_ae, reason,
                           exc if isinstance(exc, GatewayError) else type(exc).__name__)  # fmt: skip
            outcome.failed.append((sop_class, sop_instance, reason))
            store.on_refused(reason)
            return
        self._studies.add(record.study_instance_uid)
        outcome.stored.append((record.sop_class_uid, record.sop_instance_uid))
        try:
            store.on_stored(record)
        except Exception:  # durable already: recovery will pick it up
            logger.exception("instance stored but not registered for assembly; it is recovered on restart")


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
