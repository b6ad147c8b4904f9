"""Outlines of a binary mask as closed polylines, for presentation-state graphics.

The outline follows the pixel edges (crack following): every edge between a mask pixel and a background pixel
is a directed segment, oriented so that the mask lies on its right; linking the segments end to start gives one
closed loop per outer boundary and per hole. Collinear points are dropped, so a square region is four corners.
Coordinates are pixel corners (x = column, y = row), the convention of DICOM PIXEL graphic units, in which the
centre of the top-left pixel is (0.5, 0.5).
"""

from __future__ import annotations

import numpy as np

Point = tuple[int, int]


def _edges(mask: np.ndarray) -> dict[Point, list[Point]]:
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    nexts: dict[Point, list[Point]] = {}

    def add(where: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
        rows, cols = np.nonzero(where)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = (c + start[0], r + start[1]), (c + end[0], r + end[1])
            nexts.setdefault(a, []).append(b)

    # For a mask pixel at (row r, col c) with corners (c, r) .. (c+1, r+1): clockwise around the pixel.
    add(inside & ~padded[:-2, 1:-1], (0, 0), (1, 0))  # top edge, background above
    add(inside & ~padded[1:-1, 2:], (1, 0), (1, 1))  # right edge
    add(inside & ~padded[2:, 1:-1], (1, 1), (0, 1))  # bottom edge
    add(inside & ~padded[1:-1, :-2], (0, 1), (0, 0))  # left edge
    return nexts


def _simplify(loop: list[Point]) -> list[Point]:
    """Drop the points where the outline goes straight on."""
    out = []
    n = len(loop)
    for i, p in enumerate(loop):
        a, b = loop[i - 1], loop[(i + 1) % n]
        if (p[0] - a[0]) * (b[1] - p[1]) != (p[1] - a[1]) * (b[0] - p[0]):
            out.append(p)
    return out


def outlines(mask: np.ndarray, *, min_pixels: int = 4, max_loops: int = 64) -> list[np.ndarray]:
    """Closed outlines (first point repeated last) of the regions of a 2D ``mask``, largest first; regions of
    fewer than ``min_pixels`` pixels are left out."""
    if mask.ndim != 2:
        raise ValueError(f"outlines needs a 2D mask, got shape {mask.shape}")
    from scipy import ndimage

    labels, count = ndimage.label(mask.astype(bool))
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    loops: list[tuple[int, np.ndarray]] = []
    for index in np.argsort(sizes)[::-1][:max_loops]:
        if sizes[index] < min_pixels:
            break
        nexts = _edges(labels == index + 1)
        while nexts:
            start = next(iter(nexts))
            loop, point = [start], start
            while True:
                targets = nexts[point]
                following = targets.pop()
                if not targets:
                    del nexts[point]
                if following == start:
                    break
                loop.append(following)
                point = following
            corners = _simplify(loop)
            if len(corners) >= 3:
                closed = np.asarray([*corners, corners[0]], dtype=np.float32)
                loops.append((int(sizes[index]), closed))
    return [loop for _, loop in loops[:max_loops]]
