"""The array backend: CuPy on a CUDA device, numpy otherwise, chosen once at start-up.

All preprocessing math is written against ``backend.xp`` so the same code runs on either. numpy is the
reference implementation; the GPU path is checked against it by the parity tests in ``tests/gpu``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ArrayBackend:
    name: str  # "numpy" or "cupy"
    xp: ModuleType
    reason: str

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        if self.name == "cupy":
            return np.asarray(array.get())
        return np.asarray(array)


NUMPY = ArrayBackend(name="numpy", xp=np, reason="numpy reference backend")


def select_backend(*, force_cpu: bool = False) -> ArrayBackend:
    """Probe for a usable CUDA device once; fall back to numpy on any failure, with the reason."""
    if force_cpu:
        return ArrayBackend(name="numpy", xp=np, reason="CPU forced by configuration")
    try:
        import cupy

        # is_available() itself can raise on machines without a driver; an allocation proves the device works.
        if not cupy.cuda.is_available():
            return ArrayBackend(name="numpy", xp=np, reason="no CUDA device visible to CuPy")
        probe = cupy.arange(4, dtype=cupy.float32).sum()
        if float(probe) != 6.0:  # pragma: no cover - defective device
            return ArrayBackend(name="numpy", xp=np, reason="CuPy probe computed a wrong result")
        return ArrayBackend(name="cupy", xp=cupy, reason="CUDA device available")
    except ImportError:
        return ArrayBackend(name="numpy", xp=np, reason="CuPy is not installed")
    except Exception as exc:  # CUDARuntimeError and friends
        return ArrayBackend(name="numpy", xp=np, reason=f"CuPy present but unusable: {type(exc).__name__}")
