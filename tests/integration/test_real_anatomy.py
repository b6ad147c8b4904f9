"""Plausible findings on real anatomy: every CT pipeline of the embedded configuration, served by Triton and run the
way the gateway runs it, on the real CT series of the shared data (no lesions of these kinds): no finding may lie
outside the body outline, and the false positives per study are reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clients.triton import TritonClient
from gateway.config.settings import PipelineSettings, load_settings
from gateway.orchestration.analysis import Reading, analyse
from preprocessing.anatomy import body_mask, hu_of
from preprocessing.series import LoadedSeries, load_series

pytestmark = pytest.mark.integration

REAL_CT = {
    "ct-3slice (upper abdomen, lung bases)": "ct-3slice/0*.dcm",
    "CT1_JLSN (chest)": "compressed/CT1_JLSN.dcm",
}


def _analyse(triton: str, pipeline: PipelineSettings, loaded: LoadedSeries) -> Reading:
    async def run() -> Reading:
        client = TritonClient(triton)  # the gRPC client belongs to the loop it is made in
        try:
            return await analyse(client, loaded, pipeline, modality="CT")  # the gateway's own steps
        finally:
            await client.close()

    return asyncio.run(run())


def _outside_body(loaded: LoadedSeries, findings) -> list[str]:
    outside = []
    for f in findings:
        body = body_mask(hu_of(loaded.images[f.slice_index]))
        x0, y0, x1, y1 = f.bbox
        if not body[int((y0 + y1) / 2), int((x0 + x1) / 2)]:
            outside.append(
                f"slice {f.slice_index} box {tuple(round(v) for v in f.bbox)} ({f.long_axis_mm} mm)"
            )
    return outside


def test_no_finding_outside_the_body_on_real_ct_for_any_pipeline(triton: str, real_data: Path) -> None:
    pipelines = [p for p in load_settings().pipelines if "CT" in p.route.modalities]
    assert {p.name for p in pipelines} == {"ct_head_hyperdensity", "ct_chest_nodule"}
    report = []
    for label, pattern in REAL_CT.items():
        loaded = load_series(sorted(real_data.glob(pattern)))
        for pipeline in pipelines:
            reading = _analyse(triton, pipeline, loaded)
            kept = reading.interpretation.findings
            assert _outside_body(loaded, kept) == [], f"{pipeline.name} on {label}"
            report.append(
                f"{pipeline.name} on {label}: {len(reading.implausible)} finding(s) dropped as implausible, "
                f"{len(kept)} false positive(s) kept"
            )
    print("\n" + "\n".join(report))
