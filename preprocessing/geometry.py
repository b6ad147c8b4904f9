"""Order the slices of a series geometrically: by ImagePositionPatient projected on the slice normal.

InstanceNumber is only a fallback when positions or orientations are missing, and the choice is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.errors import DecodeError
from preprocessing.decode import DecodedImage

ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True, kw_only=True)
class SliceOrder:
    indices: tuple[int, ...]  # positions in the input, in ascending order along the normal
    method: str  # "geometry" or "instance_number" or "single"
    spacing_mm: float | None  # median distance between neighbouring slices


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise DecodeError("ImageOrientationPatient row and column vectors are parallel")
    return normal / norm


def order_slices(images: Sequence[DecodedImage]) -> SliceOrder:
    """Sort slices; raise ``DecodeError`` when the series is not one consistent stack."""
    if not images:
        raise DecodeError("no decodable image in the series")
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise DecodeError(f"series mixes image sizes {sorted(shapes)}")
    if len(images) == 1:
        return SliceOrder(indices=(0,), method="single", spacing_mm=None)
    have_geometry = all(
        img.image_position is not None and img.image_orientation is not None for img in images
    )
    if have_geometry:
        first = np.asarray(images[0].image_orientation)
        for img in images[1:]:
            if np.max(np.abs(np.asarray(img.image_orientation) - first)) > ORIENTATION_TOLERANCE:
                raise DecodeError("series mixes slice orientations (not one stack)")
        normal = slice_normal(first.tolist())
        distances = np.array([float(np.dot(normal, np.asarray(img.image_position))) for img in images])
        order = np.argsort(distances, kind="stable")
        gaps = np.diff(distances[order])
        spacing = float(np.median(gaps)) if gaps.size else None
        return SliceOrder(indices=tuple(int(i) for i in order), method="geometry", spacing_mm=spacing)
    numbers = [img.instance_number if img.instance_number is not None else i for i, img in enumerate(images)]
    order = np.argsort(np.asarray(numbers), kind="stable")
    return SliceOrder(indices=tuple(int(i) for i in order), method="instance_number", spacing_mm=None)
