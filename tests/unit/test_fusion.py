"""Ensemble postprocessing: weighted box fusion of two detectors, and 2D boxes linked into 3D objects."""

import numpy as np
import pytest
from ensemble_steps.fusion import Box, iou, link_slices, weighted_box_fusion

from preprocessing.normalize import percentile_normalize


def test_overlapping_boxes_of_two_detectors_fuse_into_one_weighted_box() -> None:
    a = Box(0.10, 0.10, 0.20, 0.20, 0.9)
    b = Box(0.12, 0.12, 0.22, 0.22, 0.3)
    [fused] = weighted_box_fusion([[a], [b]])
    # Corners are the score-weighted mean; the score is the mean score (both detectors agree).
    assert fused.x0 == pytest.approx((0.10 * 0.9 + 0.12 * 0.3) / 1.2)
    assert fused.y1 == pytest.approx((0.20 * 0.9 + 0.22 * 0.3) / 1.2)
    assert fused.score == pytest.approx(0.6)


def test_a_box_only_one_detector_sees_keeps_half_its_confidence() -> None:
    lone = Box(0.5, 0.5, 0.6, 0.6, 0.8)
    other = Box(0.1, 0.1, 0.2, 0.2, 0.4)
    fused = weighted_box_fusion([[lone], [other]])
    assert [round(b.score, 3) for b in fused] == [0.4, 0.2]
    assert iou(fused[0], lone) == pytest.approx(1.0)


def test_weights_must_match_the_detectors() -> None:
    with pytest.raises(ValueError):
        weighted_box_fusion([[], []], weights=[1.0])


def test_a_nodule_across_slices_is_one_object_reported_on_its_largest_cross_section() -> None:
    sphere = [  # cross-sections of a sphere: a cap, the middle, the other cap
        [Box(0.40, 0.40, 0.44, 0.44, 0.5)],
        [Box(0.38, 0.38, 0.46, 0.46, 0.7)],
        [Box(0.395, 0.395, 0.445, 0.445, 0.4)],
    ]
    [obj] = link_slices(sphere)
    assert obj.slices == (0, 1, 2)
    assert obj.key_index == 1 and obj.score == pytest.approx(0.7)


def test_a_thin_vessel_touching_a_nodule_is_not_chained_to_it_and_a_gap_ends_an_object() -> None:
    nodule = Box(0.30, 0.30, 0.40, 0.40, 0.8)
    vessel = Box(0.34, 0.34, 0.36, 0.36, 0.4)  # centre inside the nodule's box, 25 times smaller
    per_slice = [[vessel], [vessel], [nodule], [nodule], [], [nodule]]
    objects = link_slices(per_slice)
    assert sorted(o.slices for o in objects) == [(0, 1), (2, 3), (5,)]


def test_percentile_normalisation_maps_each_image_to_its_own_range() -> None:
    rng = np.random.default_rng(0)
    low = rng.uniform(100, 200, (1, 32, 32)).astype(np.float32)
    high = (low * 10 + 5000).astype(np.float32)  # another detector / exposure: same image, other units
    a = percentile_normalize(np, low)
    b = percentile_normalize(np, high)
    assert a.min() == 0.0 and a.max() == 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)
