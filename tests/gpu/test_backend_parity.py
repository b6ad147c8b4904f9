"""The CuPy backend runs the same preprocessing code as numpy and must agree with it."""

from pathlib import Path

import numpy as np
import pytest

from gateway.demo.phantoms import write_head_ct
from preprocessing.backend import NUMPY, select_backend
from preprocessing.decode import decode_file
from preprocessing.normalize import prepare_stack

pytestmark = pytest.mark.gpu


def test_backend_probe_never_raises_and_honours_force_cpu() -> None:
    assert select_backend(force_cpu=True).name == "numpy"
    backend = select_backend()
    assert backend.name in ("numpy", "cupy") and backend.reason


@pytest.mark.parametrize("intensity", ["hu", "window", "percentile"])
@pytest.mark.parametrize("size", [(256, 256), (200, 300)])
def test_cupy_matches_numpy(tmp_path: Path, intensity: str, size: tuple[int, int]) -> None:
    backend = select_backend()
    if backend.name != "cupy":
        pytest.skip(f"no CUDA backend: {backend.reason}")
    images = [decode_file(p) for p in write_head_ct(tmp_path, slices=4).paths]
    kwargs = dict(size=size, intensity=intensity, hu_clip=(-1024.0, 3071.0), window=(40.0, 80.0))
    reference = prepare_stack(images, backend=NUMPY, **kwargs)  # type: ignore[arg-type]
    gpu = prepare_stack(images, backend=backend, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_allclose(gpu, reference, rtol=1e-5, atol=1e-3)
