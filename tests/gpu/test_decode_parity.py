"""GPU decode (nvImageCodec: nvJPEG, nvJPEG2000) against pydicom, per transfer syntax: lossless syntaxes must
match exactly, lossy ones within the rounding of a different IDCT. Uses pydicom's bundled test files and
phantom CT slices compressed here, so it needs neither the shared data folder nor the repository's conftest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from gateway.demo.phantoms import write_head_ct
from preprocessing import codec
from preprocessing.backend import select_backend
from preprocessing.decode import decode_dataset

pytestmark = pytest.mark.gpu
LOSSLESS = {
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
}


@pytest.fixture(scope="module")
def gpu_decoder() -> codec.NvImageDecoder:
    backend = select_backend()
    if backend.name != "cupy":
        pytest.skip(f"no CUDA device: {backend.reason}")
    usable, why = codec.available()
    if not usable:
        pytest.skip(why)
    return codec.NvImageDecoder(device_id=0)


def _bundled() -> list[Path]:
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    paths = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax in codec.GPU_SYNTAXES and "Rows" in ds:
            paths.append(path)
    return paths


def test_gpu_decode_matches_pydicom_on_bundled_files(gpu_decoder: codec.NvImageDecoder) -> None:
    checked = 0
    for path in _bundled():
        ds = pydicom.dcmread(path)
        if not gpu_decoder.handles(ds):
            continue
        try:
            reference = decode_dataset(pydicom.dcmread(path)).pixels
        except Exception:
            continue  # pydicom cannot decode it here either: nothing to compare
        image = decode_dataset(ds, gpu_decoder)
        syntax = ds.file_meta.TransferSyntaxUID
        assert image.pixels.dtype == reference.dtype, path.name
        if syntax in LOSSLESS:
            np.testing.assert_array_equal(image.pixels, reference, err_msg=f"{path.name} ({image.decoder})")
        else:
            diff = np.abs(image.pixels.astype(np.int64) - reference.astype(np.int64))
            assert diff.max() <= 2, f"{path.name}: lossy decode differs by {diff.max()}"
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("signed", [True, False])
def test_gpu_decodes_phantom_ct_in_jpeg2000_exactly(
    gpu_decoder: codec.NvImageDecoder, tmp_path: Path, signed: bool
) -> None:
    path = write_head_ct(tmp_path, slices=1, rows=256, cols=256).paths[0]
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    if signed:
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        pixels = hu.astype(np.int16)
    else:
        ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
        pixels = (hu + 1024).clip(0, 4095).astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.compress(uid.JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    image = decode_dataset(pydicom.dcmread(tmp_path / "j2k.dcm"), gpu_decoder)
    np.testing.assert_array_equal(image.pixels, pixels)
    print(f"signed={signed}: decoded by {image.decoder}, fallbacks {gpu_decoder.fallbacks}")
