"""Cheap anatomy checks from the pixels, for routing: is the lung in this CT's field of view?

Routing by header misses what scanners actually write (PARTIALBODY, a protocol name, nothing), and incidental
pulmonary nodules on abdominal, cardiac and PET-CT series are a use case of their own. Before a chest pipeline
runs on a series its header did not route there, ``lung_evidence`` decodes a few evenly spaced slices and looks
for aerated lung *inside the body outline*:

* body: the largest connected region above -500 HU, holes filled (the air outside and the table are not body);
* lung: voxels between -950 and -600 HU inside the body (aerated parenchyma is about -850; bowel gas and the
  air of the airways are below -950 and do not count), at least ``MIN_LUNG_MM2`` per slice and
  ``MIN_LUNG_FRACTION`` of the body's cross-section;
* present: lung on at least ``min_fraction`` of the sampled slices.

The evidence (how many sampled slices had lung, and their z-range) goes into the audit and the SR. A head CT has
no aerated tissue inside the skull, so a chest pipeline never runs on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from gateway.core.errors import DecodeError
from preprocessing.decode import DecodedImage, decode_dataset, read_dataset

SAMPLED_SLICES = 9
LUNG_HU = (-950.0, -600.0)
BODY_HU = -500.0
MIN_LUNG_MM2 = 400.0
MIN_LUNG_FRACTION = 0.03
WORK_SIZE = 128  # slices are checked at about this many pixels across


@dataclass(frozen=True, kw_only=True)
class AnatomyEvidence:
    anatomy: str
    present: bool
    sampled: int
    with_anatomy: int
    z_range_mm: tuple[float, float] | None  # along the slice normal, of the sampled slices that showed it

    @property
    def fraction(self) -> float:
        return self.with_anatomy / self.sampled if self.sampled else 0.0

    def describe(self) -> str:
        where = (
            f", z {self.z_range_mm[0]:.1f} to {self.z_range_mm[1]:.1f} mm"
            if self.z_range_mm is not None
            else ""
        )
        return f"{self.anatomy} on {self.with_anatomy} of {self.sampled} sampled slices{where}"


def hu_of(image: DecodedImage) -> np.ndarray:
    """The image in Hounsfield units (stored values through the modality rescale)."""
    return _hu(image)


def _hu(image: DecodedImage) -> np.ndarray:
    return image.pixels.astype(np.float32) * image.rescale_slope + image.rescale_intercept


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body's cross-section: the largest region above -500 HU, holes (lungs, bowel gas) filled."""
    return np.asarray(ndimage.binary_fill_holes(_largest(hu > BODY_HU)))


def lung_region(hu: np.ndarray) -> np.ndarray:
    """Where lung findings may lie: aerated lung inside the body with its holes (nodules, vessels) filled."""
    lung = body_mask(hu) & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    return np.asarray(ndimage.binary_fill_holes(lung))


def intracranial_region(hu: np.ndarray) -> np.ndarray:
    """Inside the skull: the largest bone region (above 300 HU) filled, minus the bone. A slice whose skull is not
    a closed ring (the vertex, the skull base) gives the body outline instead, so no true finding is lost."""
    skull = _largest(hu > 300.0)
    inside = np.asarray(ndimage.binary_fill_holes(skull)) & ~skull
    body = body_mask(hu)
    return inside if inside.sum() >= 0.05 * max(1, int(body.sum())) else body


REGIONS = {"body": body_mask, "lung": lung_region, "intracranial": intracranial_region}


def slice_has_lung(image: DecodedImage) -> bool:
    hu = _hu(image)
    step = max(1, max(hu.shape) // WORK_SIZE)
    hu = hu[::step, ::step]
    row_mm, col_mm = image.pixel_spacing or (1.0, 1.0)
    pixel_mm2 = row_mm * col_mm * step * step
    body = body_mask(hu)
    lung = body & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    area = float(lung.sum()) * pixel_mm2
    return area >= MIN_LUNG_MM2 and float(lung.sum()) >= MIN_LUNG_FRACTION * float(body.sum())


def lung_evidence(paths: Sequence[Path], *, min_fraction: float = 0.2) -> AnatomyEvidence:
    """Decode up to ``SAMPLED_SLICES`` evenly spaced instances of a CT series and look for lung."""
    if not paths:
        return AnatomyEvidence(anatomy="lung", present=False, sampled=0, with_anatomy=0, z_range_mm=None)
    picks = sorted({round(i) for i in np.linspace(0, len(paths) - 1, min(SAMPLED_SLICES, len(paths)))})
    sampled, found_z = 0, []
    for index in picks:
        try:
            image = decode_dataset(read_dataset(paths[index]))
        except DecodeError:
            continue
        sampled += 1
        if slice_has_lung(image):
            found_z.append(_z(image))
    present = sampled > 0 and len(found_z) >= max(1, min_fraction * sampled)
    known = [z for z in found_z if z is not None]
    return AnatomyEvidence(
        anatomy="lung",
        present=present,
        sampled=sampled,
        with_anatomy=len(found_z),
        z_range_mm=(min(known), max(known)) if known else None,
    )


def _z(image: DecodedImage) -> float | None:
    if image.image_position is None or image.image_orientation is None:
        return None
    row = np.asarray(image.image_orientation[:3])
    col = np.asarray(image.image_orientation[3:])
    return float(np.dot(np.cross(row, col), np.asarray(image.image_position)))


ANATOMY_CHECKS = {"lung": lung_evidence}
