"""Test-side geometry: the pixel coordinates of an SR outline to patient coordinates, with the image's plane."""

from __future__ import annotations

import numpy as np
import pydicom


def pixel_to_patient(header: pydicom.Dataset, point: tuple[float, ...]) -> np.ndarray:
    """(column, row) on the image -> (x, y, z) mm in the patient."""
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in header.PixelSpacing)
    column, row = point[:2]
    return np.asarray(origin + iop[:3] * col_mm * column + iop[3:] * row_mm * row)
