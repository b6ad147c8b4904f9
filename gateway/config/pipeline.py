"""One AI pipeline's settings, in four parts: which series it takes (:class:`RoutingRule`), what the model
wants as input (:class:`InputSpec`), what its answers mean (:class:`OutputSpec`) and what identifies the
algorithm in every result (:class:`Provenance`).

A ``[[pipelines]]`` table stays flat in TOML (``input_size``, ``report_threshold``, ...); each key belongs to one
part, named by the part fields' aliases, and error messages name the flat key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, model_validator

from gateway.config.base import (
    LAX,
    Choice,
    Pair,
    Part,
    Probability,
    Section,
)
from gateway.core.domain import CodedConcept, RolloutMode
from gateway.core.terminology import finding_type


class Intensity(Choice):
    HU = "hu"  # Hounsfield units, clipped to hu_clip
    WINDOW = "window"  # a window [center, width] to [0, 1]
    PERCENTILE = "percentile"  # each image's 1st-99th percentile to [0, 1] (radiographs)


class Anatomy(Choice):
    NONE = ""  # header rules only
    LUNG = "lung"


class FindingAnatomy(Choice):
    ANY = ""
    BODY = "body"
    LUNG = "lung"
    INTRACRANIAL = "intracranial"


class OutputKind(Choice):
    DETECTIONS = "detections"  # DETECTIONS / SLICE_SCORES / STUDY_SCORE
    CLASS_SCORES = "class_scores"  # one [N, classes] probability output


class InputLayout(Choice):
    NHW = "NHW"
    NCHW = "NCHW"
    NHWC = "NHWC"


class InputDtype(Choice):
    FP32 = "FP32"
    UINT8 = "UINT8"  # [0, 1] scaled to [0, 255]


class InputScope(Choice):
    SLICE = "slice"  # a series may be split into requests and share them with other studies
    VOLUME = "volume"  # the whole series is one request (3D models)


def _patterns(value: Any) -> Any:
    if not isinstance(value, tuple) or not all(isinstance(v, str | re.Pattern) for v in value):
        return value  # the type check names the problem
    compiled = []
    for text in value:
        try:
            compiled.append(text if isinstance(text, re.Pattern) else re.compile(text))
        except re.error as exc:
            raise ValueError(f"bad pattern {text!r}: {exc}") from exc
    return tuple(compiled)


def _labels(value: Any) -> Any:
    """``{"0": "hemorrhage"}`` (terminology keys) or ``{"0": {value, scheme, meaning}}`` -> class index -> code."""
    if not isinstance(value, dict):
        return value
    labels: dict[int, CodedConcept] = {}
    for key, code in value.items():
        if isinstance(code, CodedConcept):
            labels[int(key)] = code
            continue
        if not str(key).isdigit():
            raise ValueError(f"labels.{key} must be a class index (0, 1, ...)")
        if isinstance(code, str):
            try:
                labels[int(key)] = finding_type(code)
            except Exception as exc:
                raise ValueError(f"labels.{key}: {exc}") from exc
            continue
        if not isinstance(code, dict) or set(code) != {"value", "scheme", "meaning"}:
            raise ValueError(f"labels.{key} must be a terminology key or a table of value, scheme, meaning")
        if not all(isinstance(v, str) for v in code.values()):
            raise ValueError(f"labels.{key}: value, scheme and meaning must be strings")
        try:
            labels[int(key)] = CodedConcept(
                value=code["value"], scheme=code["scheme"], meaning=code["meaning"]
            )
        except ValueError as exc:
            raise ValueError(f"labels.{key}: {exc}") from exc
    return labels


def _non_empty_labels(value: dict[int, CodedConcept]) -> dict[int, CodedConcept]:
    if not value:
        raise ValueError("needs at least one label (pipelines.labels.<class index> = finding type)")
    return value


def _size(value: tuple[int, int]) -> tuple[int, int]:
    if min(value) < 8:
        raise ValueError(f"must be at least 8x8, got {list(value)}")
    return value


def _size_range(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not 0 <= value[0] < value[1]:
        raise ValueError("must be [min, max] with 0 <= min < max")
    return value


def _modalities(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("must list at least one modality")
    return tuple(m.upper() for m in value)


class RoutingRule(Part):
    """Which series the pipeline takes: header rules, then (optionally) the anatomy seen in sampled pixels."""

    modalities: Annotated[tuple[str, ...], AfterValidator(_modalities)]
    body_parts: Annotated[tuple[str, ...], AfterValidator(lambda v: tuple(b.upper() for b in v))] = ()
    description_patterns: Annotated[tuple[re.Pattern[str], ...], BeforeValidator(_patterns)] = ()
    # From the study's order (HL7 feed or worklist): a series of a listed modality is also taken when the order's
    # requested procedure code is one of these, or its reason for exam matches one of these patterns.
    procedure_codes: Annotated[tuple[str, ...], AfterValidator(lambda v: tuple(c.upper() for c in v))] = ()
    reason_patterns: Annotated[tuple[re.Pattern[str], ...], BeforeValidator(_patterns)] = ()
    min_slices: Annotated[int, Field(ge=1)] = 1
    # Content-aware routing: a series of a listed modality that no header rule matched is analysed when this
    # anatomy is in its field of view (preprocessing/anatomy.py); its findings are then incidental.
    anatomy: Annotated[Anatomy, LAX] = Anatomy.NONE
    anatomy_min_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # of the sampled slices that must show it


class InputSpec(Part):
    """How the model wants its input (the plug-in contract, README "Adding a model")."""

    size: Annotated[tuple[int, int], AfterValidator(_size)] = Field(alias="input_size")
    intensity: Annotated[Intensity, LAX] = Intensity.HU
    hu_clip: Pair = (-1024.0, 3071.0)
    window: Pair | None = None  # [center, width], for intensity = "window"
    name: str = Field("HU", alias="input_name")
    layout: Annotated[
        Annotated[InputLayout, LAX], BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)
    ] = Field(InputLayout.NHW, alias="input_layout")
    channels: int = Field(1, alias="input_channels")  # 3: the grey image is repeated into RGB
    dtype: Annotated[
        Annotated[InputDtype, LAX], BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)
    ] = Field(InputDtype.FP32, alias="input_dtype")
    scale: float = Field(1.0, alias="input_scale")  # after intensity normalisation: value * scale + offset
    offset: float = Field(0.0, alias="input_offset")
    scope: Annotated[InputScope, LAX] = Field(InputScope.SLICE, alias="input_scope")
    # Name of an extra FP32 [3] input that receives the model-grid spacing in mm (slice, row, column); "": none.
    spacing: str = Field("", alias="spacing_input")
    # Per-slice models only: a request may carry slices of several studies; the study score is then the maximum
    # of the study's SLICE_SCORES. False for a model whose STUDY_SCORE is not that.
    cross_study_batching: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.intensity == Intensity.WINDOW and self.window is None:
            raise ValueError("intensity = 'window' needs window = [center, width]")
        if self.channels not in (1, 3) or (self.layout == InputLayout.NHW and self.channels != 1):
            raise ValueError("input_channels must be 1 or 3 (and 1 for input_layout NHW)")
        return self


class OutputSpec(Part):
    """What the model's answers mean: the finding types, the thresholds, plausibility and presentation."""

    kind: Annotated[OutputKind, LAX] = Field(OutputKind.DETECTIONS, alias="output_kind")
    name: str = Field("SCORES", alias="output_name")  # class_scores: the [N, classes] probability output
    labels: Annotated[
        dict[int, CodedConcept], BeforeValidator(_labels), AfterValidator(_non_empty_labels)
    ] = Field(default_factory=dict, validate_default=True)
    report_threshold: Probability = 0.5
    stat_threshold: Probability = 0.9
    display_window: Pair = (40.0, 400.0)  # GSPS window [center, width]
    segmentation: bool = False  # the model also returns a MASK: write a DICOM SEG
    # Plausibility (gateway/orchestration/plausibility.py): where a finding may lie (CT only) and the range of its
    # long axis in mm; findings outside are dropped with a logged reason.
    finding_anatomy: Annotated[FindingAnatomy, LAX] = FindingAnatomy.ANY
    finding_size_mm: Annotated[Pair | None, AfterValidator(_size_range)] = None

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        if self.kind == OutputKind.CLASS_SCORES and self.segmentation:
            raise ValueError("segmentation needs output_kind = detections")
        return self


