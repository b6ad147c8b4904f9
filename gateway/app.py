"""The application: builds every part of the flow, runs them, and stops them in order. It holds no flow logic.

    receive (ingest.receiver) -> spool (ingest.spool) -> assemble (ingest.assembler) -> route
    (orchestration.routing) -> schedule (orchestration.scheduler) -> analyse (orchestration.series_pipeline:
    decode, prepare, infer, read) -> encode (results) -> store + deliver (delivery) -> report (reporting)
        -> events: log line, audit, metrics (ops.events)

Concurrency: association threads only spool and hand records to the assembler (thread-safe). One asyncio loop
(its own thread) owns the scheduler, the study tracker, the worker pool, the outbox's destination tasks, the
webhook / FHIR / HL7 sends and the HTTP server (uvicorn); blocking steps (decode, preprocess, file I/O, C-STORE)
run in the thread pool, encoding in the encoder process pool, inference is awaited on Triton's async gRPC
client (README "Concurrency").
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clients.http_post import HttpPoster
from clients.triton import TritonClient
from gateway.config.settings import Settings
from gateway.core.domain import InstanceRecord
from gateway.core.durable import remove_temporary_files
from gateway.core.errors import GatewayError
from gateway.core.logs import silence_identifier_warnings
from gateway.delivery.outbox import Outbox
from gateway.delivery.store import ResultStore
from gateway.inference.batcher import CrossStudyBatcher
from gateway.inference.registry import ModelRegistry, fingerprint_models
from gateway.inference.server import TritonServer
from gateway.inference.watch import TritonWatch
from gateway.ingest.assembler import StudyAssembler
from gateway.ingest.receiver import StoreSCP, check_port_free
from gateway.ingest.spool import Spool
from gateway.ops import retention
from gateway.ops.audit import AuditLog
from gateway.ops.events import EventSink
from gateway.ops.health import LoopState, OtherState, health_report, snapshot_on_loop, update_gauges
from gateway.ops.http_api import ApiBackend, HttpApi
from gateway.ops.metrics import Metrics
from gateway.orchestration.failures import FailurePublisher
from gateway.orchestration.imaging import log_capabilities, select_imaging
from gateway.orchestration.intake import StudyIntake
from gateway.orchestration.notifications import BackgroundNotifications
from gateway.orchestration.routing import Router
from gateway.orchestration.scheduler import JobQueue
from gateway.orchestration.series_pipeline import PipelineParts, SeriesPipeline
from gateway.orchestration.tracker import StudyTracker
from gateway.orchestration.workers import WorkerPool
from gateway.reporting.dispatcher import ReportDispatcher
from gateway.reporting.notify import StatNotifier
from gateway.results.encode import ResultEncoder

logger = logging.getLogger(__name__)

STOP_STACK_DUMP_S = 45.0
IO_THREADS = 2  # FHIR / HL7 report files
REPORTS_DRAIN_S = 10.0  # how long a stopping gateway waits for FHIR / HL7 deliveries in flight
LOOP_ANSWER_S = 5.0  # how long /health waits for the event loop's snapshot


class Gateway:
    def __init__(self, settings: Settings) -> None:
        silence_identifier_warnings()
        self.settings = settings
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.receiver.min_free_disk_mb * 2**20)
        self.assembler = StudyAssembler(
            settings.quiet_period_s, incomplete_guard_s=settings.incomplete_guard_s
        )
        self.results = ResultStore(settings.results_dir)
        self.http = HttpPoster()  # webhooks and FHIR: one connection pool, built here, off the loop
        self.notifier = StatNotifier(settings.stat_webhook_url, http=self.http)
        self.failure_alerts = StatNotifier(
            settings.failure_webhook_url, setting="failure_webhook_url", http=self.http
        )
        self.audit = AuditLog(settings.audit_log)
        self.outbox = Outbox(
            settings.outbox_dir,
            settings.delivery,
            calling_ae=settings.receiver.ae_title,
            on_event=self.audit.record,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=settings.workers + settings.scheduling.stat_workers + 2,
            thread_name_prefix="gateway-work",
        )
        # Report files on threads of their own: never queued behind decode and preprocess work.
        self.io_executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="gateway-io")
        self.reports = ReportDispatcher(settings, self.audit, self.io_executor, http=self.http)
        self.metrics = Metrics()
        self.events = EventSink(self.audit, self.metrics)
        self.tracker = StudyTracker(self.spool, self.results, self.reports, self.events)
        self.intake = StudyIntake(
            self.assembler, Router(settings.pipelines), self.tracker, self.events, self.io_executor
        )
        self.backend, self.dali, self.decoder, self.decoder_reason = select_imaging(settings)
        self.encoder = ResultEncoder(settings.encode_processes)
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
        self.api: HttpApi | None = None
        self.disk = retention.DiskForecast(settings.data_dir, settings.receiver.min_free_disk_mb * 2**20)

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> Gateway:
        """Start every part (receiver last, so nothing is accepted before it can be analysed); on any error,
        stop what was started and raise."""
        log_capabilities(self.backend, self.dali, self.decoder_reason, pipelines=len(self.settings.pipelines))
        try:
            check_port_free(self.settings.receiver.host, self.settings.receiver.port)
            self.audit.start_writer()
            for folder in (self.settings.spool_dir, self.settings.results_dir, self.settings.outbox_dir):
                removed = remove_temporary_files(folder)
                if removed:
                    logger.info(
                        "removed %d temporary file(s) left by an interrupted write in %s", removed, folder
                    )
            self.model_hashes.update(
                fingerprint_models(
                    self.settings.triton.model_repository,
                    self.settings.pipelines,
                    ModelRegistry(self.settings.data_dir / "model_registry.json"),
                )
            )
            if not self.triton_url:
                self.triton_server = TritonServer(
                    self.settings.triton.model_repository,
                    self.settings.data_dir / "triton",
                    startup_timeout_s=self.settings.triton.startup_timeout_s,
                ).start(supervise=True)
                self.triton_server.on_restart = self._triton_restarted
                self.triton_server.on_exit = self._triton_exited
                self.triton_url = self.triton_server.grpc_url
            self._loop_thread = threading.Thread(target=self._run_loop, name="gateway-loop", daemon=True)
            self._loop_thread.start()
            self._ready.wait()
            if self._startup_error is not None:
                raise self._startup_error
            for record in self.spool.recover():
                self.assembler.add(record)
            self._start_receiver_and_api()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_receiver_and_api(self) -> None:
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
            self.api = HttpApi(
                self.settings.http,
                ApiBackend(
                    health=self.health,
                    metrics=self.render_metrics,
                    dead_letters=lambda: [dataclasses.asdict(j) for j in self.outbox.dead_letters()],
                    resend=self.outbox.resend,
                ),
            )
            assert self._loop is not None
            self.api.start(self._loop)

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
        self.io_executor.shutdown(wait=True, cancel_futures=False)
        self.audit.close()
        self.encoder.close()
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
        """Status "ok" or "degraded" with the reasons; studies are accepted either way. Safe from any thread:
        what the event loop owns is read on the loop."""
        state, loop_problem = snapshot_on_loop(self._loop, self._loop_thread, self._snapshot, LOOP_ANSWER_S)
        try:
            self.spool.check_space()
            spool_error = ""
        except GatewayError as exc:
            spool_error = str(exc)
        self.disk.sample()
        report = health_report(
            state,
            OtherState(
                triton_url=self.triton_url,
                failing_destinations=self.outbox.failing,
                spool_error=spool_error,
                audit_error=self.audit.last_error,
                audit_backlog=self.audit.backlog,
                workers_configured=self.settings.workers + self.settings.scheduling.stat_workers,
                worker_restarts=int(self.metrics.worker_restarts._value.get()),
                studies_pending=self.assembler.pending_studies(),
                outbox_pending=self.outbox.pending(),
                dead_letters=len(self.outbox.dead_letters()),
                children=self._children(),
                disk=self.disk.report(),
            ),
        )
        if loop_problem:
            report["status"] = "degraded"
            report["reasons"].append(loop_problem)
        return report

    def _snapshot(self) -> LoopState:
        """What the event loop owns, copied; only ever run on the loop."""
        queue, pool = self._queue, self.pool
        return LoopState(
            triton_ready=self.triton_ready,
            endpoints=self.triton.endpoints if self.triton is not None else [],
            queue=queue.depth_by_priority() if queue is not None else {},
            queue_by_pacs=queue.depth_by_pacs() if queue is not None else {},
            studies_in_flight=len(self.tracker),
            workers_alive=pool.alive if pool is not None else 0,
            workers_started=pool is not None and pool.started,
            resource_error=self.resource_error,
        )

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

    def _triton_exited(self) -> None:
        """Called by the Triton supervisor the moment the server dies: workers hold from now on."""
        if self.watch is not None:
            self.watch.unavailable_threadsafe()

    @property
    def triton_ready(self) -> bool:
        return self.watch is not None and self.watch.ready

    @property
    def resource_error(self) -> str:
        """Set while a job is deferred by a full disk / no file descriptors / memory."""
        return self.pool.resource_error if self.pool is not None else ""

    def render_metrics(self) -> bytes:
        update_gauges(self.metrics, self.health(), self.spool.root)
        return self.metrics.render()

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
            pool = self.pool = self._worker_pool(client, queue, watch)
            self._ready.set()
            tasks = [
                asyncio.create_task(self.intake.run(queue), name="assembler"),
                asyncio.create_task(watch.run(), name="triton-watch"),
                asyncio.create_task(self.outbox.run(), name="outbox"),
                asyncio.create_task(
                    retention.purge_periodically(self.settings, self.executor, self.metrics, self.events),
                    name="retention",
                ),
            ]
            pool.start(self.settings.workers, self.settings.scheduling.stat_workers)
            await self._stop.wait()
            await pool.stop()
            await self.tracker.drain()
            await self.reports.drain(REPORTS_DRAIN_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()
            await self.http.aclose()

    def _worker_pool(self, client: TritonClient, queue: JobQueue, watch: TritonWatch) -> WorkerPool:
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
            notifications=BackgroundNotifications(self.events),
            tracker=self.tracker,
            events=self.events,
            metrics=self.metrics,
            model_hashes=self.model_hashes,
        )
        return WorkerPool(
            queue=queue,
            client=client,
            pipeline=SeriesPipeline(parts, shared_batcher=self.batcher, raise_to_stat=queue.mark_stat),
            failures=FailurePublisher(parts),
            tracker=self.tracker,
            watch=watch,
            metrics=self.metrics,
        )

    def _observe_request(self, model: str, seconds: float, slices: int) -> None:
        self.metrics.triton_request_seconds.labels(model).observe(seconds)
        self.metrics.triton_request_slices.labels(model).observe(slices)
