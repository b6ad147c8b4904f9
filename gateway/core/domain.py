"""Typed domain objects passed from one stage of the flow to the next.

receive -> spool (``InstanceRecord``) -> assemble (``Study``) -> route (``InferenceJob``) -> schedule ->
preprocess -> infer (``Finding``) -> encode (``SeriesResult``) -> deliver -> audit.

All objects are frozen, keyword-only dataclasses that validate their arguments on construction.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from pathlib import Path

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def _require_uid(name: str, value: str) -> None:
    if not isinstance(value, str) or not is_valid_uid(value):
        raise ValueError(f"{name} must be a valid DICOM UID, got {value!r}")


class Priority(enum.IntEnum):
    """Reading priority; lower value is served first."""

    STAT = 0
    URGENT = 1
    ROUTINE = 2

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """Accept the enum, its name (any case) or DICOM Requested Procedure Priority terms."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        text = value.strip().upper()
        aliases = {"HIGH": cls.URGENT, "MEDIUM": cls.ROUTINE, "LOW": cls.ROUTINE, "ASAP": cls.URGENT}
        if text in aliases:
            return aliases[text]
        try:
            return cls[text]
        except KeyError:
            raise ValueError(f"priority must be one of STAT, URGENT, ROUTINE; got {value!r}") from None


class RolloutMode(str, enum.Enum):
    """How far a pipeline's results reach: silent (recorded only), assist (sent), triage (sent + STAT)."""

    SILENT = "silent"
    ASSIST = "assist"
    TRIAGE = "triage"


@dataclass(frozen=True, kw_only=True)
class CodedConcept:
    """A code triple (value, scheme designator, meaning) as used in DICOM SR and FHIR."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            if not getattr(self, name):
                raise ValueError(f"CodedConcept.{name} must not be empty")


@dataclass(frozen=True, kw_only=True)
class InstanceRecord:
    """One acknowledged instance, durably on disk in the spool. Holds no patient identifiers."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str
    received_at: float
    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    requested_priority: str = ""
    accession_number: str = ""  # links the study to its order (never logged)
    has_pixel_data: bool = True

    def __post_init__(self) -> None:
        _require_uid("sop_instance_uid", self.sop_instance_uid)
        _require_uid("sop_class_uid", self.sop_class_uid)
        _require_uid("study_instance_uid", self.study_instance_uid)
        _require_uid("series_instance_uid", self.series_instance_uid)


@dataclass(frozen=True, kw_only=True)
class Series:
    """The instances of one series, as they stand when the study was declared complete."""

    series_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    instances: tuple[InstanceRecord, ...]

    def __post_init__(self) -> None:
        _require_uid("series_instance_uid", self.series_instance_uid)
        if not self.instances:
            raise ValueError("Series.instances must not be empty")


@dataclass(frozen=True, kw_only=True)
class Study:
    """A study declared complete after its quiet period."""

    study_instance_uid: str
    calling_ae: str
    study_description: str
    series: tuple[Series, ...]
    first_received_at: float
    last_received_at: float
    requested_priority: str = ""
    incomplete_reason: str = ""  # set when the study's last association was aborted or had refusals
    accession_number: str = ""
    order_priority: str = ""  # from the study's active order (HL7 feed or worklist), when there is one
    order_reason: str = ""  # the order's reason for exam (clinical text: never logged)
    order_procedure_code: str = ""  # the order's requested procedure code

    def __post_init__(self) -> None:
        _require_uid("study_instance_uid", self.study_instance_uid)
        if not self.series:
            raise ValueError("Study.series must not be empty")

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One detection on one source image, in that image's pixel coordinates (column x, row y)."""

    label: CodedConcept
    confidence: float
    sop_instance_uid: str
    sop_class_uid: str
    bbox: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in source pixels; None: whole image
    slice_index: int
    long_axis_mm: float | None = None  # longest side of the region, when the pixel spacing is known
    area_mm2: float | None = None
    mean_hu: float | None = None  # CT only: mean Hounsfield units inside the region
    volume_mm3: float | None = None  # 3D (per-volume) models: the object's volume over all its slices

    def __post_init__(self) -> None:
        if not (isinstance(self.confidence, float | int) and math.isfinite(self.confidence)):
            raise ValueError(f"Finding.confidence must be a finite number, got {self.confidence!r}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Finding.confidence must be in [0, 1], got {self.confidence}")
        _require_uid("sop_instance_uid", self.sop_instance_uid)
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            if not all(math.isfinite(v) for v in self.bbox) or x1 < x0 or y1 < y0:
                raise ValueError(f"Finding.bbox must be finite with x0<=x1 and y0<=y1, got {self.bbox}")


def timing_log_fields(seconds_by_stage: dict[str, float]) -> dict[str, float]:
    """Stage timings as log / audit fields: ``{"infer": 0.25}`` -> ``{"infer_ms": 250.0}``."""
    return {f"{k}_ms": round(v * 1000.0, 1) for k, v in seconds_by_stage.items()}
