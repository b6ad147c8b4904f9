"""Interpret a detection ensemble's answer: normalised boxes -> findings on the source images.

A detection the gateway cannot stand behind (non-finite values, a box outside the image, an unknown class)
is dropped with a logged reason; the rest of the report is still written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clients.triton import DetectionOutput
from gateway.config.settings import PipelineSettings
from gateway.core.domain import CodedConcept, Finding
from preprocessing.decode import DecodedImage

logger = logging.getLogger(__name__)

EDGE_TOLERANCE = 1e-3  # normalised coordinates may overshoot [0, 1] by rounding only


@dataclass(frozen=True, kw_only=True)
class Interpretation:
    findings: tuple[Finding, ...]
    dropped: tuple[str, ...]
    study_score: float
    stat: bool


def _finding_on(
    image: DecodedImage,
    slice_index: int,
    label: CodedConcept,
    confidence: float,
    bbox: tuple[float, float, float, float] | None,
    pipeline: PipelineSettings,
) -> Finding:
    """A finding on one source image: located (with its measurements) when ``bbox`` is given, else image-level."""
    measurements = (
        region_measurements(image, bbox, hounsfield=pipeline.input.intensity == "hu") if bbox else {}
    )
    return Finding(
        label=label,
        confidence=confidence,
        sop_instance_uid=image.sop_instance_uid,
        sop_class_uid=image.sop_class_uid,
        bbox=bbox,
        slice_index=slice_index,
        **measurements,
    )


def interpret_scores(
    scores: np.ndarray, images: Sequence[DecodedImage], pipeline: PipelineSettings
) -> Interpretation:
    """Per-image class probabilities [N, classes] -> one image-level finding per labelled class that reaches the
    report threshold, on the image where it scored highest. Columns without a label are ignored."""
    scores = np.asarray(scores, dtype=np.float64)
    dropped: list[str] = []
    findings: list[Finding] = []
    best = 0.0
    for class_id, label in sorted(pipeline.output.labels.items()):
        if class_id >= scores.shape[1]:
            dropped.append(f"class {class_id} is not among the model's {scores.shape[1]} outputs")
            continue
        column = scores[:, class_id]
        finite = np.isfinite(column) & (column >= 0.0) & (column <= 1.0)
        if not finite.all():
            dropped.append(
                f"class {class_id}: {int((~finite).sum())} non-finite or out-of-range score(s) ignored"
            )
        if not finite.any():
            continue
        index = int(np.argmax(np.where(finite, column, -1.0)))
        confidence = float(column[index])
        best = max(best, confidence)
        if confidence >= pipeline.output.report_threshold:
            findings.append(_finding_on(images[index], index, label, confidence, None, pipeline))
    for reason in dropped:
        logger.warning("pipeline %s: %s", pipeline.name, reason)
    stat = any(f.confidence >= pipeline.output.stat_threshold for f in findings)
    return Interpretation(findings=tuple(findings), dropped=tuple(dropped), study_score=best, stat=stat)


def region_measurements(
    image: DecodedImage, bbox: tuple[float, float, float, float], *, hounsfield: bool
) -> dict[str, float | None]:
    """Long axis and area of the region in mm (when the pixel spacing is known) and, for CT, its mean HU."""
    x0, y0, x1, y1 = bbox
    out: dict[str, float | None] = {"long_axis_mm": None, "area_mm2": None, "mean_hu": None}
    if image.pixel_spacing is not None:
        row_mm, col_mm = image.pixel_spacing
        width, height = (x1 - x0) * col_mm, (y1 - y0) * row_mm
        out["long_axis_mm"] = round(max(width, height), 2)
        out["area_mm2"] = round(width * height, 2)
    if hounsfield:
        r0, c0 = math.floor(y0), math.floor(x0)
        r1, c1 = max(math.ceil(y1), r0 + 1), max(math.ceil(x1), c0 + 1)
        region = image.pixels[r0:r1, c0:c1]
        if region.size:
            mean = float(region.mean()) * image.rescale_slope + image.rescale_intercept
            out["mean_hu"] = round(mean, 1)
    return out


def interpret(
    output: DetectionOutput,
    images: Sequence[DecodedImage],
    pipeline: PipelineSettings,
    *,
    voxel_mm3: float | None = None,
) -> Interpretation:
    """Detections -> findings. Rows of 3D models ([K, 10]) carry a voxel count: with ``voxel_mm3`` (the
    model-grid voxel volume) the finding gets its volume."""
    findings: list[Finding] = []
    dropped: list[str] = []
    for row in output.detections:
        values = [float(v) for v in row]
        slice_f, class_f, score, x0, y0, x1, y1 = values[:7]
        voxels = values[9] if len(values) >= 10 else None
        if not all(math.isfinite(v) for v in values):
            dropped.append("non-finite value in detection")
            continue
        slice_index, class_id = int(slice_f), int(class_f)
        if not 0 <= slice_index < len(images):
            dropped.append(f"slice index {slice_index} outside the series of {len(images)}")
            continue
        if class_id not in pipeline.output.labels:
            dropped.append(f"unknown class {class_id}")
            continue
        if not 0.0 <= score <= 1.0:
            dropped.append(f"confidence {score} outside [0, 1]")
            continue
        if min(x0, y0) < -EDGE_TOLERANCE or max(x1, y1) > 1.0 + EDGE_TOLERANCE or x1 <= x0 or y1 <= y0:
            dropped.append(f"box {x0:.3f},{y0:.3f},{x1:.3f},{y1:.3f} outside the image")
            continue
        if score < pipeline.output.report_threshold:
            continue
        image = images[slice_index]
        rows, cols = image.shape
        bbox = (
            max(0.0, x0) * cols,
            max(0.0, y0) * rows,
            min(1.0, x1) * cols,
            min(1.0, y1) * rows,
        )
        finding = _finding_on(image, slice_index, pipeline.output.labels[class_id], score, bbox, pipeline)
        if voxels is not None and voxel_mm3 is not None and voxels > 0:
            finding = dataclasses.replace(finding, volume_mm3=round(voxels * voxel_mm3, 1))
        findings.append(finding)
    for reason in dropped:
        logger.warning("pipeline %s: detection dropped: %s", pipeline.name, reason)
    study_score = output.study_score if math.isfinite(output.study_score) else 0.0
    stat = any(f.confidence >= pipeline.output.stat_threshold for f in findings)
    findings.sort(key=lambda f: (f.slice_index, -f.confidence))
    return Interpretation(
        findings=tuple(findings), dropped=tuple(dropped), study_score=study_score, stat=stat
    )
