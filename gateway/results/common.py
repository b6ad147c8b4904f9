"""What every result object of one analysed series shares: identity, provenance and the source headers."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from gateway.domain import Finding

MANUFACTURER = "DICOM AI Gateway"
SOFTWARE_VERSION = "0.1.0"


@dataclass(frozen=True, kw_only=True)
class SeriesAnalysis:
    """The interpreted answer of one pipeline for one series, ready to be encoded."""

    pipeline_name: str
    algorithm_name: str
    algorithm_version: str
    model_name: str
    model_version: str
    findings: tuple[Finding, ...]
    study_score: float
    stat: bool
    stat_threshold: float
    report_threshold: float
    display_window: tuple[float, float]
    sources: tuple[Dataset, ...]  # headers (no pixel data) of the analysed instances, in slice order

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("SeriesAnalysis.sources must list the analysed instances")

    def algorithm_parameters(self) -> list[str]:
        return [
            f"model={self.model_name}",
            f"model_version={self.model_version}",
            f"report_threshold={self.report_threshold}",
            f"stat_threshold={self.stat_threshold}",
        ]
