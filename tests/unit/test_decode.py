from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.core.errors import DecodeError
from preprocessing.decode import decode_dataset, decode_file, decoder_availability


def test_every_transfer_syntax_decodes_to_identical_pixels(real_data: Path) -> None:
    files = sorted((real_data / "transfer-syntaxes").glob("mr_*.dcm"))
    assert len(files) == 9
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert len(syntaxes) >= 7, "the set should cover distinct transfer syntaxes"
    reference = decode_file(files[0]).pixels
    assert reference.shape == (384, 384) and reference.std() > 0
    for path in files[1:]:
        pixels = decode_file(path).pixels
        np.testing.assert_array_equal(pixels, reference, err_msg=path.name)


@pytest.mark.parametrize(
    "name",
    [
        "CT1_JLSN.dcm",
        "RG2_JLSL.dcm",
        "JPEGLossless_1s_1f_u_16_12.dcm",
        "JPEGLosslessP14SV1_1s_1f_u_16_16.dcm",
    ],
)
def test_compressed_real_images_decode(real_data: Path, name: str) -> None:
    ds = pydicom.dcmread(real_data / "compressed" / name)
    image = decode_dataset(ds)
    assert image.shape == (int(ds.Rows), int(ds.Columns))
    assert image.pixels.std() > 0


def test_all_compressed_decoders_are_installed() -> None:
    assert all(decoder_availability().values()), decoder_availability()


def test_real_ct_geometry_and_rescale(real_data: Path) -> None:
    image = decode_file(real_data / "ct-3slice" / "01.dcm")
    assert image.image_orientation is not None and image.image_position is not None
    assert image.rescale_slope == 1.0
    hu = image.pixels * image.rescale_slope + image.rescale_intercept
    assert hu.min() < -500 and hu.max() > 200  # air and bone present


def test_missing_pixel_data_is_a_decode_error(real_data: Path) -> None:
    ds = pydicom.dcmread(real_data / "sr-example" / "sr.dcm")
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_dataset(ds)


def test_short_pixel_data_is_a_decode_error(real_data: Path) -> None:
    ds = pydicom.dcmread(real_data / "ct-3slice" / "01.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(DecodeError, match="could not be decoded"):
        decode_dataset(ds)


def test_huge_declared_size_is_refused_before_decoding(real_data: Path) -> None:
    ds = pydicom.dcmread(real_data / "ct-3slice" / "01.dcm")
    ds.Rows = ds.Columns = 65535
    with pytest.raises(DecodeError, match="exceeds the per-instance limit"):
        decode_dataset(ds)


def test_corrupt_jpeg_ls_stream_is_a_decode_error(real_data: Path) -> None:
    ds = pydicom.dcmread(real_data / "transfer-syntaxes" / "mr_7.dcm")
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([b"\x00" * 8 + frame[8:]])  # start-of-image marker and header destroyed
    with pytest.raises(DecodeError):
        decode_dataset(ds)
