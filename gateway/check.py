"""``gateway check PATH``: what the gateway would do with these files, without a receiver, Triton or a PACS.

What a PACS administrator runs when onboarding a new scanner: per series, which pipeline would run and why (the
routing rule that matched, or why none did), which header attributes hygiene would repair or drop, whether every
instance decodes into one consistent stack, and whether the result objects could be built from its headers.
Files the receiver would refuse (no valid UIDs, unparseable) are listed too. Nothing is sent anywhere and no
patient data is printed: series are named by UID, modality and body part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.config.settings import PipelineSettings, Settings
from gateway.core.domain import InstanceRecord
from gateway.core.errors import GatewayError
from gateway.core.logs import neutralise, silence_identifier_warnings
from gateway.ingest.assembler import assemble_study
from gateway.ingest.spool import record_from_header
from gateway.orchestration.routing import Router
from gateway.results.common import SeriesAnalysis
from gateway.results.hygiene import clean_headers
from gateway.results.sr import build_sr
from preprocessing.series import load_series


@dataclass
class SeriesCheck:
    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    instances: int
    pipelines: list[str] = field(default_factory=list)  # "name (rule)"
    skipped: str = ""  # why no pipeline runs
    repairs: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # "file: reason"
    failure: str = ""  # why the analysis would fail (a failure SR would be sent)

    @property
    def ok(self) -> bool:
        return not self.failure


@dataclass
class CheckReport:
    series: list[SeriesCheck]
    refused: list[tuple[str, str]]  # (file, reason) the receiver would refuse
    ignored: list[str] = field(default_factory=list)  # files that are not DICOM at all

    @property
    def ok(self) -> bool:
        return not self.refused and all(s.ok for s in self.series)


def _would_encode(pipeline: PipelineSettings, headers: Sequence[pydicom.Dataset]) -> str:
    """'' when a (negative) SR can be built from these headers, else the reason."""
    analysis = SeriesAnalysis(
        pipeline_name=pipeline.name,
        algorithm_name=pipeline.provenance.algorithm_name,
        algorithm_version=pipeline.provenance.algorithm_version,
        model_name=pipeline.model,
        model_version="check",
        findings=(),
        study_score=0.0,
        stat=False,
        stat_threshold=pipeline.output.stat_threshold,
        report_threshold=pipeline.output.report_threshold,
        display_window=pipeline.output.display_window,
        sources=tuple(headers),
    )
    try:
        build_sr(analysis, findings=[])
    except Exception as exc:
        return f"results cannot be encoded: {type(exc).__name__}: {exc}"[:300]
    return ""


def check_files(
    files: Sequence[Path], settings: Settings, *, on_progress: Callable[[int], object] | None = None
) -> CheckReport:
    silence_identifier_warnings()
    records: list[InstanceRecord] = []
    refused: list[tuple[str, str]] = []
    ignored: list[str] = []
    for path in files:
        try:
            header = pydicom.dcmread(path, defer_size=1024)  # pixel data stays on disk, its presence is seen
            records.append(record_from_header(header, path, "CHECK", time.time()))
        except InvalidDicomError:
            ignored.append(path.name)
        except GatewayError as exc:
            refused.append((path.name, str(exc)))
        except Exception as exc:
            refused.append((path.name, f"not a readable DICOM file: {type(exc).__name__}"))
        if on_progress is not None:
            on_progress(1)
    by_study: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_study.setdefault(record.study_instance_uid, []).append(record)
    router = Router(settings.pipelines)
    checks: list[SeriesCheck] = []
    for study_records in by_study.values():
        study = assemble_study(study_records, calling_ae="CHECK", first_received_at=0.0, last_received_at=0.0)
        decision = router.route(study)
        reasons = {s.series_instance_uid: s.reason for s in decision.skipped}
        for series in study.series:
            check = SeriesCheck(
                study_uid=study.study_instance_uid,
                series_uid=series.series_instance_uid,
                modality=series.modality,
                body_part=series.body_part,
                instances=len(series.instances),
            )
            jobs = [
                job for job in decision.jobs if job.series.series_instance_uid == series.series_instance_uid
            ]
            check.pipelines = [f"{job.pipeline.name} ({job.rule})" for job in jobs]
            if not jobs:
                check.skipped = reasons.get(series.series_instance_uid, "no pipeline applies")
            else:
                try:
                    loaded = load_series([r.path for r in series.instances if r.has_pixel_data])
                except GatewayError as exc:
                    check.failure = str(exc)
                else:
                    check.undecodable = [f"{name}: {reason}" for name, reason in loaded.skipped]
                    headers, repairs = clean_headers(loaded.headers)
                    check.repairs = repairs.as_list()
                    check.failure = _would_encode(jobs[0].pipeline, headers)
            checks.append(check)
    return CheckReport(series=checks, refused=refused, ignored=ignored)


def render(report: CheckReport) -> str:
    lines = []
    for s in report.series:
        status = "FAIL" if not s.ok else "analyse" if s.pipelines else "skip"
        lines.append(
            f"[{status}] series {s.series_uid} ({s.modality or '?'}, body part {neutralise(s.body_part) or '?'}, "
            f"{s.instances} instance(s)) of study {s.study_uid}"
        )
        for pipeline in s.pipelines:
            lines.append(f"    pipeline: {pipeline}")
        if s.skipped:
            lines.append(f"    not analysed: {neutralise(s.skipped)}")
        for repair in s.repairs:
            lines.append(f"    header: {repair}")
        for item in s.undecodable:
            lines.append(f"    skipped instance: {neutralise(item)}")
        if s.failure:
            lines.append(f"    would fail (a failure SR is sent): {neutralise(s.failure)}")
    for name, reason in report.refused:
        lines.append(f"[REFUSED] {name}: {neutralise(reason)}")
    analysed = sum(1 for s in report.series if s.pipelines and s.ok)
    failing = sum(1 for s in report.series if not s.ok)
    skipped = sum(1 for s in report.series if not s.pipelines)
    repaired = sum(1 for s in report.series if s.repairs)
    lines.append(
        f"{len(report.series)} series: {analysed} would be analysed, {failing} would fail, {skipped} skipped; "
        f"{repaired} with header repairs; {len(report.refused)} file(s) the receiver would refuse"
        + (f"; {len(report.ignored)} non-DICOM file(s) ignored" if report.ignored else "")
    )
    return "\n".join(lines)
