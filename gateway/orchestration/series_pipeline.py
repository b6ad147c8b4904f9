"""The series pipeline: one routed series from its spooled files to published results.

    anatomy check? -> decode -> prepare -> infer -> read (interpret + plausibility) -> STAT notify
        -> encode (SR / GSPS / SEG / KO, each on its own) -> store -> deliver (outbox) -> report

:meth:`SeriesPipeline.run` returns a typed :class:`SeriesOutcome`; the worker pool decides what happens next
(retry, defer, fail). A series that cannot be analysed gets a failure SR (:mod:`gateway.orchestration.failures`).
Blocking steps run in the executor and are timed per stage; the STAT decision is the analysis's, notified before
any result object is built, so no encoding or storage failure can hold it back.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from clients.triton import DetectionOutput, ScoresOutput
from gateway.config.settings import Peer, Settings
from gateway.core.codes import AI_CONFIDENCE
from gateway.core.domain import Priority, RolloutMode, timing_log_fields
from gateway.delivery.outbox import Outbox
from gateway.delivery.store import ResultStore
from gateway.ingest.spool import Spool
from gateway.ops.events import EventSink
from gateway.ops.metrics import Metrics
from gateway.orchestration.analysis import (
    Inferrer,
    ModelInput,
    Reading,
    prepare_input,
    read_output,
    run_model,
)
from gateway.orchestration.notifications import BackgroundNotifications
from gateway.orchestration.routing import InferenceJob
from gateway.orchestration.tracker import StudyProgress, StudyTracker
from gateway.reporting.critical_alerts import CriticalAlerts, CriticalFinding
from gateway.reporting.notify import StatEvent, StatNotifier
from gateway.results.common import SeriesAnalysis
from gateway.results.content import ReportedFinding, SeriesReport, reported_findings
from gateway.results.encode import EncodedResults, ResultEncoder
from gateway.results.hygiene import HeaderRepairs, clean_headers
from preprocessing.anatomy import ANATOMY_CHECKS
from preprocessing.backend import ArrayBackend
from preprocessing.codec import NvImageDecoder
from preprocessing.dali_pipeline import DaliPreprocessor
from preprocessing.series import LoadedSeries, load_series

logger = logging.getLogger(__name__)
T = TypeVar("T")


class OutcomeKind(enum.Enum):
    ANALYSED = "analysed"
    SKIPPED = "skipped"  # an anatomy-check job whose anatomy is not in the field of view
    FAILED = "failed"  # could not be analysed: a failure SR says so


@dataclass(frozen=True, kw_only=True)
class SeriesOutcome:
    kind: OutcomeKind
    results: tuple[str, ...] = ()  # SOP Instance UIDs of the result objects stored
    findings: int = 0
    stat: bool = False
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class PipelineParts:
    """What the series pipeline hands its work to (built once by the application)."""

    settings: Settings
    executor: Executor
    decoder: NvImageDecoder | None
    backend: ArrayBackend
    dali: DaliPreprocessor | None
    encoder: ResultEncoder
    results: ResultStore
    spool: Spool
    outbox: Outbox
    notifier: StatNotifier
    failure_alerts: StatNotifier
    notifications: BackgroundNotifications
    tracker: StudyTracker
    events: EventSink
    metrics: Metrics
    model_hashes: Mapping[str, str]
    critical: CriticalAlerts | None = None  # critical results with acknowledgement ([critical_results])


@dataclass
class _Run:
    """One series on its way through the pipeline."""

    job: InferenceJob
    timings: dict[str, float]
    routing_note: str = ""
    loaded: LoadedSeries | None = None
    prepared: ModelInput | None = None
    output: DetectionOutput | ScoresOutput | None = None
    reading: Reading | None = None
    stat: bool = False
    analysis: SeriesAnalysis | None = None
    repairs: HeaderRepairs | None = None
    reported: list[ReportedFinding] = field(default_factory=list)
    previous: list[Any] = field(default_factory=list)
    withdrawn: list[Any] = field(default_factory=list)
    encoded: EncodedResults | None = None
    destination: Peer | None = None

    @property
    def key(self) -> str:
        return f"{self.job.series.series_instance_uid}/{self.job.pipeline.name}"


def superseded(
    spool: Spool, results: ResultStore, study_uid: str, result_key: str, analysis: SeriesAnalysis
) -> tuple[list[Any], list[Any]]:
    """What an analysis replaces: the earlier SR (a predecessor document of the new one) and the headers of
    every earlier result object the new analysis does not re-issue (withdrawn by an IOCM rejection note)."""
    previous_uid = spool.previous_result(study_uid, result_key)
    if not previous_uid or previous_uid == analysis.result_uid("sr"):
        return [], []  # first analysis, or the same analysis again (a re-send): nothing is replaced
    old = results.load(study_uid, previous_uid)
    previous = [old] if old is not None else []
    reissued = {analysis.result_uid(role) for role in ("sr", "gsps", "seg")}
    withdrawn = []
    for uid in spool.previous_objects(study_uid, result_key):
        if uid not in reissued:
            header = results.load(study_uid, uid, header_only=True)
            if header is not None:
                withdrawn.append(header)
    return previous, withdrawn


class SeriesPipeline:
    def __init__(
        self,
        parts: PipelineParts,
        *,
        shared_batcher: Inferrer | None = None,
        raise_to_stat: Callable[[str], int] | None = None,
    ) -> None:
        """``shared_batcher``: the cross-study batcher for batchable pipelines; ``raise_to_stat(study_uid)``
        raises the study's waiting series to STAT (the job queue's), returning how many."""
        self.parts = parts
        self.batcher = shared_batcher
        self.raise_to_stat = raise_to_stat

    async def timed(self, timings: dict[str, float], stage: str, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.parts.executor, fn, *args)
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started

    async def run(self, job: InferenceJob, client: Inferrer) -> SeriesOutcome:
        run = _Run(job=job, timings={"queue": time.time() - job.created_at})
        if job.anatomy_check and not await self._anatomy_present(run):
            return SeriesOutcome(kind=OutcomeKind.SKIPPED, reason=f"no {job.pipeline.route.anatomy} in view")
        await self._analyse(run, client)
        self._interpret(run)
        progress = self.parts.tracker.get(job.study.study_instance_uid)
        if progress is not None:
            progress.stat = progress.stat or run.stat
            progress.repairs |= run.repairs.actions if run.repairs is not None else set()
        if run.stat and (progress is None or run.key not in progress.notified):
            await self._notify_stat(run)
            if progress is not None:
                progress.notified.add(run.key)
        await self._encode(run)
        paths = await self.timed(
            run.timings, "store", self.parts.results.save, job.study.study_instance_uid, self._datasets(run)
        )
        if run.stat and self.parts.critical is not None:
            self._raise_critical(run)
        await self._deliver(run, paths)
        self._report(run, progress)
        assert run.reading is not None
        return SeriesOutcome(
            kind=OutcomeKind.ANALYSED,
            results=tuple(str(ds.SOPInstanceUID) for ds in self._datasets(run)),
            findings=len(run.reading.interpretation.findings),
            stat=run.stat,
        )

    async def _anatomy_present(self, run: _Run) -> bool:
        """Content-aware routing: analyse only when the anatomy is in the field of view (else skipped)."""
        job, pipeline = run.job, run.job.pipeline
        paths = [r.path for r in job.series.instances if r.has_pixel_data]
        evidence = await self.timed(
            run.timings,
            "anatomy",
            lambda: ANATOMY_CHECKS[pipeline.route.anatomy](
                paths, min_fraction=pipeline.route.anatomy_min_fraction
            ),
        )
        if not evidence.present:
            self.parts.events.series_skipped(
                study=job.study.study_instance_uid,
                series=job.series.series_instance_uid,
                reason=f"{pipeline.name}: no {pipeline.route.anatomy} in the field of view ({evidence.describe()})",
                pipeline=pipeline.name,
                rule=job.rule,
            )
            progress = self.parts.tracker.get(job.study.study_instance_uid)
            if progress is not None:
                progress.skipped += 1
            return False
        run.routing_note = f"Routed by anatomy check: {evidence.describe()}; findings are incidental"
        return True

    async def _analyse(self, run: _Run, client: Inferrer) -> None:
        """Decode, prepare, infer, read: the model's answer as plausible findings on the source images."""
        job, pipeline, parts = run.job, run.job.pipeline, self.parts
        paths = [r.path for r in job.series.instances if r.has_pixel_data]
        loaded = run.loaded = await self.timed(run.timings, "decode", load_series, paths, parts.decoder)
        for name, reason in loaded.skipped:
            logger.info("series %s: instance %s skipped: %s", job.series.series_instance_uid, name, reason)
        prepared = run.prepared = await self.timed(
            run.timings,
            "preprocess",
            lambda: prepare_input(loaded, pipeline, backend=parts.backend, dali=parts.dali),
        )
        started = time.perf_counter()
        inferrer = self.batcher if self.batcher is not None and pipeline.batchable else client
        run.output = await run_model(inferrer, pipeline, prepared, priority=job.priority)
        run.timings["infer"] = time.perf_counter() - started
        run.reading = read_output(run.output, loaded, pipeline, prepared, modality=job.series.modality)
        for kind, text in run.reading.implausible:
            parts.metrics.findings_implausible.labels(pipeline.name, kind).inc()
            logger.warning(
                "series %s, pipeline %s: implausible finding dropped: %s",
                job.series.series_instance_uid,
                pipeline.name,
                text,
            )

    def _interpret(self, run: _Run) -> None:
        """The STAT decision (raising the rest of the study) and the analysis the results are built from."""
        job, pipeline = run.job, run.job.pipeline
        assert run.reading is not None and run.loaded is not None and run.output is not None
        found = run.reading.interpretation
        run.stat = found.stat and pipeline.mode_for(job.study.calling_ae) is RolloutMode.TRIAGE
        if run.stat and self.raise_to_stat is not None:
            raised = self.raise_to_stat(job.study.study_instance_uid)
            if raised:
                logger.info(
                    "study %s has a STAT finding: %d waiting series raised to STAT",
                    job.study.study_instance_uid,
                    raised,
                )
        sources, run.repairs = clean_headers(run.loaded.headers)  # every copied attribute passes its VR
        run.analysis = SeriesAnalysis(
            pipeline_name=pipeline.name,
            algorithm_name=pipeline.provenance.algorithm_name,
            algorithm_version=pipeline.provenance.algorithm_version,
            model_name=run.output.model_name,
            model_version=run.output.model_version,
            findings=found.findings,
            study_score=found.study_score,
            stat=run.stat,
            stat_threshold=pipeline.output.stat_threshold,
            report_threshold=pipeline.output.report_threshold,
            display_window=pipeline.output.display_window,
            sources=sources,
            model_sha256=self.parts.model_hashes.get(pipeline.model, ""),
            incomplete_reason=job.study.incomplete_reason,
            routing_note=run.routing_note,
        )
        run.reported = reported_findings(run.analysis)

    async def _encode(self, run: _Run) -> None:
        """Every result object on its own: one that cannot be built is reported, the others go out."""
        job, pipeline, parts = run.job, run.job.pipeline, self.parts
        assert run.analysis is not None and run.reading is not None
        study_uid = job.study.study_instance_uid
        run.previous, run.withdrawn = await asyncio.get_running_loop().run_in_executor(
            parts.executor, superseded, parts.spool, parts.results, study_uid, run.key, run.analysis
        )
        started = time.perf_counter()
        try:
            run.encoded = await parts.encoder.encode(
                run.analysis,
                run.reported,
                run.reading.mask,
                run.previous,
                run.withdrawn,
                urgent=run.stat or job.priority is Priority.STAT,  # a critical finding in routine work too
                fallback=parts.executor,
            )
        finally:
            run.timings["encode"] = run.timings.get("encode", 0.0) + time.perf_counter() - started
        for kind, reason in run.encoded.failures.items():
            parts.metrics.output_failures.labels(kind, pipeline.name).inc()
            logger.error(
                "series %s: %s of %s could not be built, the other results go out: %s",
                job.series.series_instance_uid,
                kind,
                pipeline.name,
                reason,
            )
            parts.events.record(
                "output_failed",
                study=study_uid,
                series=job.series.series_instance_uid,
                pipeline=pipeline.name,
                output=kind,
                reason=reason,
            )

    @staticmethod
    def _datasets(run: _Run) -> list[Any]:
        return list(run.encoded.datasets) if run.encoded is not None else []

    async def _deliver(self, run: _Run, paths: list[Path]) -> None:
        job, pipeline, study = run.job, run.job.pipeline, run.job.study
        if pipeline.mode_for(study.calling_ae) is RolloutMode.SILENT:
            logger.info(
                "pipeline %s is silent for %s: results recorded, not sent", pipeline.name, study.calling_ae
            )
            return
        if not paths:
            return
        run.destination = self.parts.settings.destination_for(study.calling_ae)
        if run.destination is None:
            logger.warning(
                "no destination for results of calling AE %s: kept under %s only",
                study.calling_ae,
                paths[0].parent,
            )
            return
        priority = "STAT" if run.stat else job.priority.name
        await self.parts.outbox.submit(run.destination, study.study_instance_uid, paths, priority=priority)

    def _report(self, run: _Run, progress: StudyProgress | None) -> None:
        """The canonical ``series analysed`` event, and what the study's completion needs from this series."""
        job, pipeline = run.job, run.job.pipeline
        assert run.loaded is not None and run.output is not None and run.reading is not None
        assert run.analysis is not None and run.encoded is not None and run.repairs is not None
        found, datasets = run.reading.interpretation, self._datasets(run)
        fields = {
            "study": job.study.study_instance_uid,
            "series": job.series.series_instance_uid,
            "pipeline": pipeline.name,
            "mode": pipeline.mode_for(job.study.calling_ae).value,
            "model": run.output.model_name,
            "model_version": run.output.model_version,
            "algorithm_version": pipeline.provenance.algorithm_version,
            "model_sha256": run.analysis.model_sha256,
            "slices": len(run.loaded.images),
            "slice_order": run.loaded.order.method,
            "triton_requests": run.output.requests,
            "findings": len(found.findings),
            "dropped": len(found.dropped),
            "study_score": round(found.study_score, 4),
            "stat": run.stat,
            "results": [str(ds.SOPInstanceUID) for ds in datasets],
            "destination": str(run.destination) if run.destination else "",
            "supersedes": [str(ds.SOPInstanceUID) for ds in run.previous],
            "withdrawn": [str(ds.SOPInstanceUID) for ds in run.withdrawn]
            if run.encoded.get("KO") is not None
            else [],
            "output_failures": sorted(run.encoded.failures),
            "possibly_incomplete": job.study.incomplete_reason,
            "header_repairs": run.repairs.as_list(),
            "rule": job.rule,
            "routing_note": run.routing_note,
            "backend": self.parts.backend.name,
            "decoders": sorted({image.decoder for image in run.loaded.images}),
            **timing_log_fields(run.timings),
        }
        self.parts.events.series_analysed(
            fields,
            findings=len(found.findings),
            stat=run.stat,
            timings=run.timings,
            priority=job.priority.name,
        )
        self._findings_reported(run)
        if progress is not None:
            self._collect(run, progress)

    def _findings_reported(self, run: _Run) -> None:
        """Each finding as its SR states it (Tracking UID, type, confidence, image, box): what the radiologists'
        verdicts are tied to, in the system of record. Silent pipelines' findings too (the pilot's baseline)."""
        assert run.encoded is not None and run.analysis is not None and run.output is not None
        sr = run.encoded.get("SR")
        if sr is None:
            return
        job, pipeline = run.job, run.job.pipeline
        found = run.reading.interpretation.findings if run.reading is not None else ()
        self.parts.events.record(
            "findings_reported",
            study=job.study.study_instance_uid,
            series=job.series.series_instance_uid,
            pipeline=pipeline.name,
            mode=pipeline.mode_for(job.study.calling_ae).value,
            calling_ae=job.study.calling_ae,
            accession_number=job.study.accession_number,
            sr=str(sr.SOPInstanceUID),
            model=run.output.model_name,
            model_version=run.output.model_version,
            model_sha256=run.analysis.model_sha256,
            algorithm_version=pipeline.provenance.algorithm_version,
            supersedes=[str(ds.SOPInstanceUID) for ds in run.previous if ds.Modality == "SR"],
            reported=[
                {
                    "tracking_uid": reported.tracking_uid,
                    "code": [
                        reported.finding_type.value,
                        reported.finding_type.scheme,
                        reported.finding_type.meaning,
                    ],
                    "confidence": round(finding.confidence, 4),
                    "image": finding.sop_instance_uid,
                    "box": list(finding.bbox) if finding.bbox is not None else None,
                    "stat": run.stat and finding.confidence >= pipeline.output.stat_threshold,
                    "measurements": [
                        {"name": m.name.meaning, "value": m.value, "unit": m.unit.value}
                        for m in reported.measurements
                        if m.name.value != AI_CONFIDENCE.value
                    ],
                }
                for reported, finding in zip(run.reported, found, strict=True)
            ],
        )

    def _collect(self, run: _Run, progress: StudyProgress) -> None:
        """What the study's completion needs from this series: result UIDs, the report for the RIS, timings."""
        assert run.reading is not None and run.encoded is not None and run.analysis is not None
        pipeline, found, datasets = run.job.pipeline, run.reading.interpretation, self._datasets(run)
        sr = run.encoded.get("SR")
        progress.findings += len(found.findings)
        progress.results.extend(str(ds.SOPInstanceUID) for ds in datasets)
        if sr is not None:
            progress.sr_by_series[run.key] = str(sr.SOPInstanceUID)
            if pipeline.mode_for(run.job.study.calling_ae) is not RolloutMode.SILENT:
                progress.reports.append(
                    SeriesReport(
                        analysis=run.analysis,
                        findings=tuple(run.reported),
                        sr_sop_instance_uid=str(sr.SOPInstanceUID),
                    )
                )
        progress.objects_by_series[run.key] = [
            str(ds.SOPInstanceUID) for ds in datasets if ds.Modality != "KO"
        ]
        progress.add_timings(run.timings)

    def _raise_critical(self, run: _Run) -> None:
        """The STAT series' SR is stored: the critical-result loop tells the site's on-call contact."""
        job = run.job
        assert run.analysis is not None and run.output is not None and run.reading is not None
        assert self.parts.critical is not None
        found = run.reading.interpretation
        self.parts.critical.raised(
            CriticalFinding(
                study_instance_uid=job.study.study_instance_uid,
                calling_ae=job.study.calling_ae,
                accession_number=job.study.accession_number,
                sr_sop_instance_uid=run.analysis.result_uid("sr"),
                stored_at=time.time(),
                pipeline=job.pipeline.name,
                algorithm=f"{job.pipeline.provenance.algorithm_name} {job.pipeline.provenance.algorithm_version}",
                model=f"{run.output.model_name} version {run.output.model_version}",
                findings=len(found.findings),
                max_confidence=round(max((f.confidence for f in found.findings), default=0.0), 4),
            )
        )

    async def _notify_stat(self, run: _Run) -> None:
        job = run.job
        assert run.analysis is not None and run.output is not None and run.reading is not None
        found = run.reading.interpretation
        event = StatEvent(
            study_instance_uid=job.study.study_instance_uid,
            series_instance_uid=job.series.series_instance_uid,
            pipeline=job.pipeline.name,
            algorithm_name=job.pipeline.provenance.algorithm_name,
            algorithm_version=job.pipeline.provenance.algorithm_version,
            model_name=run.output.model_name,
            model_version=run.output.model_version,
            study_score=round(found.study_score, 4),
            max_confidence=round(max(f.confidence for f in found.findings), 4),
            findings=len(found.findings),
            sr_sop_instance_uid=run.analysis.result_uid("sr"),  # deterministic: the SR that is encoded next
            calling_ae=job.study.calling_ae,
            created_at=time.time(),
        )
        started = time.perf_counter()
        # The log line now, the webhook in the background: a dead webhook never holds a worker.
        self.parts.notifications.send(self.parts.notifier, event, failed_event="stat_notification_failed")
        run.timings["notify"] = time.perf_counter() - started
