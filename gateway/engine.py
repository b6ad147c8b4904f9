"""The gateway engine: wires the stages of the flow together and runs them.

    receive (scp) -> spool -> assemble -> route -> schedule -> preprocess -> infer -> interpret
        -> encode (results.sr / results.gsps) -> store + deliver -> STAT notify -> audit

Association threads only spool and register instances. One asyncio loop (its own thread) declares studies
complete, routes them and runs ``workers`` jobs concurrently; CPU-bound steps (decode, preprocess, encode,
C-STORE) run in a thread pool, inference is awaited on Triton's async gRPC client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from clients.triton import DetectionOutput, ScoresOutput, TritonClient
from clients.triton_batcher import CrossStudyBatcher
from gateway import retention
from gateway.assembler import StudyAssembler, assemble_study
from gateway.audit import AuditLog
from gateway.delivery import ResultStore
from gateway.domain import InstanceRecord, RolloutMode, Study, timing_log_fields
from gateway.errors import (
    ConfigError,
    GatewayError,
    InferenceUnavailable,
    PermanentError,
    ResourceExhausted,
    as_resource_error,
)
from gateway.http_api import AdminApi, ApiBackend
from gateway.logs import silence_identifier_warnings
from gateway.metrics import Metrics
from gateway.model_registry import ModelRegistry, local_model_version, model_fingerprint
from gateway.notify import FailureEvent, StatEvent, StatNotifier
from gateway.orchestration.analysis import prepare_input, read_output, run_model
from gateway.outbox import Outbox
from gateway.reporting import ReportDispatcher
from gateway.results.common import SeriesAnalysis
from gateway.results.content import SeriesReport, reported_findings
from gateway.results.encode import ResultEncoder
from gateway.results.hygiene import clean_headers
from gateway.results.sr import build_sr
from gateway.routing import InferenceJob, Router, study_priority
from gateway.scheduler import JobQueue
from gateway.scp import StoreSCP, check_port_free
from gateway.settings import Settings
from gateway.spool import Spool, remove_temporary_files
from gateway.triton_server import TritonServer
from preprocessing.anatomy import ANATOMY_CHECKS
from preprocessing.backend import select_backend
from preprocessing.codec import select_decoder
from preprocessing.dali_pipeline import DaliPreprocessor
from preprocessing.dali_pipeline import available as dali_available
from preprocessing.decode import decoder_availability
from preprocessing.series import LoadedSeries, load_series, read_headers

logger = logging.getLogger(__name__)
T = TypeVar("T")

POLL_INTERVAL_S = 0.2
TRITON_WATCH_INTERVAL_S = 2.0
STOP_STACK_DUMP_S = 45.0
RESOURCE_RETRY_S = (1.0, 10.0)  # first and longest wait before a job deferred by a full disk runs again


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
    notified: set[str] = field(default_factory=set)  # "<series>/<pipeline>" whose STAT event went out
    objects_by_series: dict[str, list[str]] = field(default_factory=dict)  # every result UID per key
    repairs: set[tuple[str, str]] = field(default_factory=set)  # header hygiene: (attribute, action)
    failed: int = 0  # routed series that could not be analysed (each got a failure SR where possible)
    skipped: int = 0  # series no pipeline applies to


class Gateway:
    def __init__(self, settings: Settings) -> None:
        silence_identifier_warnings()
        self.settings = settings
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.receiver.min_free_disk_mb * 2**20)
        self.assembler = StudyAssembler(
            settings.quiet_period_s, incomplete_guard_s=settings.incomplete_guard_s
        )
        self.router = Router(settings.pipelines)
        self.results = ResultStore(settings.results_dir)
        self.notifier = StatNotifier(settings.stat_webhook_url)
        self.failure_alerts = StatNotifier(settings.failure_webhook_url, setting="failure_webhook_url")
        self.audit = AuditLog(settings.audit_log)
        self.outbox = Outbox(
            settings.outbox_dir,
            settings.delivery,
            calling_ae=settings.receiver.ae_title,
            on_event=self.audit.record,
        )
        self.reports = ReportDispatcher(settings, self.audit)
        self.backend = select_backend(force_cpu=settings.force_cpu)
        self.dali = self._dali(settings)
        self.encoder = ResultEncoder(settings.encode_processes)
        try:
            self.decoder, self.decoder_reason = select_decoder(
                settings.decode_backend, gpu=self.backend.name == "cupy"
            )
        except RuntimeError as exc:
            raise ConfigError(
                f"{exc}; install nvidia-nvimgcodec-cu12 or use decode_backend = 'auto'"
            ) from exc
        self.executor = ThreadPoolExecutor(
            max_workers=settings.workers + settings.scheduling.stat_workers + 2,
            thread_name_prefix="gateway-work",
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
        self._queue: JobQueue | None = None
        self.metrics = Metrics()
        self.model_hashes: dict[str, str] = {}
        self.triton_ready = False
        self.triton: TritonClient | None = None
        self.batcher: CrossStudyBatcher | None = None
        self.api: AdminApi | None = None
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._triton_wake: asyncio.Event | None = None
        self.resource_error = ""  # set while a job is deferred by a full disk / no file descriptors / memory
        self.disk = retention.DiskForecast(settings.data_dir, settings.receiver.min_free_disk_mb * 2**20)

    # -- life cycle -------------------------------------------------------------------------------------------

    def _dali(self, settings: Settings) -> DaliPreprocessor | None:
        if settings.preprocess_backend != "dali":
            return None
        usable, reason = dali_available()
        if not usable:
            raise ConfigError(f"preprocess_backend = 'dali' but {reason}; install nvidia-dali or use 'auto'")
        return DaliPreprocessor(device_id=0 if self.backend.name == "cupy" else None)

    def start(self) -> Gateway:
        logger.info("array backend: %s (%s)", self.backend.name, self.backend.reason)
        logger.info("image decode: %s", self.decoder_reason)
        if self.dali is not None:
            logger.info("preprocessing through the DALI pipeline (%s)", self.dali.name)
        missing = [name for name, ok in decoder_availability().items() if not ok]
        if missing:
            logger.warning(
                "no decoder installed for: %s; such studies will be kept but not analysed", ", ".join(missing)
            )
        if not self.settings.pipelines:
            logger.warning("no pipelines configured: studies are stored but never analysed")
        try:
            check_port_free(self.settings.receiver.host, self.settings.receiver.port)
            for folder in (self.settings.spool_dir, self.settings.results_dir, self.settings.outbox_dir):
                removed = remove_temporary_files(folder)
                if removed:
                    logger.info(
                        "removed %d temporary file(s) left by an interrupted write in %s", removed, folder
                    )
            self._fingerprint_models()
            if not self.triton_url:
                self.triton_server = TritonServer(
                    self.settings.triton.model_repository,
                    self.settings.data_dir / "triton",
                    startup_timeout_s=self.settings.triton.startup_timeout_s,
                ).start(supervise=True)
                self.triton_server.on_restart = self._triton_restarted
                self.triton_url = self.triton_server.grpc_url
            self._loop_thread = threading.Thread(target=self._run_loop, name="gateway-engine", daemon=True)
            self._loop_thread.start()
            self._ready.wait()
            if self._startup_error is not None:
                raise self._startup_error
            self.outbox.start()
            for record in self.spool.recover():
                self.assembler.add(record)
            self.scp = StoreSCP(
                self.settings.receiver,
                self.spool,
                self.on_stored,
                allowed_calling_aes=self.settings.allowed_calling_aes(),
                on_refused=lambda status: self.metrics.instances_refused.labels(f"0x{status:04X}").inc(),
                on_association_end=self.assembler.association_ended,
            )
            self.scp.start()
            if self.settings.http.enabled:
                self.api = AdminApi(
                    self.settings.http,
                    ApiBackend(
                        health=self.health,
                        metrics=self.render_metrics,
                        dead_letters=lambda: [dataclasses.asdict(j) for j in self.outbox.dead_letters()],
                        resend=self.outbox.resend,
                    ),
                )
                self.api.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _fingerprint_models(self) -> None:
        """Hash every pipeline's model files and refuse changed files under unchanged versions (traceability)."""
        repository = self.settings.triton.model_repository
        registry = ModelRegistry(self.settings.data_dir / "model_registry.json")
        for pipeline in self.settings.pipelines:
            if not (repository / pipeline.model / "config.pbtxt").is_file():
                logger.warning(
                    "model %s is not in %s: its results carry no content hash", pipeline.model, repository
                )
                continue
            fingerprint = model_fingerprint(repository, pipeline.model)
            version = local_model_version(repository, pipeline.model)
            registry.check_and_record(pipeline.model, version, pipeline.algorithm_version, fingerprint)
            self.model_hashes[pipeline.model] = fingerprint
            logger.info(
                "model %s version %s (algorithm %s) sha256 %s",
                pipeline.model,
                version,
                pipeline.algorithm_version,
                fingerprint,
            )

    def stop(self) -> None:
        logger.info("gateway stopping")
        # A stop that hangs (seen once under load, not reproduced) leaves every thread's stack on stderr.
        faulthandler.dump_traceback_later(STOP_STACK_DUMP_S, exit=False)
        try:
            self._stop_parts()
        finally:
            faulthandler.cancel_dump_traceback_later()
        logger.info("gateway stopped")

    def _stop_parts(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=30)
            self._loop_thread = None
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.encoder.close()
        self.outbox.stop()
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
        self.metrics.instances_received.labels(record.calling_ae or "?").inc()
        self.assembler.add(record)

    # -- health and metrics -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Status "ok" or "degraded" with the reasons; studies are accepted either way."""
        reasons = []
        if not self.triton_ready:
            reasons.append(f"Triton at {self.triton_url} is not ready: analyses are queued and retried")
        for destination, error in sorted(self.outbox.failing.items()):
            reasons.append(f"destination {destination} is failing ({error[:120]}): results are queued")
        try:
            self.spool.check_space()
        except GatewayError as exc:
            reasons.append(str(exc))
        if self.resource_error:
            reasons.append(f"results cannot be written: {self.resource_error}; analyses are retried")
        if self.audit.last_error:
            reasons.append(
                f"audit trail cannot be written ({self.audit.last_error}): {self.audit.backlog} event(s) held"
            )
        alive = sum(1 for task in list(self._workers.values()) if not task.done())
        configured = self.settings.workers + self.settings.scheduling.stat_workers
        if self._workers and alive < configured:
            reasons.append(f"only {alive} of {configured} analysis workers alive")
        dead = len(self.outbox.dead_letters())
        self.disk.sample()
        disk = self.disk.report()
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "triton": {
                "url": self.triton_url,
                "ready": self.triton_ready,
                "endpoints": self.triton.endpoints if self.triton is not None else [],
            },
            "queue": self._queue.depth_by_priority() if self._queue is not None else {},
            "queue_by_pacs": self._queue.depth_by_pacs() if self._queue is not None else {},
            "studies_pending": self.assembler.pending_studies(),
            "studies_in_flight": len(self._progress),
            "outbox_pending": self.outbox.pending(),
            "dead_letters": dead,
            "workers": {
                "alive": alive,
                "configured": configured,
                "restarts": int(self.metrics.worker_restarts._value.get()),
            },
            "children": self._children(),
            "disk": disk,
        }

    def _children(self) -> dict[str, Any]:
        """The supervised child processes: restarts and state (Triton only when the gateway started it)."""
        children: dict[str, Any] = {"encoders": {"restarts": self.encoder.restarts}}
        server = self.triton_server
        if server is not None:
            children["tritonserver"] = {
                "running": server.running,
                "pid": server.server_pid,
                "restarts": server.restarts,
                "last_exit": server.last_exit,
            }
        return children

    def _triton_restarted(self) -> None:
        """Called by the Triton supervisor once a restarted server is ready: probe now, not after the backoff."""
        loop, wake = self._loop, self._triton_wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def render_metrics(self) -> bytes:
        m = self.metrics
        health = self.health()
        m.degraded.set(1 if health["status"] != "ok" else 0)
        m.triton_up.set(1 if self.triton_ready else 0)
        for priority, depth in health["queue"].items():
            m.queue_depth.labels(priority).set(depth)
        m.queue_depth_pacs.clear()
        for pacs, depth in health["queue_by_pacs"].items():
            m.queue_depth_pacs.labels(pacs).set(depth)
        m.studies_pending.set(health["studies_pending"])
        m.studies_in_flight.set(health["studies_in_flight"])
        for destination, count in health["outbox_pending"].items():
            m.outbox_pending.labels(destination).set(count)
        m.dead_letters.set(health["dead_letters"])
        m.workers_alive.set(health["workers"]["alive"])
        hours = health["disk"]["hours_until_watermark"]
        m.disk_hours_left.set(-1 if hours is None else hours)
        m.disk_fill_rate.set(health["disk"]["fill_rate_bytes_per_hour"])
        for child, state in health["children"].items():
            m.child_restarts.labels(child).set(state["restarts"])
        m.spool_free_bytes.set(shutil.disk_usage(self.spool.root).free)
        return m.render()

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
        self._triton_wake = asyncio.Event()
        tri = self.settings.triton
        client = self.triton = TritonClient(
            self.triton_url,
            timeout_s=tri.request_timeout_s,
            max_slices_per_request=tri.max_slices_per_request,
            observe=self._observe_request,
            transport=tri.transport,
        )
        if tri.cross_study_batching:
            self.batcher = CrossStudyBatcher(
                client,
                max_slices=tri.max_slices_per_request,
                max_delay_s=tri.batch_delay_ms / 1000.0,
                observe=lambda model, studies: self.metrics.triton_request_studies.labels(model).observe(
                    studies
                ),
            )
        try:
            await self._check_models(client)
            queue = self._queue = JobQueue(self.settings.scheduling)
            self._inference_open = asyncio.Event()
            self._inference_open.set()
            self._ready.set()
            tasks = [
                asyncio.create_task(self._assemble(queue), name="assembler"),
                asyncio.create_task(self._watch_triton(client), name="triton-watch"),
                asyncio.create_task(self._purge_periodically(), name="retention"),
            ]
            for i in range(self.settings.workers):
                self._spawn_worker(f"worker-{i}", queue, client, stat_only=False)
            for i in range(self.settings.scheduling.stat_workers):
                self._spawn_worker(f"stat-worker-{i}", queue, client, stat_only=True)
            await self._stop.wait()
            workers, self._workers = list(self._workers.values()), {}
            for task in [*tasks, *workers]:
                task.cancel()
            await asyncio.gather(*tasks, *workers, return_exceptions=True)
        finally:
            await client.close()

    async def _purge_periodically(self) -> None:
        """Apply the retention rules every ``retention.interval_s`` (never what is not analysed or delivered)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.retention.interval_s)
            try:
                plan = await loop.run_in_executor(self.executor, retention.plan, self.settings)
                removed = await loop.run_in_executor(self.executor, retention.execute, self.settings, plan)
            except Exception as exc:  # a purge that fails is retried at the next interval
                logger.error("retention purge failed: %s: %s", type(exc).__name__, exc)
                continue
            for kind, count in removed.items():
                self.metrics.purged.labels(kind).inc(count)
            if removed:
                self.audit.record("purge", removed=removed, freed_bytes=sum(i.size_bytes for i in plan.items))

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

    def _observe_request(self, model: str, seconds: float, slices: int) -> None:
        self.metrics.triton_request_seconds.labels(model).observe(seconds)
        self.metrics.triton_request_slices.labels(model).observe(slices)

    async def _watch_triton(self, client: TritonClient) -> None:
        """Track Triton's readiness. While it is down, workers hold and the queue keeps every job in priority
        order, so the backlog is worked off STAT first when it returns; probes back off up to retry_max_s."""
        delay = TRITON_WATCH_INTERVAL_S
        while True:
            ready = await client.is_ready()
            if ready != self.triton_ready:
                log = logger.info if ready else logger.error
                log(
                    "Triton at %s is %s", self.triton_url, "ready" if ready else "NOT ready: gateway degraded"
                )
            self.triton_ready = ready
            if ready:
                self._inference_open.set()
                delay = TRITON_WATCH_INTERVAL_S
            else:
                self._inference_open.clear()
                delay = min(self.settings.triton.retry_max_s, delay * 2)
            wake = self._triton_wake
            if wake is None:
                await asyncio.sleep(delay)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)  # a restarted local server wakes the probe at once
            if wake.is_set():
                wake.clear()
                delay = TRITON_WATCH_INTERVAL_S

    async def _assemble(self, queue: JobQueue) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            for study in self.assembler.pop_complete():
                self._route(study, queue)

    def _route(self, study: Study, queue: JobQueue) -> None:
        if self.spool.processed_instances(study.study_instance_uid):
            # Late instances or a re-send of an analysed study: analyse the whole study again, as it stands now.
            study = dataclasses.replace(
                assemble_study(
                    self.spool.study_records(study.study_instance_uid),
                    calling_ae=study.calling_ae,
                    first_received_at=study.first_received_at,
                    last_received_at=study.last_received_at,
                ),
                incomplete_reason=study.incomplete_reason,
            )
        decision = self.router.route(study)
        for skip in decision.skipped:
            self.metrics.series_skipped.inc()
            logger.info(
                "series %s (%s) not analysed: %s", skip.series_instance_uid, skip.modality or "?", skip.reason
            )
            self.audit.record(
                "series_skipped",
                study=study.study_instance_uid,
                series=skip.series_instance_uid,
                reason=skip.reason,
            )
        progress = _StudyProgress(
            study=study,
            completed_at=time.time(),
            outstanding=len(decision.jobs),
            skipped=len(decision.skipped),
        )
        progress.timings["receive"] = study.last_received_at - study.first_received_at
        progress.timings["wait_complete"] = progress.completed_at - study.last_received_at
        self._progress[study.study_instance_uid] = progress
        if not decision.jobs:
            self._finish_study(study.study_instance_uid)
            return
        for job in decision.jobs:
            queue.put(job)

    def _spawn_worker(self, name: str, queue: JobQueue, client: TritonClient, *, stat_only: bool) -> None:
        """Start one analysis worker; one that dies is logged, counted and replaced (the loop never loses one)."""
        task = asyncio.create_task(self._work(queue, client, stat_only=stat_only), name=name)
        self._workers[name] = task

        def died(done: asyncio.Task[None]) -> None:
            if (
                done.cancelled()
                or self._workers.get(name) is not done
                or self._stop is None
                or self._stop.is_set()
            ):
                return
            exc = done.exception()
            logger.error("analysis %s died (%s); starting a new one", name, f"{type(exc).__name__}: {exc}")
            self.metrics.worker_restarts.inc()
            self._spawn_worker(name, queue, client, stat_only=stat_only)

        task.add_done_callback(died)

    async def _work(self, queue: JobQueue, client: TritonClient, *, stat_only: bool = False) -> None:
        while True:
            await self._inference_open.wait()
            job = await queue.get(stat_only=stat_only)
            try:
                await self._run(job, queue, client)
            finally:
                queue.task_done()

    async def _run(self, job: InferenceJob, queue: JobQueue, client: TritonClient) -> None:
        """One job, with every outcome contained: nothing it raises (a full disk included) ends the worker."""
        try:
            await self._process(job, client)
            self.resource_error = ""
            self._job_done(job)
        except InferenceUnavailable as exc:
            self.metrics.inference_retries.inc()
            self.triton_ready = False
            self._inference_open.clear()  # hold every worker until the watcher sees Triton ready again
            logger.warning(
                "inference unavailable for series %s (try %d); queued until Triton is back: %s",
                job.series.series_instance_uid,
                job.attempts + 1,
                exc,
            )
            queue.put(dataclasses.replace(job, attempts=job.attempts + 1))
        except PermanentError as exc:
            logger.warning(
                "series %s not analysed by %s: %s", job.series.series_instance_uid, job.pipeline.name, exc
            )
            await self._fail(job, str(exc), type(exc).__name__)
        except Exception as exc:
            resource = as_resource_error(exc)
            if resource is not None:
                self._defer(job, queue, resource)
                return
            logger.exception(
                "series %s: unexpected error in %s", job.series.series_instance_uid, job.pipeline.name
            )
            await self._fail(job, f"{type(exc).__name__}: {exc}", type(exc).__name__)

    def _defer(self, job: InferenceJob, queue: JobQueue, exc: ResourceExhausted) -> None:
        """A resource ran out (results disk full, no file descriptors, memory): run the job again later."""
        first, longest = RESOURCE_RETRY_S
        delay = min(longest, first * 2**job.attempts)
        self.resource_error = str(exc)
        self.metrics.resource_errors.labels(str(exc).split(" (")[0]).inc()
        logger.error(
            "series %s: %s; analysis deferred %.0f s (try %d), the gateway reports itself degraded",
            job.series.series_instance_uid,
            exc,
            delay,
            job.attempts + 1,
        )
        retry = dataclasses.replace(job, attempts=job.attempts + 1)
        asyncio.get_running_loop().call_later(delay, queue.put, retry)

    async def _fail(self, job: InferenceJob, reason: str, kind: str) -> None:
        """A routed series that could not be analysed: counted, audited, alerted, and answered with a failure SR
        at the destination - "the AI failed" must never read as "the AI found nothing"."""
        study, series, pipeline = job.study, job.series, job.pipeline
        self.metrics.series_failed.labels(pipeline.name).inc()
        self.metrics.analysis_failures.labels(pipeline.name, kind).inc()
        progress = self._progress.get(study.study_instance_uid)
        if progress is not None:
            progress.failed += 1
        sr_uid = ""
        try:
            sr_uid = await self._publish_failure(job, reason, progress)
        except Exception as exc:  # the failure path itself must never take the worker down
            logger.error(
                "series %s: failure result could not be built or stored: %s: %s",
                series.series_instance_uid,
                type(exc).__name__,
                exc,
            )
        self.audit.record(
            "series_failed",
            study=study.study_instance_uid,
            series=series.series_instance_uid,
            pipeline=pipeline.name,
            reason_kind=kind,
            reason=reason,
            results=[sr_uid] if sr_uid else [],
        )
        event = FailureEvent(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            pipeline=pipeline.name,
            reason_kind=kind,
            reason=reason[:500],
            sr_sop_instance_uid=sr_uid,
            calling_ae=study.calling_ae,
            created_at=time.time(),
        )
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.failure_alerts.emit, event)
        except Exception as exc:
            logger.error("failure alert not delivered: %s", exc)
        try:
            self._job_done(job)
        except Exception:
            logger.exception("study %s could not be completed after a failure", study.study_instance_uid)

    async def _publish_failure(self, job: InferenceJob, reason: str, progress: _StudyProgress | None) -> str:
        """Build, store and send the failure SR of one series; returns its SOP Instance UID ("" if none)."""
        study, series, pipeline = job.study, job.series, job.pipeline
        loop = asyncio.get_running_loop()
        headers = await loop.run_in_executor(
            self.executor, read_headers, [r.path for r in series.instances if r.has_pixel_data]
        )
        if not headers:
            logger.error(
                "series %s: no readable header, no failure SR can be built", series.series_instance_uid
            )
            return ""
        sources, _ = clean_headers(headers)
        analysis = SeriesAnalysis(
            pipeline_name=pipeline.name,
            algorithm_name=pipeline.algorithm_name,
            algorithm_version=pipeline.algorithm_version,
            model_name=pipeline.model,
            model_version="",  # no model answer was used
            findings=(),
            study_score=0.0,
            stat=False,
            stat_threshold=pipeline.stat_threshold,
            report_threshold=pipeline.report_threshold,
            display_window=pipeline.display_window,
            sources=sources,
            model_sha256=self.model_hashes.get(pipeline.model, ""),
            incomplete_reason=study.incomplete_reason,
        )
        result_key = f"{series.series_instance_uid}/{pipeline.name}"
        previous, _ = self._superseded(study.study_instance_uid, result_key, analysis)
        sr = await loop.run_in_executor(
            self.executor, lambda: build_sr(analysis, findings=[], previous=previous, failure=reason)
        )
        paths = await loop.run_in_executor(self.executor, self.results.save, study.study_instance_uid, [sr])
        if pipeline.mode is not RolloutMode.SILENT:
            destination = self.settings.destination_for(study.calling_ae)
            if destination is not None:
                self.outbox.enqueue(destination, study.study_instance_uid, paths, priority=job.priority.name)
        if progress is not None:
            progress.sr_by_series[result_key] = str(sr.SOPInstanceUID)
            progress.objects_by_series[result_key] = [str(sr.SOPInstanceUID)]
            progress.results.append(str(sr.SOPInstanceUID))
        return str(sr.SOPInstanceUID)

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
        routing_note = ""
        if job.anatomy_check:
            evidence = await self._timed(
                timings,
                "anatomy",
                lambda: ANATOMY_CHECKS[pipeline.anatomy](paths, min_fraction=pipeline.anatomy_min_fraction),
            )
            if not evidence.present:
                self._skip_by_anatomy(job, evidence.describe())
                return
            routing_note = f"Routed by anatomy check: {evidence.describe()}; findings are incidental"
        loaded: LoadedSeries = await self._timed(timings, "decode", load_series, paths, self.decoder)
        for name, reason in loaded.skipped:
            logger.info("series %s: instance %s skipped: %s", series.series_instance_uid, name, reason)
        prepared = await self._timed(
            timings,
            "preprocess",
            lambda: prepare_input(loaded, pipeline, backend=self.backend, dali=self.dali),
        )
        started = time.perf_counter()
        shared = self.batcher if self.batcher is not None and pipeline.batchable else None
        output = await run_model(shared or client, pipeline, prepared, priority=job.priority)
        timings["infer"] = time.perf_counter() - started
        reading = read_output(output, loaded, pipeline, prepared, modality=series.modality)
        found, mask = reading.interpretation, reading.mask
        for kind, text in reading.implausible:
            self.metrics.findings_implausible.labels(pipeline.name, kind).inc()
            logger.warning(
                "series %s, pipeline %s: implausible finding dropped: %s",
                series.series_instance_uid,
                pipeline.name,
                text,
            )
        stat = found.stat and pipeline.mode is RolloutMode.TRIAGE
        if stat and self._queue is not None:
            raised = self._queue.mark_stat(study.study_instance_uid)
            if raised:
                logger.info(
                    "study %s has a STAT finding: %d waiting series raised to STAT",
                    study.study_instance_uid,
                    raised,
                )
        sources, repairs = clean_headers(loaded.headers)  # every copied attribute passes its VR
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
            sources=sources,
            model_sha256=self.model_hashes.get(pipeline.model, ""),
            incomplete_reason=study.incomplete_reason,
            routing_note=routing_note,
        )
        reported = reported_findings(analysis)
        result_key = f"{series.series_instance_uid}/{pipeline.name}"
        progress = self._progress.get(study.study_instance_uid)
        if progress is not None:
            progress.stat = progress.stat or stat
            progress.repairs |= repairs.actions
        if stat and (progress is None or result_key not in progress.notified):
            # The STAT decision is the analysis's, not the encoders': it is notified before any result object is
            # built, so no encoding or storage failure can hold back or cancel it.
            await self._notify_stat(job, analysis, output, found, timings)
            if progress is not None:
                progress.notified.add(result_key)
        previous, withdrawn = self._superseded(study.study_instance_uid, result_key, analysis)
        encoded = await self._timed(
            timings, "encode", self.encoder.encode, analysis, reported, mask, previous, withdrawn
        )
        for kind, reason in encoded.failures.items():
            self.metrics.output_failures.labels(kind, pipeline.name).inc()
            logger.error(
                "series %s: %s of %s could not be built, the other results go out: %s",
                series.series_instance_uid,
                kind,
                pipeline.name,
                reason,
            )
            self.audit.record(
                "output_failed",
                study=study.study_instance_uid,
                series=series.series_instance_uid,
                pipeline=pipeline.name,
                output=kind,
                reason=reason,
            )
        datasets = encoded.datasets
        sr = encoded.get("SR")
        paths_out = await self._timed(timings, "store", self.results.save, study.study_instance_uid, datasets)
        destination = None
        if pipeline.mode is RolloutMode.SILENT:
            logger.info("pipeline %s is silent: results recorded, not sent", pipeline.name)
        elif paths_out:
            destination = self.settings.destination_for(study.calling_ae)
            if destination is None:
                logger.warning(
                    "no destination for results of calling AE %s: kept under %s only",
                    study.calling_ae,
                    paths_out[0].parent,
                )
            else:
                self.outbox.enqueue(
                    destination,
                    study.study_instance_uid,
                    paths_out,
                    priority="STAT" if stat else job.priority.name,
                )
        fields = {
            "study": study.study_instance_uid,
            "series": series.series_instance_uid,
            "pipeline": pipeline.name,
            "mode": pipeline.mode.value,
            "model": output.model_name,
            "model_version": output.model_version,
            "algorithm_version": pipeline.algorithm_version,
            "model_sha256": analysis.model_sha256,
            "slices": len(loaded.images),
            "slice_order": loaded.order.method,
            "triton_requests": output.requests,
            "findings": len(found.findings),
            "dropped": len(found.dropped),
            "study_score": round(found.study_score, 4),
            "stat": stat,
            "results": [str(ds.SOPInstanceUID) for ds in datasets],
            "destination": str(destination) if destination else "",
            "supersedes": [str(ds.SOPInstanceUID) for ds in previous],
            "withdrawn": [str(ds.SOPInstanceUID) for ds in withdrawn]
            if encoded.get("KO") is not None
            else [],
            "output_failures": sorted(encoded.failures),
            "possibly_incomplete": study.incomplete_reason,
            "header_repairs": repairs.as_list(),
            "rule": job.rule,
            "routing_note": routing_note,
            "backend": self.backend.name,
            "decoders": sorted({image.decoder for image in loaded.images}),
            **timing_log_fields(timings),
        }
        logger.info("series analysed %s", json.dumps(fields))
        self.metrics.series_analysed.labels(pipeline.name).inc()
        self.metrics.findings.labels(pipeline.name).inc(len(found.findings))
        if stat:
            self.metrics.stat_studies.labels(pipeline.name).inc()
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage, job.priority.name).observe(seconds)
        self.audit.record("series_analysed", **fields)
        if progress is not None:
            progress.findings += len(found.findings)
            progress.results.extend(fields["results"])  # type: ignore[arg-type]
            if sr is not None:
                progress.sr_by_series[result_key] = str(sr.SOPInstanceUID)
            progress.objects_by_series[result_key] = [
                str(ds.SOPInstanceUID) for ds in datasets if ds.Modality != "KO"
            ]
            if pipeline.mode is not RolloutMode.SILENT and sr is not None:
                progress.reports.append(
                    SeriesReport(
                        analysis=analysis,
                        findings=tuple(reported),
                        sr_sop_instance_uid=str(sr.SOPInstanceUID),
                    )
                )
            for stage, seconds in timings.items():
                progress.timings[stage] = progress.timings.get(stage, 0.0) + seconds

    def _skip_by_anatomy(self, job: InferenceJob, evidence: str) -> None:
        """An anatomy-check job whose anatomy is not in the field of view: skipped, with the evidence."""
        reason = f"{job.pipeline.name}: no {job.pipeline.anatomy} in the field of view ({evidence})"
        self.metrics.series_skipped.inc()
        logger.info("series %s not analysed: %s", job.series.series_instance_uid, reason)
        self.audit.record(
            "series_skipped",
            study=job.study.study_instance_uid,
            series=job.series.series_instance_uid,
            pipeline=job.pipeline.name,
            rule=job.rule,
            reason=reason,
        )
        progress = self._progress.get(job.study.study_instance_uid)
        if progress is not None:
            progress.skipped += 1

    def _superseded(
        self, study_uid: str, result_key: str, analysis: SeriesAnalysis
    ) -> tuple[list[Any], list[Any]]:
        """What an analysis replaces: the earlier SR (a predecessor document of the new one) and the headers of
        every earlier result object the new analysis does not re-issue (withdrawn by an IOCM rejection note)."""
        previous_uid = self.spool.previous_result(study_uid, result_key)
        if not previous_uid or previous_uid == analysis.result_uid("sr"):
            return [], []  # first analysis, or the same analysis again (a re-send): nothing is replaced
        old = self.results.load(study_uid, previous_uid)
        previous = [old] if old is not None else []
        reissued = {analysis.result_uid(role) for role in ("sr", "gsps", "seg")}
        withdrawn = []
        for uid in self.spool.previous_objects(study_uid, result_key):
            if uid not in reissued:
                header = self.results.load(study_uid, uid, header_only=True)
                if header is not None:
                    withdrawn.append(header)
        return previous, withdrawn

    async def _notify_stat(
        self,
        job: InferenceJob,
        analysis: SeriesAnalysis,
        output: DetectionOutput | ScoresOutput,
        found: Any,
        timings: dict[str, float],
    ) -> None:
        event = StatEvent(
            study_instance_uid=job.study.study_instance_uid,
            series_instance_uid=job.series.series_instance_uid,
            pipeline=job.pipeline.name,
            algorithm_name=job.pipeline.algorithm_name,
            algorithm_version=job.pipeline.algorithm_version,
            model_name=output.model_name,
            model_version=output.model_version,
            study_score=round(found.study_score, 4),
            max_confidence=round(max(f.confidence for f in found.findings), 4),
            findings=len(found.findings),
            sr_sop_instance_uid=analysis.result_uid("sr"),  # deterministic: the SR that is encoded next
            calling_ae=job.study.calling_ae,
            created_at=time.time(),
        )
        try:
            await self._timed(timings, "notify", self.notifier.emit, event)
        except Exception as exc:  # a failed notification is reported; the analysis goes on
            logger.error("STAT notification failed: %s", exc)
            self.audit.record(
                "stat_notification_failed", study=job.study.study_instance_uid, reason=str(exc)[:300]
            )

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
        try:
            self.spool.mark_processed(
                study_uid,
                (r.sop_instance_uid for s in study.series for r in s.instances),
                progress.sr_by_series,
                progress.objects_by_series,
            )
        except OSError as exc:  # results are stored and queued; only a restart would analyse the study again
            logger.error(
                "study %s: processed marker not written (%s); a restart re-analyses it", study_uid, exc
            )
        if progress.repairs:
            logger.warning(
                "study %s: header values that break their VR were repaired or dropped: %s",
                study_uid,
                ", ".join(f"{keyword} {action}" for keyword, action in sorted(progress.repairs)),
            )
            for keyword, action in progress.repairs:
                self.metrics.header_repairs.labels(keyword, action).inc()
        total = time.time() - study.last_received_at
        fields = {
            "study": study_uid,
            "calling_ae": study.calling_ae,
            "series": len(study.series),
            "instances": study.instance_count,
            "findings": progress.findings,
            "stat": progress.stat,
            "failed": progress.failed,
            "skipped": progress.skipped,
            "possibly_incomplete": study.incomplete_reason,
            "results": progress.results,
            "last_instance_to_done_ms": round(total * 1000.0, 1),
            **timing_log_fields(progress.timings),
        }
        logger.info("study done %s", json.dumps(fields))
        self.audit.record("study_done", **fields)
        self.metrics.studies_completed.inc()
        priority = study_priority(progress.study).name
        for stage in ("receive", "wait_complete"):
            self.metrics.stage_seconds.labels(stage, priority).observe(progress.timings.get(stage, 0.0))
