"""Order the slices of a series geometrically: by ImagePositionPatient projected on the slice normal.

InstanceNumber is only a fallback when positions or orientations are missing, and the choice is reported.

Duplicate slice positions (two instances within ``DUPLICATE_TOLERANCE_MM`` along the normal: a slice re-sent
with a new SOP Instance UID, a re-reconstruction merged into the series) are resolved by one documented rule:
**the instance received last at a position is analysed**, the others are reported in ``SliceOrder.duplicates``
and skipped with the reason "duplicate slice position". Result objects then reference one image per position
(a SEG cannot hold two frames at one plane position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.core.errors import DecodeError
from preprocessing.decode import DecodedImage

ORIENTATION_TOLERANCE = 1e-3
DUPLICATE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True, kw_only=True)
class SliceOrder:
    indices: tuple[int, ...]  # positions in the input, in ascending order along the normal
    method: str  # "geometry" or "instance_number" or "single"
    spacing_mm: float | None  # median distance between neighbouring slices
    duplicates: tuple[int, ...] = ()  # positions in the input left out: another instance at the same position


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise DecodeError("ImageOrientationPatient row and column vectors are parallel")
    return normal / norm


def order_slices(images: Sequence[DecodedImage]) -> SliceOrder:
    """Sort slices; raise ``DecodeError`` when the series is not one consistent stack.

    ``images`` come in arrival order: of several at one position the last is kept (see the module notes)."""
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
        kept: list[int] = []
        duplicates: list[int] = []
        for index in (int(i) for i in np.argsort(distances, kind="stable")):
            if kept and abs(distances[index] - distances[kept[-1]]) <= DUPLICATE_TOLERANCE_MM:
                earlier, kept[-1] = sorted((kept[-1], index))  # the later arrival stays
                duplicates.append(earlier)
            else:
                kept.append(index)
        gaps = np.diff(distances[kept])
        spacing = float(np.median(gaps)) if gaps.size else None
        return SliceOrder(
            indices=tuple(kept), method="geometry", spacing_mm=spacing, duplicates=tuple(sorted(duplicates))
        )
    numbers = [img.instance_number if img.instance_number is not None else i for i, img in enumerate(images)]
    order = np.argsort(np.asarray(numbers), kind="stable")
    return SliceOrder(indices=tuple(int(i) for i in order), method="instance_number", spacing_mm=None)
