"""The same preprocessing math as ``preprocessing.normalize.prepare_stack`` as an NVIDIA DALI pipeline.

Stored values -> modality LUT (slope, intercept per slice) -> clip -> resize (linear, pixel centres aligned)
-> optional VOI window to [0, 1]. It runs on the GPU (``device_id`` = a CUDA device) or on the CPU
(``device_id=None``), so CI checks it against the numpy reference without a GPU (tests/unit/test_dali_parity.py).

Where the math differs from numpy, numpy stays the reference: downscaling by an integer factor above 2 is
box-averaged by numpy and antialiased-linear by DALI, and the per-image percentile normalisation has no DALI
operator, so ``supports`` says no and the caller uses numpy. Pipelines are built once per (size, intensity,
device) and reused; a series is one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from preprocessing.decode import DecodedImage
from preprocessing.normalize import invert_stored

MAX_BATCH = 1024


def available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"NVIDIA DALI is not usable: {type(exc).__name__}: {exc}"
    return True, "NVIDIA DALI available"


def supports(images: Sequence[DecodedImage], size: tuple[int, int], intensity: str) -> bool:
    """True when the DALI pipeline computes exactly the reference math for this series."""
    if intensity not in ("hu", "window") or not images:
        return False
    h, w = images[0].shape
    integer_shrink = h % size[0] == 0 and w % size[1] == 0 and (h // size[0] > 2 or w // size[1] > 2)
    return not integer_shrink


class DaliPreprocessor:
    """Cached DALI pipelines; thread-safe (one run at a time per pipeline)."""

    def __init__(self, device_id: int | None = None, num_threads: int = 2) -> None:
        self.device_id = device_id
        self.num_threads = num_threads
        self._pipelines: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "dali-cpu" if self.device_id is None else f"dali-gpu:{self.device_id}"

    def _pipeline(
        self, size: tuple[int, int], clip: tuple[float, float], window: tuple[float, float] | None
    ) -> Any:
        key = (size, clip, window)
        if key in self._pipelines:
            return self._pipelines[key]
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        on_gpu = self.device_id is not None

        # Synchronous, no prefetch: one series in, one batch out, on demand.
        @pipeline_def(
            batch_size=MAX_BATCH,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def build() -> Any:
            stored = fn.external_source(name="stored", layout="HWC", device="cpu")
            slope = fn.external_source(name="slope", device="cpu")
            intercept = fn.external_source(name="intercept", device="cpu")
            values: Any = fn.cast(stored.gpu() if on_gpu else stored, dtype=types.FLOAT)
            values = values * (slope.gpu() if on_gpu else slope) + (intercept.gpu() if on_gpu else intercept)
            values = dmath.clamp(values, clip[0], clip[1])
            values = fn.resize(
                values,
                size=[float(size[0]), float(size[1])],
                interp_type=types.INTERP_LINEAR,
                antialias=False,
            )
            if window is not None:
                low, width = window[0] - window[1] / 2.0, window[1]
                values = dmath.clamp((values - low) / width, 0.0, 1.0)
            return values

        pipe = build()
        pipe.build()
        self._pipelines[key] = pipe
        return pipe

    def prepare_stack(
        self,
        images: Sequence[DecodedImage],
        *,
        size: tuple[int, int],
        intensity: str,
        hu_clip: tuple[float, float],
        window: tuple[float, float] | None = None,
    ) -> np.ndarray:
        if not supports(images, size, intensity):
            raise ValueError(
                f"DALI pipeline does not implement intensity {intensity!r} at this resize factor"
            )
        if intensity == "window" and window is None:
            raise ValueError("intensity 'window' needs a (center, width) window")
        stored = []
        for img in images:
            pixels = img.pixels
            if img.photometric == "MONOCHROME1":
                pixels = invert_stored(np, pixels, img.bits_stored, img.signed)
            stored.append(np.ascontiguousarray(pixels.astype(np.int32, copy=False))[:, :, None])
        slopes = [np.float32(img.rescale_slope) for img in images]
        intercepts = [np.float32(img.rescale_intercept) for img in images]
        pipe = self._pipeline(size, hu_clip, window if intensity == "window" else None)
        out: list[np.ndarray] = []
        with self._lock:
            for start in range(0, len(stored), MAX_BATCH):
                end = start + MAX_BATCH
                pipe.feed_input("stored", stored[start:end])
                pipe.feed_input("slope", slopes[start:end])
                pipe.feed_input("intercept", intercepts[start:end])
                (batch,) = pipe.run()
                if self.device_id is not None:
                    batch = batch.as_cpu()
                out.extend(np.asarray(batch.at(i))[:, :, 0] for i in range(len(batch)))
        return np.stack(out).astype(np.float32, copy=False)
