"""Test-side inverse of the SR writer's geometry: patient coordinates back to pixel coordinates."""

from __future__ import annotations

import numpy as np
import pydicom


def patient_to_pixel(header: pydicom.Dataset, point: tuple[float, ...]) -> tuple[float, float]:
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in header.PixelSpacing)
    delta = np.asarray(point, dtype=float) - origin
    return float(delta @ iop[:3] / col_mm), float(delta @ iop[3:] / row_mm)
