"""Load one series from the spool: decode every instance, drop the undecodable with a reason, order the
slices geometrically and build the model input stack."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from gateway.core.errors import DecodeError
from preprocessing.backend import NUMPY, ArrayBackend
from preprocessing.dali_pipeline import DaliPreprocessor, supports
from preprocessing.decode import DecodedImage, decode_dataset, read_dataset
from preprocessing.geometry import SliceOrder, order_slices
from preprocessing.normalize import prepare_stack

if TYPE_CHECKING:
    from preprocessing.codec import NvImageDecoder

logger = logging.getLogger(__name__)


TYPE2_RESULT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True, kw_only=True)
class LoadedSeries:
    images: tuple[DecodedImage, ...]  # in slice order
    headers: tuple[Dataset, ...]  # same order, pixel data removed
    order: SliceOrder
    skipped: tuple[tuple[str, str], ...]  # (file name, reason)

    def grid_spacing_mm(self, size: tuple[int, int]) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm of the series resampled to ``size``; 1.0 where unknown.

        The slice spacing is the median distance between ordered slice positions, else SliceThickness."""
        rows, cols = self.images[0].shape
        row_mm, col_mm = self.images[0].pixel_spacing or (1.0, 1.0)
        slice_mm = self.order.spacing_mm
        if not slice_mm or slice_mm <= 0:
            try:
                slice_mm = float(self.headers[0].get("SliceThickness") or 1.0)
            except (TypeError, ValueError):
                slice_mm = 1.0
        return float(slice_mm), row_mm * rows / size[0], col_mm * cols / size[1]


def _ready_for_results(ds: Dataset) -> None:
    """What result builders need of a header: the Type 2 attributes present (senders sometimes omit them), no
    empty Specific Character Set (empty means the default repertoire; the builders reject '')."""
    for keyword in TYPE2_RESULT_ATTRIBUTES:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet


def load_series(paths: Sequence[Path], decoder: NvImageDecoder | None = None) -> LoadedSeries:
    """Read and decode the instances of one series (``decoder``: nvImageCodec for the syntaxes it handles)."""
    images: list[DecodedImage] = []
    headers: list[Dataset] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in paths:
        try:
            ds = read_dataset(path)
            image = decode_dataset(ds, decoder)
        except DecodeError as exc:
            skipped.append((Path(path).name, str(exc)))
            continue
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
        # Result objects copy geometry from these headers: drop what failed validation (NaN, wrong counts).
        plane_ok = image.image_position is not None and image.image_orientation is not None
        for keyword, valid in (
            ("ImagePositionPatient", plane_ok),
            ("ImageOrientationPatient", plane_ok),
            ("PixelSpacing", image.pixel_spacing is not None),
        ):
            if keyword in ds and not valid:
                delattr(ds, keyword)
        _ready_for_results(ds)
        images.append(image)
        headers.append(ds)
        names.append(Path(path).name)
    if not images:
        reasons = "; ".join(sorted({reason for _, reason in skipped}))
        raise DecodeError(f"no instance of the series could be decoded: {reasons}")
    order = order_slices(images)
    for index in order.duplicates:
        skipped.append(
            (names[index], "duplicate slice position: a later instance at this position is analysed")
        )
    return LoadedSeries(
        images=tuple(images[i] for i in order.indices),
        headers=tuple(headers[i] for i in order.indices),
        order=order,
        skipped=tuple(skipped),
    )


def read_headers(paths: Sequence[Path]) -> tuple[Dataset, ...]:
    """The headers (no pixel data) of the instances that can be parsed, for a result about a series that could
    not be analysed; in InstanceNumber order, with the Type 2 attributes results copy present."""
    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # unreadable files are reported by the analysis that failed
            continue
        _ready_for_results(ds)
        headers.append(ds)

    def number(ds: Dataset) -> int:
        try:
            return int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            return 0

    return tuple(sorted(headers, key=number))


def model_input(
    series: LoadedSeries,
    *,
    size: tuple[int, int],
    intensity: str,
    hu_clip: tuple[float, float],
    window: tuple[float, float] | None,
    backend: ArrayBackend = NUMPY,
    dali: DaliPreprocessor | None = None,
) -> np.ndarray:
    """The model input of a series: through the DALI pipeline when one is given and implements this series'
    math exactly, else through the array backend. A DALI failure falls back to the array backend."""
    if dali is not None and supports(series.images, size, intensity):
        try:
            return dali.prepare_stack(
                series.images, size=size, intensity=intensity, hu_clip=hu_clip, window=window
            )
        except Exception as exc:
            logger.warning(
                "DALI preprocessing failed (%s: %s); using %s", type(exc).__name__, exc, backend.name
            )
    return prepare_stack(
        series.images, size=size, intensity=intensity, hu_clip=hu_clip, window=window, backend=backend
    )
