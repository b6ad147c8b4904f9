"""One exception tree for the whole gateway.

Split by what the caller does next::

    GatewayError
     ├── ConfigError                 permanent, at start-up: fix the configuration
     ├── RetryableError              try again later (backoff), nothing is lost
     │    ├── SpoolFullError         disk watermark reached: refuse new data (DIMSE 0xA700)
     │    ├── InferenceUnavailable   Triton down, not ready or timed out
     │    ├── ResourceExhausted      disk full, out of file descriptors or memory: retried when it returns
     │    └── DeliveryError          destination PACS / webhook unreachable
     └── PermanentError              retrying cannot help: record the reason and move on
          ├── InvalidInstanceError   an instance we refuse to store (bad UIDs, no SOP class) (DIMSE 0xC000)
          │    └── DatasetMismatchError   dataset SOP Class differs from the request (DIMSE 0xA900)
          ├── DecodeError            pixel data missing, truncated or in an undecodable syntax
          ├── InferenceError         the model answered with an error or a malformed result
          └── VerdictRefused         a verdict not tied to a current AI result, or malformed (HTTP 4xx)
               ├── UnknownResultError     no such result or finding (HTTP 404, DIMSE 0xC000)
               └── ResultNotReviewable    superseded, or silent (never shown) (HTTP 409, DIMSE 0xC000)

``dimse_status_for`` is the single place where exceptions become DIMSE statuses.
"""

from __future__ import annotations

import errno
import os

from pynetdicom.status import STATUS_SUCCESS as STATUS_SUCCESS_CATEGORY
from pynetdicom.status import STATUS_WARNING as STATUS_WARNING_CATEGORY
from pynetdicom.status import Status, code_to_category


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is missing a value or holds a bad one."""


class DatabaseError(GatewayError):
    """The system of record cannot be reached or migrated (at start-up, or by a command)."""


class RetryableError(GatewayError):
    """A transient failure: the operation may succeed when retried later."""


class PermanentError(GatewayError):
    """A failure that retrying cannot fix."""


class SpoolFullError(RetryableError):
    """The spool is above its disk watermark; new instances are refused, never dropped."""


class InferenceUnavailable(RetryableError):
    """Triton is not reachable, not ready, or did not answer in time."""


class ResourceExhausted(RetryableError):
    """A resource the gateway needs ran out (ENOSPC, EDQUOT, EMFILE, ENFILE, ENOMEM, MemoryError)."""


RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def as_resource_error(exc: BaseException) -> ResourceExhausted | None:
    """``exc`` as a ``ResourceExhausted`` when it is one (an OSError of a resource errno, a MemoryError)."""
    if isinstance(exc, ResourceExhausted):
        return exc
    if isinstance(exc, MemoryError):
        return ResourceExhausted("out of memory")
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return ResourceExhausted(f"{os.strerror(exc.errno)} (errno {errno.errorcode[exc.errno]})")
    return None


class DeliveryError(RetryableError):
    """A result could not be delivered to its destination."""


class WorklistError(RetryableError):
    """The Modality Worklist SCP cannot be asked now (refused, unreachable, or its answer failed)."""


class InvalidInstanceError(PermanentError):
    """An instance the gateway refuses to store."""


class DatasetMismatchError(InvalidInstanceError):
    """The dataset's SOP Class differs from the one the C-STORE request announced (DIMSE 0xA900)."""


class DecodeError(PermanentError):
    """Pixel data could not be decoded into an image."""


class InferenceError(PermanentError):
    """The inference server answered, but with an error or an unusable result."""


class VerdictRefused(PermanentError):
    """A radiologist's verdict that is malformed (a reason not on the list, a correction without a box ...);
    nothing is stored."""

    http_status = 422


class UnknownResultError(VerdictRefused):
    """The verdict names a result or finding the gateway never reported."""

    http_status = 404


class ResultNotReviewable(VerdictRefused):
    """The verdict names a result that was superseded by a newer analysis, or a silent one nobody was shown."""

    http_status = 409


# DIMSE C-STORE statuses (PS3.4 Annex B.2.3 / PS3.7 Annex C), named in pynetdicom's Status table.
for _name, _code in (
    ("OUT_OF_RESOURCES", 0xA700),
    ("DATASET_DOES_NOT_MATCH_SOP_CLASS", 0xA900),
    ("CANNOT_UNDERSTAND", 0xC000),
    ("PROCESSING_FAILURE", 0x0110),
):
    if not hasattr(Status, _name):
        Status.add(_name, _code)
STATUS_SUCCESS = int(Status.SUCCESS)
STATUS_OUT_OF_RESOURCES = int(Status.OUT_OF_RESOURCES)  # type: ignore[attr-defined]
STATUS_DATASET_MISMATCH = int(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)  # type: ignore[attr-defined]
STATUS_CANNOT_UNDERSTAND = int(Status.CANNOT_UNDERSTAND)  # type: ignore[attr-defined]
STATUS_PROCESSING_FAILURE = int(Status.PROCESSING_FAILURE)  # type: ignore[attr-defined]


def dimse_accepted(code: int) -> bool:
    """Success or a warning (e.g. coercion of data elements): the peer stored the instance."""
    return code_to_category(code) in (STATUS_SUCCESS_CATEGORY, STATUS_WARNING_CATEGORY)


def dimse_status_for(exc: BaseException) -> int:
    """Map an exception raised while storing an instance to the C-STORE status the SCU receives."""
    if isinstance(exc, SpoolFullError) or as_resource_error(exc) is not None:
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, DatasetMismatchError):
        return STATUS_DATASET_MISMATCH
    if isinstance(exc, InvalidInstanceError):
        return STATUS_CANNOT_UNDERSTAND
    return STATUS_PROCESSING_FAILURE
