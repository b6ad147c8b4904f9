"""Ensemble postprocessing shared by the reference pipelines: fuse two detectors, group 2D boxes into 3D findings.

* ``weighted_box_fusion`` merges the boxes of several detectors on one image (weighted box fusion: clusters of
  overlapping boxes become one box whose corners are the score-weighted mean, scored by the mean confidence and
  discounted when only some detectors agree).
* ``link_slices`` groups fused boxes of neighbouring slices that overlap into one 3D object (a nodule seen on
  several slices is reported once, on its largest cross-section, with its extent and voxel count).

Boxes are ``[x0, y0, x1, y1]`` in any consistent unit (the reference models use normalised coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def weighted_box_fusion(
    per_model: Sequence[Sequence[Box]],
    *,
    weights: Sequence[float] | None = None,
    iou_threshold: float = 0.4,
) -> list[Box]:
    """Fuse the boxes of ``len(per_model)`` detectors on one image; returns fused boxes, best first.

    A fused box's score is the weighted mean of its members' scores times (models that contributed / models),
    so a region only one of two detectors sees keeps half its confidence.
    """
    models = len(per_model)
    if models == 0:
        return []
    weights = list(weights) if weights is not None else [1.0] * models
    if len(weights) != models:
        raise ValueError(f"{models} detectors but {len(weights)} weights")
    entries = sorted(
        ((box, m) for m, boxes in enumerate(per_model) for box in boxes if box.score > 0),
        key=lambda e: -e[0].score * weights[e[1]],
    )
    clusters: list[list[tuple[Box, int]]] = []
    fused: list[Box] = []
    for box, m in entries:
        best, best_iou = -1, iou_threshold
        for index, candidate in enumerate(fused):
            overlap = iou(box, candidate)
            if overlap >= best_iou:
                best, best_iou = index, overlap
        if best < 0:
            clusters.append([(box, m)])
            fused.append(box)
            continue
        clusters[best].append((box, m))
        fused[best] = _fuse(clusters[best], weights, models)
    out = [_fuse(cluster, weights, models) for cluster in clusters]
    return sorted(out, key=lambda b: -b.score)


def _fuse(cluster: list[tuple[Box, int]], weights: Sequence[float], models: int) -> Box:
    w = np.array([b.score * weights[m] for b, m in cluster], dtype=np.float64)
    coords = np.array([[b.x0, b.y0, b.x1, b.y1] for b, _ in cluster], dtype=np.float64)
    x0, y0, x1, y1 = (coords * w[:, None]).sum(axis=0) / w.sum()
    contributing = {m for _, m in cluster}
    weight_total = sum(weights)
    score = float(w.sum() / sum(weights[m] for _, m in cluster))  # weighted mean member score
    score *= sum(weights[m] for m in contributing) / weight_total
    return Box(float(x0), float(y0), float(x1), float(y1), min(1.0, score))


@dataclass(frozen=True)
class Object3D:
    """Boxes of consecutive slices that belong to one object."""

    slices: tuple[int, ...]
    boxes: tuple[Box, ...]

    @property
    def score(self) -> float:
        return max(b.score for b in self.boxes)

    @property
    def key_index(self) -> int:
        """Position (in ``slices``) of the largest cross-section: where the object is reported."""
        return int(np.argmax([b.area for b in self.boxes]))


def link_slices(
    per_slice: Sequence[Sequence[Box]], *, iou_threshold: float = 0.2, max_area_ratio: float = 4.0
) -> list[Object3D]:
    """Group boxes of neighbouring slices into 3D objects.

    Two boxes on neighbouring slices continue one object when they overlap (IoU >= threshold, or one box's
    centre lies inside the other and their areas differ by at most ``max_area_ratio`` - so a thin vessel
    running into a nodule does not chain the nodule to the vessel). Links are one-to-one, best overlap first.
    An empty slice ends an object."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(node: tuple[int, int]) -> tuple[int, int]:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for k, boxes in enumerate(per_slice):
        for i in range(len(boxes)):
            parent[(k, i)] = (k, i)
    for k in range(1, len(per_slice)):
        candidates = []
        for i, a in enumerate(per_slice[k - 1]):
            for j, b in enumerate(per_slice[k]):
                overlap = iou(a, b)
                similar = max(a.area, b.area) <= max_area_ratio * max(min(a.area, b.area), 1e-12)
                nested = similar and (_centre_inside(a, b) or _centre_inside(b, a))
                if overlap >= iou_threshold or nested:
                    candidates.append((overlap, i, j))
        used_below: set[int] = set()
        used_above: set[int] = set()
        for _, i, j in sorted(candidates, reverse=True):
            if i in used_below or j in used_above:
                continue
            used_below.add(i)
            used_above.add(j)
            ra, rb = find((k - 1, i)), find((k, j))
            if ra != rb:
                parent[rb] = ra
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    objects = []
    for members in groups.values():
        members.sort()
        # One box per slice: where two boxes of one slice joined the object, keep the stronger.
        best: dict[int, Box] = {}
        for k, i in members:
            box = per_slice[k][i]
            if k not in best or box.score > best[k].score:
                best[k] = box
        slices = tuple(sorted(best))
        objects.append(Object3D(slices=slices, boxes=tuple(best[k] for k in slices)))
    return sorted(objects, key=lambda o: (-o.score, o.slices[0]))


def _centre_inside(a: Box, b: Box) -> bool:
    cx, cy = (a.x0 + a.x1) / 2.0, (a.y0 + a.y1) / 2.0
    return b.x0 <= cx <= b.x1 and b.y0 <= cy <= b.y1
