"""The NVIDIA DALI preprocessing pipeline (on the CPU here, device_id=None) computes the numpy reference math."""

from pathlib import Path

import numpy as np
import pytest

from gateway.demo.phantoms import write_cxr, write_head_ct
from preprocessing.dali_pipeline import DaliPreprocessor, available, supports
from preprocessing.decode import decode_file
from preprocessing.normalize import prepare_stack
from preprocessing.series import load_series, model_input

USABLE, REASON = available()
pytestmark = pytest.mark.skipif(not USABLE, reason=REASON)
TOLERANCE = {"hu": 0.1, "window": 2e-3}  # HU; [0, 1] after a 80 HU window (2e-3 = 0.16 HU)


@pytest.fixture(scope="module")
def dali() -> DaliPreprocessor:
    return DaliPreprocessor(device_id=None)


@pytest.mark.parametrize("intensity", ["hu", "window"])
@pytest.mark.parametrize("size", [(256, 256), (200, 300), (512, 512), (640, 640)])
def test_dali_cpu_matches_numpy(
    tmp_path: Path, dali: DaliPreprocessor, intensity: str, size: tuple[int, int]
) -> None:
    images = [decode_file(p) for p in write_head_ct(tmp_path, slices=6).paths]
    kwargs = dict(size=size, intensity=intensity, hu_clip=(-1024.0, 3071.0), window=(40.0, 80.0))
    reference = prepare_stack(images, **kwargs)  # type: ignore[arg-type]
    out = dali.prepare_stack(images, **kwargs)  # type: ignore[arg-type]
    assert out.shape == reference.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=0, atol=TOLERANCE[intensity])


def test_monochrome1_goes_through_dali_like_numpy(tmp_path: Path, dali: DaliPreprocessor) -> None:
    image = decode_file(write_cxr(tmp_path, size=512, monochrome1=True).paths[0])
    kwargs = dict(size=(256, 256), intensity="window", hu_clip=(0.0, 4095.0), window=(2048.0, 4096.0))
    np.testing.assert_allclose(
        dali.prepare_stack([image], **kwargs),  # type: ignore[arg-type]
        prepare_stack([image], **kwargs),  # type: ignore[arg-type]
        atol=1e-3,
    )


def test_what_dali_does_not_implement_goes_to_numpy(
    tmp_path: Path, dali: DaliPreprocessor, caplog: pytest.LogCaptureFixture
) -> None:
    series = load_series(write_cxr(tmp_path, size=1536).paths)  # 1536 -> 256: box average in the reference
    assert not supports(series.images, (256, 256), "window")
    assert not supports(series.images, (256, 256), "percentile")
    with pytest.raises(ValueError):
        dali.prepare_stack(series.images, size=(256, 256), intensity="percentile", hu_clip=(0.0, 1.0))
    kwargs = dict(size=(256, 256), intensity="percentile", hu_clip=(0.0, 1.0), window=None)
    with caplog.at_level("WARNING", logger="preprocessing.series"):
        routed = model_input(series, dali=dali, **kwargs)  # type: ignore[arg-type]
    # Routed to numpy up front, not tried on DALI and rescued by the fallback.
    assert not [r for r in caplog.records if "DALI preprocessing failed" in r.getMessage()]
    np.testing.assert_array_equal(routed, model_input(series, **kwargs))  # type: ignore[arg-type]
