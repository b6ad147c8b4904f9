"""Tensor math of the reference chest radiograph (CR / DX) focal-opacity ensemble, shared by its Triton models
and the tests.

    preprocess   normalised image [N, H, W] (1st-99th percentile -> [0, 1], MONOCHROME1 already inverted by
                 the gateway) -> [N, 2, H, W]: the image and a lung-field map (dark, aerated regions inside the
                 body outline, smoothed)
    detectors    two fixed-weight ONNX networks (scripts/build_models.py): local brightness excess over its
                 surroundings inside the lung field, at two scales
    postprocess  boxes of each detector -> weighted box fusion -> detections, per-image and study scores

Reference model for exercising the pipeline; NOT clinically validated.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ensemble_steps.detection import slice_boxes
from ensemble_steps.fusion import Box, weighted_box_fusion

LUNG_LOW, LUNG_HIGH = 0.12, 0.45  # normalised intensity of aerated lung: darker than soft tissue, not air


def radiograph_channels(image: np.ndarray) -> np.ndarray:
    """[N, H, W] normalised radiographs -> [N, 2, H, W] float32: the image and its lung-field map."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected [N, H, W] images, got shape {image.shape}")
    fields = []
    for img in image:
        size = max(3, img.shape[0] // 24)
        smooth = ndimage.uniform_filter(img, size=size)
        field = (smooth >= LUNG_LOW) & (smooth <= LUNG_HIGH)
        field = ndimage.binary_opening(field, iterations=2)
        field = ndimage.binary_fill_holes(field)  # opacities inside the lung stay inside the field
        fields.append(ndimage.uniform_filter(field.astype(np.float32), size=5))
    return np.stack([image, np.stack(fields)], axis=1).astype(np.float32)


def opacities(
    heat_small: np.ndarray,
    heat_large: np.ndarray,
    *,
    threshold: float = 0.3,
    max_size: float = 0.2,
    max_aspect: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two detectors' heat maps [N, 1, H, W] -> fused detections [K, 7], image scores [N], study score [1].

    Focal findings only: regions longer than ``max_size`` of the image, or more than ``max_aspect`` times
    longer than wide (rib and vessel edges), are not reported."""

    def focal(box: Box) -> bool:
        long, short = max(box.x1 - box.x0, box.y1 - box.y0), min(box.x1 - box.x0, box.y1 - box.y0)
        return long <= max_size and long <= max_aspect * max(short, 1e-6)

    small = [[b for b in boxes if focal(b)] for boxes in slice_boxes(heat_small, threshold)]
    large = [[b for b in boxes if focal(b)] for boxes in slice_boxes(heat_large, threshold)]
    rows: list[list[float]] = []
    image_scores = np.zeros((len(small),), dtype=np.float32)
    for k, (a, b) in enumerate(zip(small, large, strict=True)):
        fused = weighted_box_fusion([a, b])
        image_scores[k] = max((box.score for box in fused), default=0.0)
        rows.extend([float(k), 0.0, box.score, box.x0, box.y0, box.x1, box.y1] for box in fused[:8])
    detections = np.asarray(rows, dtype=np.float32).reshape(-1, 7)
    study = np.asarray([image_scores.max() if len(image_scores) else 0.0], dtype=np.float32)
    return detections, image_scores, study
