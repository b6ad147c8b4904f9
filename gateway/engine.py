"""The gateway engine: wires the stages of the flow together and runs them.

    receive (scp) -> spool -> assemble -> route -> schedule -> preprocess -> infer -> interpret
        -> encode (results.sr / results.gsps) -> store + deliver -> STAT notify -> audit

Association threads only spool and register instances. One asyncio loop (its own thread) declares studies
complete, routes them and runs ``workers`` jobs concurrently; CPU-bound steps (decode, preprocess, encode,
C-STORE) run in a thread pool, inference is awaited on Triton's async gRPC client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from clients.triton import TritonClient
from gateway.assembler import StudyAssembler, assemble_study
from gateway.audit import AuditLog
from gateway.delivery import Deliverer, ResultStore
from gateway.domain import InstanceRecord, RolloutMode, StageTimings, Study
from gateway.errors import (
    ConfigError,
    DeliveryError,
    GatewayError,
    InferenceUnavailable,
    PermanentError,
)
from gateway.interpret import interpret
from gateway.logs import silence_identifier_warnings
from gateway.notify import StatEvent, StatNotifier
from gateway.reporting import ReportDispatcher
from gateway.results.common import SeriesAnalysis
from gateway.results.content import ReportedFinding, SeriesReport, reported_findings
from gateway.results.gsps import build_gsps
from gateway.results.seg import build_seg
from gateway.results.sr import build_sr
from gateway.routing import InferenceJob, Router
from gateway.scheduler import JobQueue
from gateway.scp import StoreSCP, check_port_free
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.triton_server import TritonServer
from preprocessing.backend import select_backend
from preprocessing.decode import decoder_availability
from preprocessing.series import LoadedSeries, load_series, model_input

logger = logging.getLogger(__name__)
T = TypeVar("T")

POLL_INTERVAL_S = 0.2
MAX_RETRY_DELAY_S = 60.0


@dataclass
class _StudyProgress:
    study: Study
    completed_at: float
    outstanding: int
    findings: int = 0
    stat: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)
    reports: list[SeriesReport] = field(default_factory=list)
    sr_by_series: dict[str, str] = field(default_factory=dict)  # "<series>/<pipeline>" -> SR SOP Instance UID


class Gateway:
    def __init__(self, settings: Settings) -> None:
        silence_identifier_warnings()
        self.settings = settings
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.receiver.min_free_disk_mb * 2**20)
        self.assembler = StudyAssembler(settings.quiet_period_s)
        self.router = Router(settings.pipelines)
        self.results = ResultStore(settings.results_dir)
        self.deliverer = Deliverer(settings)
        self.notifier = StatNotifier(settings.stat_webhook_url)
        self.audit = AuditLog(settings.audit_log)
        self.reports = ReportDispatcher(settings, self.audit)
        self.backend = select_backend(force_cpu=settings.force_cpu)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.workers + 2, thread_name_prefix="gateway-work"
        )
        self.triton_server: TritonServer | None = None
        self.triton_url = settings.triton.url
        self.scp: StoreSCP | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._progress: dict[str, _StudyProgress] = {}
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> Gateway:
        logger.info("array backend: %s (%s)", self.backend.name, self.backend.reason)
        missing = [name for name, ok in decoder_availability().items() if not ok]
        if missing:
            logger.warning(
                "no decoder installed for: %s; such studies will be kept but not analysed", ", ".join(missing)
            )
        if not self.settings.pipelines:
            logger.warning("no pipelines configured: studies are stored but never analysed")
        try:
            check_port_free(self.settings.receiver.host, self.settings.receiver.port)
            if not self.triton_url:
                self.triton_server = TritonServer(
                    self.settings.triton.model_repository,
                    self.settings.data_dir / "triton",
                    startup_timeout_s=self.settings.triton.startup_timeout_s,
                ).start()
                self.triton_url = self.triton_server.grpc_url
            self._loop_thread = threading.Thread(target=self._run_loop, name="gateway-engine", daemon=True)
            self._loop_thread.start()
            self._ready.wait()
            if self._startup_error is not None:
                raise self._startup_error
            for record in self.spool.recover():
                self.assembler.add(record)
            self.scp = StoreSCP(
                self.settings.receiver,
                self.spool,
                self.on_stored,
                allowed_calling_aes=self.settings.allowed_calling_aes(),
            )
            self.scp.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=30)
            self._loop_thread = None
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.reports.close()
        if self.triton_server is not None:
            self.triton_server.stop()
            self.triton_server = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else self.settings.receiver.port

    def on_stored(self, record: InstanceRecord) -> None:
        """Called on an association thread once an instance is durable."""
        self.assembler.add(record)

    # -- event loop -------------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() when it happens during start-up
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                logger.exception("gateway engine stopped unexpectedly")
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        client = TritonClient(
            self.triton_url,
            timeout_s=self.settings.triton.request_timeout_s,
            max_slices_per_request=self.settings.triton.max_slices_per_request,
        )
        try:
            await self._check_models(client)
            queue = JobQueue()
            self._ready.set()
            tasks = [asyncio.create_task(self._assemble(queue), name="assembler")]
            tasks += [
                asyncio.create_task(self._work(queue, client), name=f"worker-{i}")
                for i in range(self.settings.workers)
            ]
            await self._stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()

    async def _check_models(self, client: TritonClient) -> None:
        local = self.triton_server is not None
        for pipeline in self.settings.pipelines:
            if await client.is_ready(pipeline.model):
                version = await client.model_version(pipeline.model)
                logger.info(
                    "pipeline %s -> model %s version %s ready (mode %s)",
                    pipeline.name,
                    pipeline.model,
                    version,
                    pipeline.mode.value,
                )
            elif local:
                raise ConfigError(
                    f"pipeline {pipeline.name}: model {pipeline.model!r} is not ready on the local Triton"
                )
            else:
                logger.warning(
                    "pipeline %s: model %s not ready on %s; jobs wait until it is",
                    pipeline.name,
                    pipeline.model,
                    self.triton_url,
                )

    async def _assemble(self, queue: JobQueue) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            for study in self.assembler.pop_complete():
                self._route(study, queue)

    def _route(self, study: Study, queue: JobQueue) -> None:
        if self.spool.processed_instances(study.study_instance_uid):
            # Late instances or a re-send of an analysed study: analyse the whole study again, as it stands now.
            study = assemble_study(
                self.spool.study_records(study.study_instance_uid),
                calling_ae=study.calling_ae,
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
            )
        decision = self.router.route(study)
        for skip in decision.skipped:
            logger.info(
                "series %s (%s) not analysed: %s", skip.series_instance_uid, skip.modality or "?", skip.reason
            )
            self.audit.record(
                "series_skipped",
                study=study.study_instance_uid,
                series=skip.series_instance_uid,
                reason=skip.reason,
            )
        progress = _StudyProgress(study=study, completed_at=time.time(), outstanding=len(decision.jobs))
        progress.timings["receive"] = study.last_received_at - study.first_received_at
        progress.timings["wait_complete"] = progress.completed_at - study.last_received_at
        self._progress[study.study_instance_uid] = progress
        if not decision.jobs:
            self._finish_study(study.study_instance_uid)
            return
        for job in decision.jobs:
            queue.put(job)

    async def _work(self, queue: JobQueue, client: TritonClient) -> None:
        while True:
            job = await queue.get()
            try:
                await self._process(job, client)
                self._job_done(job)
            except InferenceUnavailable as exc:
                delay = min(MAX_RETRY_DELAY_S, 2.0 ** min(job.attempts, 6))
                logger.warning(
                    "inference unavailable for series %s (try %d), retrying in %.0fs: %s",
                    job.series.series_instance_uid,
                    job.attempts + 1,
                    delay,
                    exc,
                )
                retry = dataclasses.replace(job, attempts=job.attempts + 1)
                asyncio.get_running_loop().call_later(delay, queue.put, retry)
            except PermanentError as exc:
                logger.warning(
                    "series %s not analysed by %s: %s", job.series.series_instance_uid, job.pipeline.name, exc
                )
                self.audit.record(
                    "series_failed",
                    study=job.study.study_instance_uid,
                    series=job.series.series_instance_uid,
                    pipeline=job.pipeline.name,
                    reason=str(exc),
                )
                self._job_done(job)
            except Exception as exc:
                logger.exception(
                    "series %s: unexpected error in %s", job.series.series_instance_uid, job.pipeline.name
                )
                self.audit.record(
                    "series_failed",
                    study=job.study.study_instance_uid,
                    series=job.series.series_instance_uid,
                    pipeline=job.pipeline.name,
                    reason=f"{type(exc).__name__}: {exc}",
                )
                self._job_done(job)
            finally:
                queue.task_done()

    async def _timed(self, timings: dict[str, float], stage: str, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started

    async def _process(self, job: InferenceJob, client: TritonClient) -> None:
        pipeline, study, series = job.pipeline, job.study, job.series
        timings: dict[str, float] = {"queue": time.time() - job.created_at}
        paths = [r.path for r in series.instances if r.has_pixel_data]
        loaded: LoadedSeries = await self._timed(timings, "decode", load_series, paths)
        for name, reason in loaded.skipped:
            logger.info("series %s: instance %s skipped: %s", series.series_instance_uid, name, reason)
        stack = await self._timed(
            timings,
            "preprocess",
            lambda: model_input(
                loaded,
                size=pipeline.input_size,
                intensity=pipeline.intensity,
                hu_clip=pipeline.hu_clip,
                window=pipeline.window,
                backend=self.backend,
            ),
        )
        started = time.perf_counter()
        output = await client.detect(
            pipeline.model, stack, priority=job.priority, want_mask=pipeline.segmentation
        )
        timings["infer"] = time.perf_counter() - started
        found = interpret(output, loaded.images, pipeline)
        stat = found.stat and pipeline.mode is RolloutMode.TRIAGE
        analysis = SeriesAnalysis(
            pipeline_name=pipeline.name,
            algorithm_name=pipeline.algorithm_name,
            algorithm_version=pipeline.algorithm_version,
            model_name=output.model_name,
            model_version=output.model_version,
            findings=found.findings,
            study_score=found.study_score,
            stat=stat,
            stat_threshold=pipeline.stat_threshold,
            report_threshold=pipeline.report_threshold,
            display_window=pipeline.display_window,
            sources=loaded.headers,
        )
        reported = reported_findings(analysis)
        result_key = f"{series.series_instance_uid}/{pipeline.name}"
        previous = []
        previous_uid = self.spool.previous_result(study.study_instance_uid, result_key)
        if previous_uid and previous_uid != analysis.result_uid("sr"):
            old = self.results.load(study.study_instance_uid, previous_uid)
            if old is not None:
                previous.append(old)  # late instances or a new model: the new SR supersedes this one
        datasets = await self._timed(timings, "encode", _encode, analysis, reported, output.mask, previous)
        paths_out = await self._timed(timings, "store", self.results.save, study.study_instance_uid, datasets)
        sr = datasets[0]
        delivered_to = ""
        if pipeline.mode is RolloutMode.SILENT:
            logger.info("pipeline %s is silent: results recorded, not sent", pipeline.name)
        else:
            destination = self.deliverer.destination_for(study.calling_ae)
            if destination is None:
                logger.warning(
                    "no destination for results of calling AE %s: kept under %s only",
                    study.calling_ae,
                    paths_out[0].parent,
                )
            else:
                try:
                    await self._timed(timings, "deliver", self.deliverer.deliver, datasets, destination)
                    delivered_to = str(destination)
                except DeliveryError as exc:
                    logger.error(
                        "results of series %s not delivered (kept on disk): %s",
                        series.series_instance_uid,
                        exc,
                    )
        if stat:
            event = StatEvent(
                study_instance_uid=study.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                pipeline=pipeline.name,
                algorithm_name=pipeline.algorithm_name,
                algorithm_version=pipeline.algorithm_version,
                model_name=output.model_name,
                model_version=output.model_version,
                study_score=round(found.study_score, 4),
                max_confidence=round(max(f.confidence for f in found.findings), 4),
                findings=len(found.findings),
                sr_sop_instance_uid=str(sr.SOPInstanceUID),
                calling_ae=study.calling_ae,
                created_at=time.time(),
            )
            try:
                await self._timed(timings, "notify", self.notifier.emit, event)
            except GatewayError as exc:
                logger.error("STAT notification failed: %s", exc)
        fields = {
            "study": study.study_instance_uid,
            "series": series.series_instance_uid,
            "pipeline": pipeline.name,
            "mode": pipeline.mode.value,
            "model": output.model_name,
            "model_version": output.model_version,
            "algorithm_version": pipeline.algorithm_version,
            "slices": len(loaded.images),
            "slice_order": loaded.order.method,
            "triton_requests": output.requests,
            "findings": len(found.findings),
            "dropped": len(found.dropped),
            "study_score": round(found.study_score, 4),
            "stat": stat,
            "results": [str(ds.SOPInstanceUID) for ds in datasets],
            "delivered_to": delivered_to,
            "supersedes": [str(ds.SOPInstanceUID) for ds in previous],
            "backend": self.backend.name,
            **StageTimings(values=timings).as_log_fields(),
        }
        logger.info("series analysed %s", json.dumps(fields))
        self.audit.record("series_analysed", **fields)
        progress = self._progress.get(study.study_instance_uid)
        if progress is not None:
            progress.findings += len(found.findings)
            progress.stat = progress.stat or stat
            progress.results.extend(fields["results"])  # type: ignore[arg-type]
            progress.sr_by_series[result_key] = str(sr.SOPInstanceUID)
            if pipeline.mode is not RolloutMode.SILENT:
                progress.reports.append(
                    SeriesReport(
                        analysis=analysis,
                        findings=tuple(reported),
                        sr_sop_instance_uid=str(sr.SOPInstanceUID),
                    )
                )
            for stage, seconds in timings.items():
                progress.timings[stage] = progress.timings.get(stage, 0.0) + seconds

    def _job_done(self, job: InferenceJob) -> None:
        progress = self._progress.get(job.study.study_instance_uid)
        if progress is None:
            return
        progress.outstanding -= 1
        if progress.outstanding <= 0:
            self._finish_study(job.study.study_instance_uid)

    def _finish_study(self, study_uid: str) -> None:
        progress = self._progress.pop(study_uid)
        study = progress.study
        if progress.reports:
            try:
                self.reports.dispatch(self.results.root / study_uid, progress.reports, stat=progress.stat)
            except Exception:  # reports for the RIS must never stop the study from completing
                logger.exception("study %s: FHIR / HL7 reports could not be built", study_uid)
        self.spool.mark_processed(
            study_uid, (r.sop_instance_uid for s in study.series for r in s.instances), progress.sr_by_series
        )
        total = time.time() - study.last_received_at
        fields = {
            "study": study_uid,
            "calling_ae": study.calling_ae,
            "series": len(study.series),
            "instances": study.instance_count,
            "findings": progress.findings,
            "stat": progress.stat,
            "results": progress.results,
            "last_instance_to_done_ms": round(total * 1000.0, 1),
            **StageTimings(values=progress.timings).as_log_fields(),
        }
        logger.info("study done %s", json.dumps(fields))
        self.audit.record("study_done", **fields)


def _encode(
    analysis: SeriesAnalysis, reported: list[ReportedFinding], mask: np.ndarray | None, previous: list[Any]
) -> list[Any]:
    """SR always; GSPS when there is something to draw; SEG when the model gave a non-empty mask."""
    datasets: list[Any] = [build_sr(analysis, findings=reported, previous=previous)]
    gsps = build_gsps(analysis)
    if gsps is not None:
        datasets.append(gsps)
    if mask is not None:
        seg = build_seg(analysis, mask)
        if seg is not None:
            datasets.append(seg)
    return datasets
