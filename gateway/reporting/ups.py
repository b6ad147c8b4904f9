"""The UPS workitem of an analysed study (IHE AI Workflow for Imaging, PS3.4 CC / PS3.3 C.30): what the worklist
manager is told when the gateway has finished a study.

The workitem names the study (its patient module, accession number and the analysed series as Input Information
Sequence), its priority (HIGH for a STAT finding, MEDIUM otherwise), and, once completed, the AI outcome in words
(Procedure Step Progress Description) and every object the gateway stored at the PACS for it (Output Information
Sequence: SR, GSPS, SEG, KO by series, with the AE title they can be retrieved from). The workitem's UID is derived
from the objects it lists, so a repeated try updates the same workitem and a re-analysis makes a new one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from clients.ups import instance_references
from gateway.results.content import SeriesReport

WORK_CODE = ("AI_ANALYSIS", "99AIG", "AI image analysis")
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")


@dataclass(frozen=True, kw_only=True)
class StoredObject:
    """One result object as stored at the PACS."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def workitem_uid(study_uid: str, outputs: Sequence[StoredObject]) -> str:
    return str(generate_uid(entropy_srcs=["ups", study_uid, *sorted(o.sop_instance_uid for o in outputs)]))


def transaction_uid(workitem: str) -> str:
    return str(generate_uid(entropy_srcs=["ups-transaction", workitem]))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _now() -> str:
    return time.strftime("%Y%m%d%H%M%S")


def outcome_in_words(reports: Sequence[SeriesReport], *, stat: bool) -> str:
    parts = []
    for report in reports:
        a = report.analysis
        found = f"{len(report.findings)} finding(s)" if report.findings else "no findings"
        parts.append(f"{a.algorithm_name} {a.algorithm_version}: {found}")
    head = "STAT - critical AI finding" if stat else "AI analysis complete"
    return f"{head}; " + "; ".join(parts) + " (preliminary, unverified)"


def build_workitem(reports: Sequence[SeriesReport], *, stat: bool, retrieve_ae: str = "") -> Dataset:
    """The N-CREATE attributes: a SCHEDULED workitem for the analysed study."""
    header = reports[0].header
    study_uid = str(header.StudyInstanceUID)
    ds = Dataset()
    for keyword in PATIENT_KEYWORDS:
        setattr(ds, keyword, header.get(keyword, "") or "")
    ds.StudyInstanceUID = study_uid
    ds.AccessionNumber = str(header.get("AccessionNumber", "") or "")
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = ds.AccessionNumber
    request.RequestedProcedureID = ""
    request.ReferencedStudySequence = []
    request.RequestedProcedureCodeSequence = []
    ds.ReferencedRequestSequence = [request]
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "HIGH" if stat else "MEDIUM"
    ds.ProcedureStepLabel = "AI analysis"
    ds.WorklistLabel = "AI results"
    ds.ScheduledProcedureStepStartDateTime = _now()
    ds.ScheduledWorkitemCodeSequence = [_code(*WORK_CODE)]
    ds.InputReadinessState = "READY"
    sources: dict[str, list[tuple[str, str]]] = {}
    for report in reports:
        for source in report.analysis.sources:
            sources.setdefault(str(source.SeriesInstanceUID), []).append(
                (str(source.SOPClassUID), str(source.SOPInstanceUID))
            )
    ds.InputInformationSequence = instance_references(study_uid, sources, retrieve_ae)
    ds.UnifiedProcedureStepPerformedProcedureSequence = []
    return ds


def build_completion(
    reports: Sequence[SeriesReport], outputs: Sequence[StoredObject], *, stat: bool, retrieve_ae: str = ""
) -> Dataset:
    """The N-SET attributes before completion: the outcome in words and the objects stored."""
    study_uid = str(reports[0].header.StudyInstanceUID)
    ds = Dataset()
    progress = Dataset()
    progress.ProcedureStepProgress = 100
    progress.ProcedureStepProgressDescription = outcome_in_words(reports, stat=stat)[:64]
    ds.ProcedureStepProgressInformationSequence = [progress]
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = [_code("AI_GATEWAY", "99AIG", "DICOM AI inference gateway")]
    performed.PerformedWorkitemCodeSequence = [_code(*WORK_CODE)]
    performed.PerformedProcedureStepStartDateTime = _now()
    performed.PerformedProcedureStepEndDateTime = _now()
    performed.CommentsOnThePerformedProcedureStep = outcome_in_words(reports, stat=stat)[:10240]
    by_series: dict[str, list[tuple[str, str]]] = {}
    for o in outputs:
        by_series.setdefault(o.series_instance_uid, []).append((o.sop_class_uid, o.sop_instance_uid))
    performed.OutputInformationSequence = instance_references(study_uid, by_series, retrieve_ae)
    ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    return ds
