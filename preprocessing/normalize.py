"""Intensity and size normalisation of a slice stack, written once against the array backend ``xp``.

numpy is the reference; CuPy runs the same functions on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from preprocessing.backend import NUMPY, ArrayBackend
from preprocessing.decode import DecodedImage


def rescale_to_hu(xp: Any, pixels: Any, slope: float, intercept: float) -> Any:
    """Stored values -> Hounsfield units (modality LUT: slope * value + intercept) as float32."""
    return pixels.astype(xp.float32) * xp.float32(slope) + xp.float32(intercept)


def invert_stored(xp: Any, stored: Any, bits_stored: int, signed: bool) -> Any:
    """MONOCHROME1 -> MONOCHROME2: mirror stored values over their full range (not the image's own min/max),
    so that the same anatomy gets the same values whichever photometric interpretation the modality used."""
    values = stored.astype(xp.int32)
    if signed:
        return -1 - values
    return ((1 << bits_stored) - 1) - values


def apply_window(xp: Any, values: Any, center: float, width: float) -> Any:
    """Linear VOI window mapped to [0, 1] (PS3.3 C.11.2.1.2 linear function, continuous form)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = center - width / 2.0
    return xp.clip((values - xp.float32(low)) / xp.float32(width), 0.0, 1.0).astype(xp.float32)


def percentile_normalize(xp: Any, stack: Any, low: float = 1.0, high: float = 99.0) -> Any:
    """Each image mapped to [0, 1] between its own ``low`` and ``high`` percentiles (projection radiography,
    where stored values have no physical unit and differ between detectors and exposures)."""
    flat = stack.reshape(stack.shape[0], -1)
    lo = xp.percentile(flat, low, axis=1).astype(xp.float32)[:, None, None]
    hi = xp.percentile(flat, high, axis=1).astype(xp.float32)[:, None, None]
    span = xp.maximum(hi - lo, xp.float32(1e-6))
    return xp.clip((stack - lo) / span, 0.0, 1.0).astype(xp.float32)


def resize_bilinear(xp: Any, stack: Any, size: tuple[int, int]) -> Any:
    """Resize [N, H, W] to [N, h, w] with bilinear interpolation (pixel centres aligned, edge clamped).

    When shrinking by an integer factor the stack is first box-averaged, so thin structures are not aliased.
    """
    n, h, w = stack.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return stack.astype(xp.float32, copy=False)
    if h % out_h == 0 and w % out_w == 0 and h >= out_h and w >= out_w:
        fy, fx = h // out_h, w // out_w
        return stack.reshape(n, out_h, fy, out_w, fx).mean(axis=(2, 4), dtype=xp.float32)

    def axis_weights(src: int, dst: int) -> tuple[Any, Any, Any]:
        coords = (xp.arange(dst, dtype=xp.float32) + 0.5) * (src / dst) - 0.5
        coords = xp.clip(coords, 0.0, src - 1)
        lo = xp.floor(coords).astype(xp.int64)
        hi = xp.minimum(lo + 1, src - 1)
        return lo, hi, (coords - lo).astype(xp.float32)

    y0, y1, wy = axis_weights(h, out_h)
    x0, x1, wx = axis_weights(w, out_w)
    top = stack[:, y0, :] * (1 - wy)[None, :, None] + stack[:, y1, :] * wy[None, :, None]
    out = top[:, :, x0] * (1 - wx)[None, None, :] + top[:, :, x1] * wx[None, None, :]
    return out.astype(xp.float32)


def prepare_stack(
    images: Sequence[DecodedImage],
    *,
    size: tuple[int, int],
    intensity: str,
    hu_clip: tuple[float, float],
    window: tuple[float, float] | None = None,
    backend: ArrayBackend = NUMPY,
) -> np.ndarray:
    """Ordered decoded slices -> float32 [N, h, w] model input on the host.

    ``intensity="hu"`` gives Hounsfield units clipped to ``hu_clip``; ``"window"`` gives [0, 1] after the
    ``(center, width)`` window; ``"percentile"`` maps each image's 1st-99th percentile to [0, 1] (no clip).
    MONOCHROME1 images are inverted so that higher always means denser.
    """
    xp = backend.xp
    slices = []
    for img in images:
        stored = xp.asarray(img.pixels)
        if img.photometric == "MONOCHROME1":
            stored = invert_stored(xp, stored, img.bits_stored, img.signed)
        values = rescale_to_hu(xp, stored, img.rescale_slope, img.rescale_intercept)
        slices.append(values)
    stack = xp.stack(slices, axis=0)
    if intensity == "percentile":
        return backend.to_numpy(percentile_normalize(xp, resize_bilinear(xp, stack, size)))
    stack = xp.clip(stack, xp.float32(hu_clip[0]), xp.float32(hu_clip[1]))
    stack = resize_bilinear(xp, stack, size)
    if intensity == "window":
        if window is None:
            raise ValueError("intensity 'window' needs a (center, width) window")
        stack = apply_window(xp, stack, window[0], window[1])
    return backend.to_numpy(stack).astype(np.float32, copy=False)


def to_model_layout(
    stack: np.ndarray, *, layout: str, channels: int, dtype: str, scale: float = 1.0, offset: float = 0.0
) -> np.ndarray:
    """[N, H, W] float32 -> the tensor a model declared: NHW, NCHW or NHWC, 1 or 3 channels, FP32 or UINT8.

    ``value * scale + offset`` is applied first; UINT8 then maps [0, 1] to [0, 255] (clipped).
    """
    values = stack.astype(np.float32) * np.float32(scale) + np.float32(offset)
    if dtype == "UINT8":
        values = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    elif dtype != "FP32":
        raise ValueError(f"unsupported input dtype {dtype!r}")
    if layout == "NHW":
        return np.ascontiguousarray(values)
    if layout == "NCHW":
        return np.ascontiguousarray(np.repeat(values[:, None, :, :], channels, axis=1))
    if layout == "NHWC":
        return np.ascontiguousarray(np.repeat(values[:, :, :, None], channels, axis=3))
    raise ValueError(f"unsupported input layout {layout!r}")