class Provenance(Part):
    """What every result names as its algorithm: the Triton model, the algorithm's name and version."""

    model: str  # the Triton model (default: the pipeline's name)
    algorithm_name: str  # default: the pipeline's name
    algorithm_version: str
    description: str = ""


_PARTS: dict[str, type[Part]] = {
    "route": RoutingRule,
    "input": InputSpec,
    "output": OutputSpec,
    "provenance": Provenance,
}


class PipelineSettings(Section):
    """One AI pipeline: which series it takes, how to prepare them, and what its answers mean."""

    name: str
    mode: Annotated[RolloutMode, LAX] = RolloutMode.ASSIST
    # A pilot: the mode holds only for studies from these sending PACS (calling AE titles; their destinations
    # get the results), the pipeline is silent for every other; and only users of these identity-provider
    # groups see its findings in the API (QA and admin see all). Empty: no restriction.
    pilot_sites: Annotated[tuple[str, ...], AfterValidator(lambda v: tuple(a.strip() for a in v))] = ()
    pilot_groups: tuple[str, ...] = ()
    route: RoutingRule
    input: InputSpec
    output: OutputSpec
    provenance: Provenance

    @model_validator(mode="before")
    @classmethod
    def _from_flat_table(cls, data: Any, info: ValidationInfo) -> Any:
        """Sort the flat TOML keys into the parts; keys of no part stay (and are refused as unknown)."""
        if not isinstance(data, dict) or any(part in data for part in _PARTS):
            return data
        flat = dict(data)
        name = flat.get("name")
        if isinstance(name, str):
            flat.setdefault("model", name)
            flat.setdefault("algorithm_name", name)
        grouped: dict[str, Any] = {}
        for part, model in _PARTS.items():
            keys = {field.alias or field_name for field_name, field in model.model_fields.items()}
            grouped[part] = {key: flat.pop(key) for key in list(flat) if key in keys}
        grouped.update(flat)
        return grouped

    def flat(self) -> dict[str, Any]:
        """The pipeline as its flat ``[[pipelines]]`` table (values as validated)."""
        table: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode,
            "pilot_sites": self.pilot_sites,
            "pilot_groups": self.pilot_groups,
        }
        for part in _PARTS:
            table.update(getattr(self, part).model_dump(by_alias=True))
        table["labels"] = dict(self.output.labels)
        return table

    def replace(self, **changes: Any) -> PipelineSettings:
        """A copy with some flat keys changed (``report_threshold=0.0``), validated like the file."""
        return PipelineSettings.model_validate({**self.flat(), **changes})

    def governed(self) -> dict[str, Any]:
        """What a governance committee approves: the model, the rollout mode and pilot, the thresholds."""
        return {
            "model": self.model,
            "algorithm_version": self.provenance.algorithm_version,
            "mode": self.mode.value,
            "pilot_sites": list(self.pilot_sites),
            "pilot_groups": list(self.pilot_groups),
            "report_threshold": self.output.report_threshold,
            "stat_threshold": self.output.stat_threshold,
        }

    def mode_for(self, calling_ae: str) -> RolloutMode:
        """The rollout mode for a study from ``calling_ae``: silent outside the pilot's sites."""
        if self.pilot_sites and calling_ae.strip() not in self.pilot_sites:
            return RolloutMode.SILENT
        return self.mode

    def shown_to(self, groups: frozenset[str]) -> bool:
        """May a user of ``groups`` see this pipeline's findings?"""
        return not self.pilot_groups or bool(groups & set(self.pilot_groups))

    @property
    def model(self) -> str:
        """The Triton model this pipeline calls."""
        return self.provenance.model

    @property
    def batchable(self) -> bool:
        """May this pipeline's slices share Triton requests with other studies?"""
        return (
            self.input.cross_study_batching
            and self.input.scope == InputScope.SLICE
            and not self.input.spacing
        )


def unique_names(pipelines: tuple[PipelineSettings, ...]) -> tuple[PipelineSettings, ...]:
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline names must be unique, got {names}")
    return pipelines
