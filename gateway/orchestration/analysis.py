"""The analysis steps of the series pipeline: prepare the model input, run the model, read its answer.

The gateway's workers run these steps one by one (each is timed, the blocking ones in an executor); the
detection-quality evaluation (``benchmarks/evaluate.py``) and the real-anatomy tests call :func:`analyse`,
which runs the same steps in order, so what they measure is what the gateway serves: the same input
preparation, the model repository's ensembles through Triton, the pipeline's ``report_threshold`` and the
plausibility rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from clients.triton import DetectionOutput, ScoresOutput
from gateway.config.settings import PipelineSettings
from gateway.core.domain import Priority
from gateway.orchestration.interpret import Interpretation, interpret, interpret_scores
from gateway.orchestration.plausibility import check_findings
from preprocessing.backend import NUMPY, ArrayBackend
from preprocessing.dali_pipeline import DaliPreprocessor
from preprocessing.normalize import to_model_layout
from preprocessing.series import LoadedSeries, model_input


class Inferrer(Protocol):
    """What runs a model: the Triton client itself, or the cross-study batcher in front of it."""

    async def classify(
        self, model: str, tensor: np.ndarray, *, input_name: str, output_name: str, priority: Priority
    ) -> ScoresOutput: ...

    async def detect(
        self,
        model: str,
        stack: np.ndarray,
        *,
        priority: Priority,
        want_mask: bool,
        input_name: str,
        whole_volume: bool,
        extra_inputs: dict[str, np.ndarray] | None,
    ) -> DetectionOutput: ...


@dataclass(frozen=True)
class ModelInput:
    tensor: np.ndarray  # laid out as the pipeline's input spec declares
    extra_inputs: dict[str, np.ndarray]  # e.g. the model-grid spacing, for pipelines that declare one
    voxel_mm3: float  # model-grid voxel volume (3D detections carry voxel counts)


@dataclass(frozen=True, kw_only=True)
class Reading:
    """The model's answer read as findings on the source images, implausible ones already removed."""

    interpretation: Interpretation
    implausible: tuple[tuple[str, str], ...]  # (reason kind, description) of each finding dropped
    mask: np.ndarray | None  # [N, H, W] segmentation mask on the model grid, when the pipeline makes one


def model_tensor(
    loaded: LoadedSeries,
    pipeline: PipelineSettings,
    *,
    backend: ArrayBackend = NUMPY,
    dali: DaliPreprocessor | None = None,
) -> np.ndarray:
    """The input tensor of ``pipeline`` for a decoded series, as the plug-in contract declares it."""
    return to_model_layout(
        model_input(
            loaded,
            size=pipeline.input.size,
            intensity=pipeline.input.intensity,
            hu_clip=pipeline.input.hu_clip,
            window=pipeline.input.window,
            backend=backend,
            dali=dali,
        ),
        layout=pipeline.input.layout,
        channels=pipeline.input.channels,
        dtype=pipeline.input.dtype,
        scale=pipeline.input.scale,
        offset=pipeline.input.offset,
    )


def prepare_input(
    loaded: LoadedSeries,
    pipeline: PipelineSettings,
    *,
    backend: ArrayBackend = NUMPY,
    dali: DaliPreprocessor | None = None,
) -> ModelInput:
    tensor = model_tensor(loaded, pipeline, backend=backend, dali=dali)
    spacing = loaded.grid_spacing_mm(pipeline.input.size)
    extra = {pipeline.input.spacing: np.asarray(spacing, np.float32)} if pipeline.input.spacing else {}
    return ModelInput(tensor=tensor, extra_inputs=extra, voxel_mm3=float(np.prod(spacing)))


async def run_model(
    inferrer: Inferrer,
    pipeline: PipelineSettings,
    prepared: ModelInput,
    *,
    priority: Priority = Priority.ROUTINE,
) -> DetectionOutput | ScoresOutput:
    if pipeline.output.kind == "class_scores":
        return await inferrer.classify(
            pipeline.model,
            prepared.tensor,
            input_name=pipeline.input.name,
            output_name=pipeline.output.name,
            priority=priority,
        )
    return await inferrer.detect(
        pipeline.model,
        prepared.tensor,
        priority=priority,
        want_mask=pipeline.output.segmentation,
        input_name=pipeline.input.name,
        whole_volume=pipeline.input.scope == "volume",
        extra_inputs=prepared.extra_inputs,
    )


def read_output(
    output: DetectionOutput | ScoresOutput,
    loaded: LoadedSeries,
    pipeline: PipelineSettings,
    prepared: ModelInput,
    *,
    modality: str,
) -> Reading:
    """Findings at or above the pipeline's report threshold, with the implausible ones dropped (the STAT flag
    is decided on what is kept)."""
    if isinstance(output, ScoresOutput):
        found, mask = interpret_scores(output.scores, loaded.images, pipeline), None
    else:
        found, mask = interpret(output, loaded.images, pipeline, voxel_mm3=prepared.voxel_mm3), output.mask
    plausible = check_findings(found.findings, loaded.images, pipeline, modality=modality.upper())
    if plausible.dropped:
        found = dataclasses.replace(
            found,
            findings=plausible.findings,
            dropped=(*found.dropped, *(text for _, text in plausible.dropped)),
            stat=any(f.confidence >= pipeline.output.stat_threshold for f in plausible.findings),
        )
    return Reading(interpretation=found, implausible=plausible.dropped, mask=mask)


async def analyse(
    inferrer: Inferrer,
    loaded: LoadedSeries,
    pipeline: PipelineSettings,
    *,
    modality: str,
    priority: Priority = Priority.ROUTINE,
) -> Reading:
    """The three steps in order, as one call (evaluation, tests and tools)."""
    prepared = prepare_input(loaded, pipeline)
    output = await run_model(inferrer, pipeline, prepared, priority=priority)
    return read_output(output, loaded, pipeline, prepared, modality=modality)
