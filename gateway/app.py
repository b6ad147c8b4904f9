"""The application: builds every part of the flow, runs them, and stops them in order. It holds no flow logic.

    receive (ingest.receiver) -> spool (ingest.spool) -> assemble (ingest.assembler) -> route
    (orchestration.routing) -> schedule (orchestration.scheduler) -> analyse (orchestration.series_pipeline:
    decode, prepare, infer, read) -> encode (results) -> store + deliver (delivery) -> report (reporting)
        -> events: log line, audit, metrics (ops.events)

Concurrency: association threads only spool and hand records to the assembler (thread-safe). One asyncio loop
(its own thread) owns the scheduler, the study tracker and the worker pool; blocking steps (decode, preprocess,
encode, file I/O) run in the thread pool and the encoder process pool, inference is awaited on Triton's async
gRPC client. The outbox, the report dispatcher and the HTTP server (ThreadingHTTPServer) run their own threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clients.triton import TritonClient
from gateway.config.settings import Settings
from gateway.core.domain import InstanceRecord, Study
from gateway.core.durable import remove_temporary_files
from gateway.core.errors import ConfigError, GatewayError
from gateway.core.logs import silence_identifier_warnings
from gateway.delivery.outbox import Outbox
from gateway.delivery.store import ResultStore
from gateway.inference.batcher import CrossStudyBatcher
from gateway.inference.registry import ModelRegistry, local_model_version, model_fingerprint
from gateway.inference.server import TritonServer
from gateway.inference.watch import TritonWatch
from gateway.ingest.assembler import StudyAssembler
from gateway.ingest.receiver import StoreSCP, check_port_free
from gateway.ingest.spool import Spool
from gateway.ops import retention
from gateway.ops.audit import AuditLog
from gateway.ops.events import EventSink
from gateway.ops.http_api import AdminApi, ApiBackend
from gateway.ops.metrics import Metrics
from gateway.orchestration.failures import FailurePublisher
from gateway.orchestration.routing import Router
from gateway.orchestration.scheduler import JobQueue
from gateway.orchestration.series_pipeline import PipelineParts, SeriesPipeline
from gateway.orchestration.tracker import StudyTracker
from gateway.orchestration.workers import WorkerPool
from gateway.reporting.dispatcher import ReportDispatcher
from gateway.reporting.notify import StatNotifier
from gateway.results.encode import ResultEncoder
from preprocessing.backend import select_backend
from preprocessing.codec import select_decoder
from preprocessing.dali_pipeline import DaliPreprocessor
from preprocessing.dali_pipeline import available as dali_available
from preprocessing.decode import decoder_availability

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
STOP_STACK_DUMP_S = 45.0


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
        self.metrics = Metrics()
        self.events = EventSink(self.audit, self.metrics)
        self.tracker = StudyTracker(self.spool, self.results, self.reports, self.events)
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
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._queue: JobQueue | None = None
        self.model_hashes: dict[str, str] = {}
        self.watch: TritonWatch | None = None
        self.pool: WorkerPool | None = None
        self.triton: TritonClient | None = None
        self.batcher: CrossStudyBatcher | None = None
        self.api: AdminApi | None = None
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
        alive = self.pool.alive if self.pool is not None else 0
        configured = self.settings.workers + self.settings.scheduling.stat_workers
        if self.pool is not None and self.pool.started and alive < configured:
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
            "studies_in_flight": len(self.tracker),
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
        if self.watch is not None:
            self.watch.wake_threadsafe()

    @property
    def triton_ready(self) -> bool:
        return self.watch is not None and self.watch.ready

    @property
    def resource_error(self) -> str:
        """Set while a job is deferred by a full disk / no file descriptors / memory."""
        return self.pool.resource_error if self.pool is not None else ""

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
            watch = self.watch = TritonWatch(client, self.triton_url, retry_max_s=tri.retry_max_s)
            await watch.check_models(self.settings.pipelines, local=self.triton_server is not None)
            queue = self._queue = JobQueue(self.settings.scheduling)
            parts = PipelineParts(
                settings=self.settings,
                executor=self.executor,
                decoder=self.decoder,
                backend=self.backend,
                dali=self.dali,
                encoder=self.encoder,
                results=self.results,
                spool=self.spool,
                outbox=self.outbox,
                notifier=self.notifier,
                failure_alerts=self.failure_alerts,
                tracker=self.tracker,
                events=self.events,
                metrics=self.metrics,
                model_hashes=self.model_hashes,
            )
            pool = self.pool = WorkerPool(
                queue=queue,
                client=client,
                pipeline=SeriesPipeline(parts, shared_batcher=self.batcher, raise_to_stat=queue.mark_stat),
                failures=FailurePublisher(parts),
                tracker=self.tracker,
                watch=watch,
                metrics=self.metrics,
            )
            self._ready.set()
            tasks = [
                asyncio.create_task(self._assemble(queue), name="assembler"),
                asyncio.create_task(watch.run(), name="triton-watch"),
                asyncio.create_task(self._purge_periodically(), name="retention"),
            ]
            pool.start(self.settings.workers, self.settings.scheduling.stat_workers)
            await self._stop.wait()
            await pool.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
                self.events.record(
                    "purge", removed=removed, freed_bytes=sum(i.size_bytes for i in plan.items)
                )

    def _observe_request(self, model: str, seconds: float, slices: int) -> None:
        self.metrics.triton_request_seconds.labels(model).observe(seconds)
        self.metrics.triton_request_slices.labels(model).observe(slices)

    async def _assemble(self, queue: JobQueue) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            for study in self.assembler.pop_complete():
                self._route(study, queue)

    def _route(self, study: Study, queue: JobQueue) -> None:
        study = self.tracker.as_it_stands(study)
        decision = self.router.route(study)
        for skip in decision.skipped:
            self.events.series_skipped(
                study=study.study_instance_uid,
                series=skip.series_instance_uid,
                reason=skip.reason,
                modality=skip.modality,
            )
        self.tracker.open(study, jobs=len(decision.jobs), skipped=len(decision.skipped))
        for job in decision.jobs:
            queue.put(job)
