"""Detection quality as the gateway serves it: the fixed-seed phantoms and the real negatives go through the
gateway's own preparation, the model repository's ensembles on a real Triton, and each pipeline's configured
report threshold and plausibility rules (``benchmarks/evaluate.py``). The floors are absolute numbers pinned
here, a little under what was measured (``benchmarks/froc/*.md``), never read back from a regenerated file: a
change to a model, an ensemble step, the preprocessing, a threshold or the matching that loses lesions or adds
false positives fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.evaluate import ServedPath, evaluate, real_negatives

pytestmark = pytest.mark.integration

# pipeline -> (operating point: min sensitivity, max false positives per study; min sensitivity at 1 FP/study;
#              {size bin: min sensitivity at 1 FP/study})
FLOORS: dict[str, tuple[float, float, float, dict[str, float]]] = {
    # measured: 0.75 at 0.0 FP/study; every lesion of radius >= 4 mm found, none of 2.5 mm
    "ct_head": (0.70, 0.2, 0.70, {"4": 0.95, "6": 0.95, "9": 0.95}),
    # measured: 0.75 at 0.5 FP/study, 0.833 at 1 FP/study; every 6 and 16 mm nodule found
    "ct_chest": (0.70, 0.75, 0.80, {"6": 0.95, "16": 0.95}),
    # measured: 0.594 at 0.267 FP/study (threshold 0.3), 0.719 at 1 FP/study
    "cxr": (0.55, 0.5, 0.68, {"8": 0.6, "15": 0.65, "25": 0.6}),
}


@pytest.fixture(scope="module")
def served(triton: str) -> Iterator[ServedPath]:
    with ServedPath(triton) as path:
        yield path


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_each_pipeline_keeps_its_detection_floors_on_the_served_path(served: ServedPath, name: str) -> None:
    report = evaluate(name, served)
    op_sensitivity, op_false_positives, at_one, by_size = FLOORS[name]
    op = report["operating_point"]
    print(
        f"\n{name}: operating point {op}, sensitivity {report['sensitivity']}, by size {report['by_size_mm']}"
    )
    assert op["threshold"] == served.pipeline(report["served_pipeline"]).output.report_threshold
    assert op["sensitivity"] >= op_sensitivity, f"{name}: operating-point sensitivity {op}"
    assert op["false_positives_per_study"] <= op_false_positives, f"{name}: false positives {op}"
    assert report["sensitivity"]["1"] >= at_one, f"{name}: sensitivity at 1 FP/study {report['sensitivity']}"
    for size, floor in by_size.items():
        assert report["by_size_mm"][size]["1"] >= floor, f"{name}: {size} mm at 1 FP/study"
    # Pipelines that measure what they find (the chest CT nodules: diameter and volume) measure it well.
    assert ("measurement_error" in report) == (name == "ct_chest")
    for size, e in report.get("measurement_error", {}).items():
        assert e["volume_median_abs_relative"] <= 0.15, f"{size} mm nodules: volume error {e}"
        assert e["diameter_mm_median_abs"] <= max(2.5, 0.25 * float(size)), f"{size} mm: diameter error {e}"


def test_real_images_without_lesions_give_few_false_positives_and_no_false_stat(
    served: ServedPath, real_data: Path
) -> None:
    report: dict[str, Any] = real_negatives(served, real_data)
    shared = [row for row in report["series"] if "missing" not in row]
    assert len(shared) >= 5, f"the shared real series were not all found: {report['series']}"
    measured = {
        name: both for name, both in report["per_pipeline"].items() if both["any_body_part"]["series"]
    }
    assert {"ct_head_hyperdensity", "ct_chest_nodule"} <= set(measured), "every CT pipeline saw real CT"
    for name, both in measured.items():
        print(f"\n{name}: routed {both['routed']}, any body part {both['any_body_part']}")
        routed = both["routed"]
        # What a site sees: series the router sends to the pipeline never raise a STAT and rarely a finding.
        assert routed["stat_false_alarms"] == 0, f"{name}: false STAT on a real negative the router sends it"
        if routed["series"]:
            assert routed["false_positives_per_series"] <= 1.0, f"{name}: {routed}"
    # The chest nodule pipeline on real CT (upper abdomen with lung bases, a chest slice), whatever routing says.
    chest = measured["ct_chest_nodule"]["any_body_part"]
    assert chest["stat_false_alarms"] == 0 and chest["false_positives_per_series"] <= 1.0, chest
