"""Decode one DICOM instance into pixels plus the geometry and rescale needed downstream.

pydicom decodes with its pixel-data plugins: uncompressed (any endianness), RLE, JPEG baseline/extended/lossless
(pylibjpeg-libjpeg), JPEG-LS (pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg). Given an nvImageCodec decoder
(``preprocessing/codec.py``), the transfer syntaxes it handles go to it first, pydicom taking over on any
failure. Every failure becomes a ``DecodeError`` that says why, and sizes are checked before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from gateway.core.errors import DecodeError

if TYPE_CHECKING:
    from preprocessing.codec import NvImageDecoder

# Refuse to allocate more than this for one instance (decompression-bomb guard).
MAX_PIXELS_PER_INSTANCE = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class DecodedImage:
    """One frame of one instance, with what geometry and intensity handling need."""

    sop_instance_uid: str
    sop_class_uid: str
    pixels: np.ndarray  # [rows, columns], stored values (before rescale)
    rescale_slope: float
    rescale_intercept: float
    photometric: str
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    bits_stored: int = 16
    signed: bool = False
    decoder: str = "pydicom"  # which decoder produced the pixels

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    try:
        items = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(items) != count or not all(np.isfinite(items)):
        return None
    return tuple(items)


def read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DecodeError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc


def decode_dataset(ds: pydicom.Dataset, decoder: NvImageDecoder | None = None) -> DecodedImage:
    """Decode a single-frame image dataset. Raises ``DecodeError`` with the reason on any problem."""
    try:
        return _decode(ds, decoder)
    except DecodeError:
        raise
    except Exception as exc:  # malformed headers raise from wherever an element is first read
        raise DecodeError(f"malformed image header: {type(exc).__name__}: {exc}") from exc


def _decode(ds: pydicom.Dataset, decoder: NvImageDecoder | None) -> DecodedImage:
    if "PixelData" not in ds:
        raise DecodeError("no pixel data (not an image instance)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(f"image attributes missing or malformed: {exc}") from exc
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"bad image size {rows}x{cols}")
    if rows * cols * frames * samples > MAX_PIXELS_PER_INSTANCE:
        raise DecodeError(f"declared size {frames}x{rows}x{cols}x{samples} exceeds the per-instance limit")
    if frames != 1:
        raise DecodeError(f"multi-frame images ({frames} frames) are not supported by slice pipelines")
    if samples != 1:
        raise DecodeError(
            f"colour images (SamplesPerPixel={samples}) are not supported by grayscale pipelines"
        )
    pixels = decoder.decode(ds) if decoder is not None else None
    used = decoder.name if decoder is not None and pixels is not None else "pydicom"
    try:
        if pixels is None:
            pixels = ds.pixel_array
    except Exception as exc:  # plugins raise many types: RuntimeError, ValueError, NotImplementedError...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise DecodeError(f"pixel data could not be decoded ({name}): {type(exc).__name__}: {exc}") from exc
    if pixels.shape != (rows, cols):
        raise DecodeError(f"decoded shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"bad rescale slope/intercept: {exc}") from exc
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    number = ds.get("InstanceNumber")
    return DecodedImage(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        pixels=pixels,
        rescale_slope=slope,
        rescale_intercept=intercept,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        image_position=ipp,  # type: ignore[arg-type]
        image_orientation=iop,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        instance_number=int(number) if number not in (None, "") else None,
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        decoder=used,
    )


def decode_file(path: Path, decoder: NvImageDecoder | None = None) -> DecodedImage:
    return decode_dataset(read_dataset(path), decoder)


def decoder_availability() -> dict[str, bool]:
    """Which compressed transfer syntaxes this installation can decode (checked at start-up, not at first use)."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    syntaxes = {
        "RLE Lossless": uid.RLELossless,
        "JPEG Baseline": uid.JPEGBaseline8Bit,
        "JPEG Extended": uid.JPEGExtended12Bit,
        "JPEG Lossless": uid.JPEGLossless,
        "JPEG Lossless SV1": uid.JPEGLosslessSV1,
        "JPEG-LS Lossless": uid.JPEGLSLossless,
        "JPEG-LS Near-lossless": uid.JPEGLSNearLossless,
        "JPEG 2000 Lossless": uid.JPEG2000Lossless,
        "JPEG 2000": uid.JPEG2000,
    }
    return {name: bool(get_decoder(ts).is_available) for name, ts in syntaxes.items()}
