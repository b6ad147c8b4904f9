"""Tensor math of the reference head CT hyperdensity ensemble, shared by its Triton models and the tests.

* ``hyperdensity_channels`` is the ensemble's ``preprocess`` step: HU slices -> model input channels.
* ``heatmap_to_detections`` is its ``postprocess`` step: detector heat maps -> boxes, scores, study score.

The detector itself (``scripts/build_models.py``) is a fixed-weight convolutional network: local density of
voxels in the acute-blood HU band, suppressed next to bone. It is a reference model that exercises the whole
pipeline; it is not clinically validated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ensemble_steps.fusion import Box

# Acute extravascular blood is roughly 50-90 HU; brain parenchyma 20-45 HU; bone > 300 HU.
BLOOD_LOW_HU = 50.0
BLOOD_HIGH_HU = 95.0
BLOOD_RAMP_HU = 6.0
BONE_LOW_HU = 150.0
BONE_RAMP_HU = 100.0

DETECTION_COLUMNS = ("slice_index", "class_id", "score", "x0", "y0", "x1", "y1")


def hyperdensity_channels(hu: np.ndarray) -> np.ndarray:
    """[N, H, W] HU -> [N, 2, H, W] float32: soft membership of the blood band and of bone."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected [N, H, W] HU slices, got shape {hu.shape}")
    rise = np.clip((hu - BLOOD_LOW_HU) / BLOOD_RAMP_HU + 0.5, 0.0, 1.0)
    fall = np.clip((BLOOD_HIGH_HU - hu) / BLOOD_RAMP_HU + 0.5, 0.0, 1.0)
    blood = rise * fall
    bone = np.clip((hu - BONE_LOW_HU) / BONE_RAMP_HU, 0.0, 1.0)
    return np.stack([blood, bone], axis=1).astype(np.float32)


def heatmap_to_detections(
    heatmap: np.ndarray, *, threshold: float = 0.5, max_per_slice: int = 8, min_area: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, 1, H, W] heat maps -> (detections [K, 7], slice scores [N], study score [1]).

    Each detection row is ``DETECTION_COLUMNS``; box coordinates are normalised to [0, 1] of the model input
    so the caller maps them to any source geometry. A connected region above ``threshold`` is one detection;
    its score is the region's peak.
    """
    maps = np.asarray(heatmap, dtype=np.float32)
    if maps.ndim == 4:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"expected [N, 1, H, W] heat maps, got shape {heatmap.shape}")
    n, h, w = maps.shape
    rows: list[list[float]] = []
    slice_scores = np.zeros((n,), dtype=np.float32)
    for i in range(n):
        m = np.nan_to_num(maps[i], nan=0.0)
        slice_scores[i] = float(m.max()) if m.size else 0.0
        labels, count = ndimage.label(m >= threshold)
        if count == 0:
            continue
        found = []
        for region, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            mask = labels[sl] == region
            if int(mask.sum()) < min_area:
                continue
            peak = float(m[sl][mask].max())
            ys, xs = sl
            found.append([float(i), 0.0, peak, xs.start / w, ys.start / h, xs.stop / w, ys.stop / h])
        found.sort(key=lambda r: -r[2])
        rows.extend(found[:max_per_slice])
    detections = np.asarray(rows, dtype=np.float32).reshape(-1, len(DETECTION_COLUMNS))
    study = np.asarray([slice_scores.max() if n else 0.0], dtype=np.float32)
    return detections, slice_scores, study


def heatmap_to_mask(heatmap: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[N, 1, H, W] heat maps -> [N, H, W] uint8 binary mask (1 where the heat reaches ``threshold``)."""
    maps = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if maps.ndim == 4:
        maps = maps[:, 0]
    return (maps >= threshold).astype(np.uint8)


def slice_boxes(heatmap: np.ndarray, threshold: float) -> list[list[Box]]:
    """[N, 1, H, W] heat -> the boxes of each slice (normalised coordinates), for fusion across detectors."""
    detections, _, _ = heatmap_to_detections(heatmap, threshold=threshold, max_per_slice=32, min_area=1)
    per_slice: list[list[Box]] = [[] for _ in range(np.asarray(heatmap).shape[0])]
    for k, _, score, x0, y0, x1, y1 in detections.tolist():
        per_slice[int(k)].append(Box(x0, y0, x1, y1, score))
    return per_slice
