"""The FROC arithmetic and the lesion matching of the detection-quality evaluation, on hand-built cases whose
answers are worked out by hand (what the served evaluation's floors rest on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.evaluate import CaseResult, Detection, MatchRule, Target, detections_of, froc, match
from gateway.core.domain import CodedConcept, Finding
from gateway.demo.phantoms import write_head_ct
from preprocessing.series import load_series

RADIOGRAPH = MatchRule(xy_margin_mm=5.0, z_margin_mm=0.0, duplicates_are_false_positives=True)
PER_SLICE = MatchRule(xy_margin_mm=3.0, z_margin_mm=0.0, duplicates_are_false_positives=False)


def _target(x: float = 0.0, y: float = 0.0, z: float = 0.0, radius: float = 5.0) -> Target:
    return Target(x_mm=x, y_mm=y, z_mm=z, radius_mm=radius, size=2 * radius)


def _at(score: float, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Detection:
    return Detection(score=score, x_mm=x, y_mm=y, z_mm=z)


def test_a_finding_hits_within_radius_plus_margin_and_misses_beyond() -> None:
    lesion = _target(radius=5.0)  # reach: 5 + 5 = 10 mm
    assert match([_at(0.9, x=9.9)], [lesion], RADIOGRAPH).detections == [(0.9, 0)]
    assert match([_at(0.9, x=6.0, y=8.0)], [lesion], RADIOGRAPH).detections == [(0.9, 0)]  # exactly 10 mm
    assert match([_at(0.9, x=7.1, y=7.1)], [lesion], RADIOGRAPH).detections == [(0.9, -1)]  # 10.04 mm


def test_the_slice_must_lie_strictly_within_the_lesion() -> None:
    lesion = _target(z=20.0, radius=6.0)
    assert match([_at(0.8, z=25.0)], [lesion], PER_SLICE).detections == [(0.8, 0)]
    assert match([_at(0.8, z=26.0)], [lesion], PER_SLICE).detections == [(0.8, -1)]  # |dz| == radius
    with_margin = MatchRule(xy_margin_mm=3.0, z_margin_mm=2.5, duplicates_are_false_positives=True)
    assert match([_at(0.8, z=28.0)], [lesion], with_margin).detections == [(0.8, 0)]


def test_a_duplicate_is_a_false_positive_and_the_best_finding_is_the_hit() -> None:
    lesion = _target()
    result = match([_at(0.4, x=1.0), _at(0.9, x=-1.0)], [lesion], RADIOGRAPH)
    assert result.detections == [(0.9, 0), (0.4, -1)]  # listed second, scored higher: it finds the lesion
    per_slice = match([_at(0.4, x=1.0), _at(0.9, x=-1.0)], [lesion], PER_SLICE)
    assert per_slice.detections == [
        (0.9, 0),
        (0.4, 0),
    ]  # several slices of one lesion: found once, no penalty


def test_a_finding_between_two_lesions_finds_the_first_within_reach() -> None:
    result = match([_at(0.7, x=4.0)], [_target(x=0.0), _target(x=8.0)], RADIOGRAPH)
    assert result.detections == [(0.7, 0)]
    assert froc([result], sizes=(10.0,))["operating_point"]["sensitivity"] == 0.5


def test_measurements_are_kept_for_the_finding_that_found_the_lesion_only() -> None:
    lesion = Target(x_mm=0, y_mm=0, radius_mm=5, size=10, volume_mm3=520.0, diameter_mm=10.0)
    best = Detection(score=0.9, x_mm=0, y_mm=0, long_axis_mm=11.0, volume_mm3=500.0)
    worse = Detection(score=0.5, x_mm=1, y_mm=0, long_axis_mm=30.0, volume_mm3=900.0)
    result = match([worse, best], [lesion], RADIOGRAPH)
    assert result.measured == [(0, 11.0, 500.0)]
    error = froc([result], sizes=(10.0,))["measurement_error"]["10"]
    assert error == {
        "diameter_mm_median_abs": 1.0,
        "volume_median_abs_relative": round(20 / 520, 3),
        "found": 1,
    }


def test_froc_counts_false_positives_per_study_and_sensitivity_at_each_rate() -> None:
    small, large = (
        Target(x_mm=0, y_mm=0, radius_mm=2, size=4.0),
        Target(x_mm=50, y_mm=0, radius_mm=8, size=16.0),
    )
    studies = [
        CaseResult(truths=[small, large], detections=[(0.9, 1), (0.6, -1), (0.3, 0)]),
        CaseResult(truths=[], detections=[(0.8, -1), (0.2, -1)]),
        CaseResult(truths=[large], detections=[(0.7, 0), (0.5, -1)]),
        CaseResult(truths=[], detections=[]),
    ]
    report = froc(studies, sizes=(4.0, 16.0), operating_threshold=0.5)
    assert report["studies"] == 4 and report["lesions"] == 3
    # Thresholds 0.9 / 0.8 / 0.7 / 0.6 / 0.5 / 0.3 / 0.2 give (FPs, lesions found) 0/1, 1/1, 1/2, 2/2, 3/2, 3/3,
    # 4/3: at most 0.5 FP/study (2 FPs) 2 of 3 lesions, at 1 FP/study (4 FPs) all 3.
    assert report["sensitivity"] == {"0.5": 0.667, "1": 1.0, "2": 1.0}
    assert report["by_size_mm"]["4"] == {"0.5": 0.0, "1": 1.0, "2": 1.0}
    assert report["by_size_mm"]["16"] == {"0.5": 1.0, "1": 1.0, "2": 1.0}
    assert report["lesions_by_size_mm"] == {"4": 1, "16": 2}
    assert report["operating_point"] == {
        "threshold": 0.5,
        "sensitivity": 0.667,
        "false_positives_per_study": 0.75,
    }
    assert report["curve"][0] == (0.0, 0.0) and report["curve"][-1] == (1.0, 1.0)


def test_froc_of_a_detector_that_only_makes_false_positives_has_zero_sensitivity() -> None:
    lesion = _target()
    studies = [CaseResult(truths=[lesion], detections=[(0.9, -1), (0.8, -1)]) for _ in range(2)]
    report = froc(studies, sizes=(10.0,))
    assert report["sensitivity"] == {"0.5": 0.0, "1": 0.0, "2": 0.0}
    assert report["operating_point"]["false_positives_per_study"] == 2.0


def test_findings_are_placed_in_mm_from_the_image_centre_and_the_first_slice(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path, slices=4, rows=128, cols=128, seed=3)
    loaded = load_series(series.paths)
    label = CodedConcept(value="1", scheme="99TEST", meaning="finding")
    finding = Finding(
        label=label,
        confidence=0.6,
        sop_instance_uid=loaded.images[2].sop_instance_uid,
        sop_class_uid=loaded.images[2].sop_class_uid,
        bbox=(70.0, 40.0, 80.0, 50.0),  # centre (75, 45): 11 columns right of and 19 rows above the centre
        slice_index=2,
    )
    [d] = detections_of([finding], loaded, pixel_mm=0.5, slice_mm=5.0)
    assert (d.x_mm, d.y_mm, d.z_mm, d.score) == pytest.approx((5.5, -9.5, 10.0, 0.6))
