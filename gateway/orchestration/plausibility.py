"""Plausibility: a finding must lie in the anatomy its pipeline looks at and have a size that anatomy allows.

Opened in a real viewer, a detector's findings on real anatomy it was not made for can be boxes over the CT
table, hundreds of millimetres long. Every pipeline declares ``finding_anatomy`` ("body", "lung" or
"intracranial"; CT only, ``preprocessing/anatomy.py`` computes the region per slice) and ``finding_size_mm``
(the plausible range of a finding's long axis). A finding whose box centre lies outside the region, or whose long
axis lies outside the range, is dropped with a logged reason and counted
(``gateway_findings_implausible_total{pipeline,reason}``), before the STAT decision and before any result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway.config.settings import PipelineSettings
from gateway.core.domain import Finding
from preprocessing.anatomy import REGIONS, hu_of
from preprocessing.decode import DecodedImage


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plausible:
    findings: tuple[Finding, ...]
    dropped: tuple[tuple[str, str], ...]  # (reason kind: "anatomy" | "size", description)


def check_findings(
    findings: Sequence[Finding], images: Sequence[DecodedImage], pipeline: PipelineSettings, *, modality: str
) -> Plausible:
    kept: list[Finding] = []
    dropped: list[tuple[str, str]] = []
    regions: dict[int, object] = {}
    low, high = pipeline.output.finding_size_mm or (0.0, float("inf"))
    for finding in findings:
        if finding.long_axis_mm is not None and not low <= finding.long_axis_mm <= high:
            dropped.append(
                ("size", f"long axis {finding.long_axis_mm:.1f} mm outside the plausible {low:g}-{high:g} mm")
            )
            continue
        region_fn = REGIONS.get(pipeline.output.finding_anatomy)
        if region_fn is not None and finding.bbox is not None and modality == "CT":
            if finding.slice_index not in regions:
                regions[finding.slice_index] = region_fn(hu_of(images[finding.slice_index]))
            region = regions[finding.slice_index]
            x0, y0, x1, y1 = finding.bbox
            row = min(int((y0 + y1) / 2.0), region.shape[0] - 1)  # type: ignore[attr-defined]
            col = min(int((x0 + x1) / 2.0), region.shape[1] - 1)  # type: ignore[attr-defined]
            if not region[row, col]:  # type: ignore[index]
                dropped.append(
                    ("anatomy", f"centre ({col}, {row}) outside the {pipeline.output.finding_anatomy}")
                )
                continue
        kept.append(finding)
    return Plausible(findings=tuple(kept), dropped=tuple(dropped))
