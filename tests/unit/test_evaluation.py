"""The reference head CT pipeline keeps its documented FROC points on the fixed-seed phantoms."""

import json
from pathlib import Path

from benchmarks.evaluate import evaluate

DOCUMENTED = Path(__file__).resolve().parents[2] / "benchmarks" / "froc" / "froc_ct_head.json"


def test_head_ct_pipeline_meets_its_documented_froc_points(model_repository) -> None:
    documented = json.loads(DOCUMENTED.read_text())
    report = evaluate(documented["studies"], documented["seed"])
    assert report["lesions"] == documented["lesions"]
    for rate, sensitivity in documented["sensitivity"].items():
        assert report["sensitivity"][rate] >= sensitivity, f"sensitivity at {rate} FP/study regressed"
    for size, points in documented["by_size_mm"].items():
        for rate, sensitivity in points.items():
            assert report["by_size_mm"][size][rate] >= sensitivity, (
                f"{size} mm lesions at {rate} FP/study regressed"
            )
    # The phantoms must be a real test: some lesions are too small for the reference model.
    assert report["by_size_mm"]["2.5"]["2"] < 1.0
