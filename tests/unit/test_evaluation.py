"""Each reference pipeline keeps its documented FROC points on the fixed-seed phantoms (a regression fails)."""

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.evaluate import EVALUATIONS, evaluate

FROC = Path(__file__).resolve().parents[2] / "benchmarks" / "froc"


def documented(pipeline: str) -> dict[str, Any]:
    return json.loads((FROC / f"froc_{pipeline}.json").read_text())


@pytest.fixture(scope="module", params=sorted(EVALUATIONS))
def measured(request: pytest.FixtureRequest, model_repository: Path) -> tuple[str, dict[str, Any]]:
    doc = documented(request.param)
    return request.param, evaluate(request.param, doc["studies"], doc["seed"])


def test_pipeline_meets_its_documented_froc_points(measured: tuple[str, dict[str, Any]]) -> None:
    pipeline, report = measured
    doc = documented(pipeline)
    assert report["lesions"] == doc["lesions"]
    for rate, sensitivity in doc["sensitivity"].items():
        assert report["sensitivity"][rate] >= sensitivity, f"sensitivity at {rate} FP/study regressed"
    for size, points in doc["by_size_mm"].items():
        for rate, sensitivity in points.items():
            assert report["by_size_mm"][size][rate] >= sensitivity, (
                f"{size} mm lesions at {rate} FP/study regressed"
            )
    # A real test: not every lesion is found, but most are.
    assert 0.7 <= report["sensitivity"]["2"] < 1.0
    # Pipelines that measure what they find (the chest CT nodules: diameter and volume) measure it well.
    assert ("measurement_error" in report) == (pipeline == "ct_chest")
    for size, e in report.get("measurement_error", {}).items():
        assert e["volume_median_abs_relative"] <= 0.15, f"{size} mm nodules: volume error {e}"
        assert e["diameter_mm_median_abs"] <= max(2.5, 0.25 * float(size)), f"{size} mm: diameter error {e}"
