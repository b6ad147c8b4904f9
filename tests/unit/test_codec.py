"""The nvImageCodec decode path (preprocessing/codec.py), run here with its CPU back-ends: per transfer syntax it
decodes what it handles pixel-exactly as pydicom does, leaves the rest to pydicom, and falls back to pydicom
whenever it fails. tests/gpu repeats the parity check with the GPU decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from gateway.demo.phantoms import write_head_ct
from preprocessing import codec
from preprocessing.decode import decode_dataset

usable, why = codec.available()
pytestmark = pytest.mark.skipif(not usable, reason=why)


def _compressed(real_data: Path) -> list[Path]:
    paths = []
    for path in sorted(real_data.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID.is_compressed and "Rows" in ds:
            paths.append(path)
    return paths


def test_cpu_decoder_matches_pydicom_for_every_compressed_real_file(real_data: Path) -> None:
    decoder = codec.NvImageDecoder(device_id=None)
    used = {}
    for path in _compressed(real_data):
        ds = pydicom.dcmread(path)
        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            continue
        reference = decode_dataset(pydicom.dcmread(path))
        image = decode_dataset(ds, decoder)
        assert image.pixels.dtype == reference.pixels.dtype, path.name
        np.testing.assert_array_equal(image.pixels, reference.pixels, err_msg=path.name)
        used[str(ds.file_meta.TransferSyntaxUID)] = image.decoder
    assert used[uid.JPEG2000Lossless] == "nvimgcodec-cpu"
    # Not in the CPU table: pydicom decodes them without asking nvImageCodec.
    for syntax in (uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.RLELossless):
        assert used[syntax] == "pydicom", syntax
    assert decoder.fallbacks == 0


def test_a_frame_nvimagecodec_cannot_decode_falls_back_to_pydicom(real_data: Path) -> None:
    """nvImageCodec's CPU back-ends have no lossless JPEG (process 14): offered one anyway, it fails and
    pydicom's pixels come back."""
    decoder = codec.NvImageDecoder(device_id=None)
    decoder.syntaxes = codec.GPU_SYNTAXES  # pretend to be the GPU table
    path = next(
        p
        for p in _compressed(real_data)
        if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    )
    image = decode_dataset(pydicom.dcmread(path), decoder)
    np.testing.assert_array_equal(image.pixels, decode_dataset(pydicom.dcmread(path)).pixels)
    assert image.decoder == "pydicom"
    assert decoder.fallbacks == 1


@pytest.mark.parametrize("signed", [True, False])
def test_signed_and_unsigned_ct_in_jpeg2000_decode_exactly(tmp_path: Path, signed: bool) -> None:
    path = write_head_ct(tmp_path, slices=1, rows=128, cols=128).paths[0]
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    if signed:
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        pixels = hu.astype(np.int16)  # negative values: air at -1000
    else:
        ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
        pixels = (hu + 1024).clip(0, 4095).astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.compress(uid.JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    ds = pydicom.dcmread(_save(ds, tmp_path / "j2k.dcm"))
    decoder = codec.NvImageDecoder(device_id=None)
    image = decode_dataset(ds, decoder)
    assert image.pixels.dtype == pixels.dtype
    np.testing.assert_array_equal(image.pixels, pixels)
    assert (image.pixels.min() < 0) == signed
    # The CPU back-end (OpenCV / OpenJPEG) decodes unsigned JPEG 2000 itself and gives up on signed samples,
    # which pydicom then decodes: either way the pixels above are exact.
    assert image.decoder == ("pydicom" if signed else "nvimgcodec-cpu")
    assert decoder.fallbacks == (1 if signed else 0)


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_select_decoder_by_setting_and_device() -> None:
    assert codec.select_decoder("pydicom", gpu=True)[0] is None
    none, reason = codec.select_decoder("auto", gpu=False)
    assert none is None and "no CUDA" in reason
    forced, reason = codec.select_decoder("nvimgcodec", gpu=False)
    assert forced is not None and forced.name == "nvimgcodec-cpu" and "pydicom for the rest" in reason
