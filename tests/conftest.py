from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.settings import default_model_repository

# The shared real-data folder sits next to the repository; GATEWAY_REAL_DATA overrides the location.
REAL_DATA = Path(
    os.environ.get("GATEWAY_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real DICOM test data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def model_repository() -> Path:
    repo = default_model_repository()
    if not any(repo.glob("*/1/model.onnx")):
        pytest.fail("ONNX models are not built: run `make models` (python scripts/build_models.py)")
    return repo


@pytest.fixture(scope="session")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tritonserver from the nvidia-pytriton wheel, shared by the session; yields its gRPC URL."""
    from gateway.triton_server import TritonServer

    server = TritonServer(model_repository, tmp_path_factory.mktemp("triton"), startup_timeout_s=180)
    server.start()
    try:
        yield server.grpc_url
    finally:
        server.stop()
