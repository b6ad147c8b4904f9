"""The benchmark report's arithmetic: metrics parsing, stage means by priority, and each target's verdict."""

from __future__ import annotations

from benchmarks import report

METRICS = """
# HELP gateway_stage_seconds Time per pipeline stage, by the study's priority class
gateway_stage_seconds_count{stage="encode",priority="STAT"} 4.0
gateway_stage_seconds_sum{stage="encode",priority="STAT"} 2.0
gateway_stage_seconds_count{stage="encode",priority="ROUTINE"} 10.0
gateway_stage_seconds_sum{stage="encode",priority="ROUTINE"} 7.5
gateway_stage_seconds_count{stage="queue",priority="STAT"} 0.0
gateway_stage_seconds_sum{stage="queue",priority="STAT"} 0.0
gateway_triton_request_slices_count{model="cxr_opacity"} 5.0
gateway_triton_request_slices_sum{model="cxr_opacity"} 20.0
gateway_triton_request_studies_count{model="cxr_opacity"} 5.0
gateway_triton_request_studies_sum{model="cxr_opacity"} 20.0
"""


def test_stage_means_by_priority_and_triton_batch_figures() -> None:
    assert report._stage_means(METRICS) == {"STAT": {"encode": 0.5}, "ROUTINE": {"encode": 0.75}}
    assert report._triton_metrics(METRICS) == {
        "cxr_opacity": {"slices_count": 5.0, "slices_sum": 20.0, "studies_count": 5.0, "studies_sum": 20.0}
    }


def _run(stat_ms: list[float], per_min: float) -> dict:
    return {"latency_ms": {"STAT": stat_ms}, "studies_per_min": per_min, "stages": {}}


def test_targets_are_judged_against_the_issue_thresholds() -> None:
    measured = {
        "ingest": {
            "gateway_vs_storescp": 0.15,
            "results": [{"receiver": "gateway (durable spool)", "images_per_s_median": 120.0}],
        },
        "transport": {
            "results": [
                {"path": "in-process onnxruntime", "ratio": 1.0},
                {"path": "Triton, shared memory", "ratio": 1.2},
                {"path": "Triton, grpc", "ratio": 1.9},
            ]
        },
        "stat": {"idle": _run([1000.0] * 10, 10.0), "saturated": _run([1400.0] * 10, 40.0)},
        "infer": {"studies_per_min": 100.0},
    }
    rows, derived = report._targets(measured)
    text = "\n".join(rows)
    assert "| ingest >= 0.8x storescp images/s | 0.15x | **MISSED** |" in text
    assert "1.2x (Triton, shared memory) | met" in text  # the best Triton path counts
    assert derived["stat_ratio"] == 1.4 and "= 1.4x | met" in text
    # slowest standalone stage: 100 studies/min (Triton, vs 120 / 24 * 60 = 300 for receive); 40 / 100 = 0.4x
    assert derived["slowest"] == ("Triton ensemble", 100.0) and derived["efficiency"] == 0.4
    assert "0.4x | **MISSED** |" in text
