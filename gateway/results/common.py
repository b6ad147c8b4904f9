"""What every result object of one analysed series shares: identity, provenance and the source headers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.core.domain import Finding

MANUFACTURER = "DICOM AI Gateway"
SOFTWARE_VERSION = "0.1.0"

# The study, series and patient context that makes a result UID unique to one study of one patient.
IDENTITY_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
)


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
    model_sha256: str = ""  # content hash of the model files (gateway/inference/registry.py); "" when unknown
    # Why the analysed study may be incomplete (its last association was aborted or had refusals); "" when not.
    incomplete_reason: str = ""
    # Set when the series was routed by an anatomy check, not a header rule: its findings are incidental.
    routing_note: str = ""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("SeriesAnalysis.sources must list the analysed instances")

    def result_uid(self, role: str) -> str:
        """A deterministic UID for one result object of this analysis.

        The same instances of the same study and patient, analysed by the same pipeline, algorithm and model
        version, always give the same UIDs, so re-running a study after a crash or a duplicate send re-delivers
        the same objects (a PACS keeps one copy) instead of silently adding duplicates. The study, series and
        patient context is part of the key: two studies or two patients whose instances carry the same SOP
        Instance UIDs (a split or merged study, a sender that reuses UIDs, a re-identified copy) never share a
        result UID, so a PACS can never replace one patient's result with another's. Only a hash of the key
        leaves this function (the patient fields are never logged).
        """
        instances = sorted(str(ds.SOPInstanceUID) for ds in self.sources)
        context = [str(self.sources[0].get(keyword, "") or "").strip() for keyword in IDENTITY_KEYWORDS]
        key = "|".join(
            [
                self.pipeline_name,
                self.algorithm_version,
                self.model_name,
                self.model_version,
                *context,
                *instances,
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return str(generate_uid(entropy_srcs=[digest, role]))

    def algorithm_parameters(self) -> list[str]:
        return [
            f"model={self.model_name}",
            f"model_version={self.model_version}",
            f"model_sha256={self.model_sha256 or 'unknown'}",
            f"report_threshold={self.report_threshold}",
            f"stat_threshold={self.stat_threshold}",
        ]
