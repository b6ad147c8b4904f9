"""Tensor math of the reference chest CT lung-nodule ensemble, shared by its Triton models and the tests.

    preprocess   HU [N, H, W] -> [N, 2, H, W]: soft-tissue membership, air membership
    detectors    two fixed-weight ONNX networks (scripts/build_models.py) at two scales: "tissue blob surrounded
                 by aerated lung" (small: 3x3 core in a 9x9 context; large: 7x7 core in a 25x25 context)
    postprocess  per-slice boxes of each detector -> weighted box fusion -> boxes of neighbouring slices linked
                 into 3D objects -> tube-like objects (vessels run through many slices) dropped -> one detection
                 per nodule on its largest cross-section, with its slice extent and voxel count

Reference model for exercising the pipeline; NOT clinically validated.
"""

from __future__ import annotations

import numpy as np

from ensemble_steps.detection import slice_boxes
from ensemble_steps.fusion import Box, link_slices, weighted_box_fusion

TISSUE_HU = -450.0  # lung parenchyma is about -850 HU, solid nodules and vessels about 0-60 HU
TISSUE_RAMP_HU = 150.0
VOLUME_DETECTION_COLUMNS = ("slice_index", "class_id", "score", "x0", "y0", "x1", "y1", "z0", "z1", "voxels")


def lung_channels(hu: np.ndarray) -> np.ndarray:
    """[N, H, W] HU -> [N, 2, H, W] float32: soft membership of (soft) tissue and of air."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected [N, H, W] HU slices, got shape {hu.shape}")
    tissue = np.clip((hu - TISSUE_HU) / TISSUE_RAMP_HU + 0.5, 0.0, 1.0)
    return np.stack([tissue, 1.0 - tissue], axis=1).astype(np.float32)


def nodules(
    heat_small: np.ndarray,
    heat_large: np.ndarray,
    channels: np.ndarray,
    spacing_mm: np.ndarray,
    *,
    threshold: float = 0.3,
    max_elongation: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused, 3D-linked nodule detections [K, 10] (``VOLUME_DETECTION_COLUMNS``), slice scores [N], study [1].

    ``spacing_mm`` is (slice spacing, row spacing, column spacing) of the model grid. An object is dropped as
    tube-like when its extent along z exceeds ``max_elongation`` times its in-plane diameter plus one slice.
    """
    n, _, h, w = np.asarray(channels).shape
    slice_mm, row_mm, col_mm = (float(v) for v in np.asarray(spacing_mm, dtype=np.float64).reshape(3))
    small, large = slice_boxes(heat_small, threshold), slice_boxes(heat_large, threshold)
    fused = [weighted_box_fusion([small[k], large[k]]) for k in range(n)]
    tissue = np.asarray(channels)[:, 0] >= 0.5
    slice_scores = np.array([max((b.score for b in boxes), default=0.0) for boxes in fused], dtype=np.float32)
    rows: list[list[float]] = []
    for obj in link_slices(fused):
        cross_sections = [
            _tissue_box(tissue[k], box, h, w) for k, box in zip(obj.slices, obj.boxes, strict=True)
        ]
        voxels = sum(count for _, count in cross_sections)
        key = int(np.argmax([count for _, count in cross_sections]))
        (x0, y0, x1, y1), _ = cross_sections[key]
        diameter_mm = max((x1 - x0) * w * col_mm, (y1 - y0) * h * row_mm)
        extent_mm = len(obj.slices) * slice_mm
        if voxels == 0 or extent_mm > max_elongation * diameter_mm + slice_mm:
            continue
        if _continues(tissue, obj.slices[key], (x0, y0, x1, y1), diameter_mm, slice_mm):
            continue
        rows.append(
            [float(obj.slices[key]), 0.0, obj.score, x0, y0, x1, y1, obj.slices[0], obj.slices[-1], voxels]
        )
    rows.sort(key=lambda r: -r[2])
    detections = np.asarray(rows, dtype=np.float32).reshape(-1, len(VOLUME_DETECTION_COLUMNS))
    study = np.asarray([detections[:, 2].max() if len(detections) else 0.0], dtype=np.float32)
    return detections, slice_scores, study


def _continues(
    tissue: np.ndarray,
    centre: int,
    box: tuple[float, float, float, float],
    diameter_mm: float,
    slice_mm: float,
) -> bool:
    """True when tissue still fills the middle of the object's box beyond where a sphere of its diameter would
    end (on either side): a vessel the detectors lost on some slices, not a nodule."""
    n, h, w = tissue.shape
    reach = int(np.ceil((diameter_mm / 2.0 + 1.5 * slice_mm) / max(slice_mm, 1e-3)))
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    hx, hy = max((x1 - x0) / 4.0, 1.0 / w), max((y1 - y0) / 4.0, 1.0 / h)
    r0, r1 = int((cy - hy) * h), int(np.ceil((cy + hy) * h))
    c0, c1 = int((cx - hx) * w), int(np.ceil((cx + hx) * w))
    probes = [k for k in (centre - reach, centre + reach) if 0 <= k < n]
    return any(tissue[k, r0:r1, c0:c1].mean() >= 0.3 for k in probes)


def _tissue_box(
    tissue: np.ndarray, box: Box, h: int, w: int
) -> tuple[tuple[float, float, float, float], int]:
    """The tight box and pixel count of the tissue inside a (slightly grown) detection box on one slice."""
    r0, r1 = max(0, int(box.y0 * h) - 2), min(h, int(np.ceil(box.y1 * h)) + 2)
    c0, c1 = max(0, int(box.x0 * w) - 2), min(w, int(np.ceil(box.x1 * w)) + 2)
    region = tissue[r0:r1, c0:c1]
    if not region.any():
        return (box.x0, box.y0, box.x1, box.y1), 0
    ys, xs = np.nonzero(region)
    tight = ((c0 + xs.min()) / w, (r0 + ys.min()) / h, (c0 + xs.max() + 1) / w, (r0 + ys.max() + 1) / h)
    return tight, int(region.sum())
