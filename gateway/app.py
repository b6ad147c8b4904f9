"""The application: builds every part of the flow, runs them, and stops them in order. It holds no flow logic.

    receive (ingest.receiver) -> spool (ingest.spool) -> assemble (ingest.assembler) -> route
    (orchestration.routing) -> schedule (orchestration.scheduler) -> analyse (orchestration.series_pipeline:
    decode, prepare, infer, read) -> encode (results) -> store + deliver (delivery) -> report (reporting)
        -> events: log line, audit, metrics (ops.events)

Concurrency: association threads only spool and hand records to the assembler (thread-safe). One asyncio loop
(its own thread) owns the scheduler, the study tracker, the worker pool, the outbox's destination tasks, the
webhook / FHIR / HL7 sends and the HTTP server (uvicorn) - what runs there is built by
``orchestration.runtime.LoopRuntime``; blocking steps (decode, preprocess, file I/O, C-STORE) run in thread
pools, the audit trail on its writer thread, encoding in the encoder process pool, inference is awaited on
Triton's async gRPC client (README "Concurrency").
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clients.http_post import HttpPoster
from gateway.config.settings import ReceiverSettings, Settings
from gateway.core.domain import InstanceRecord
from gateway.core.durable import remove_temporary_files
from gateway.core.errors import ConfigError, GatewayError
from gateway.core.logs import silence_identifier_warnings
from gateway.core.retry import Backoff
from gateway.database import migrate
from gateway.database.connect import engine_for, shown
from gateway.database.monitoring import record_pipeline_changes
from gateway.database.notices import NoticeStore
from gateway.database.queries import StudyFilter, instance_path, list_studies, pipelines_of, study_timeline
from gateway.database.queue import SharedQueue
from gateway.database.recorder import Recorder
from gateway.database.ups_tasks import TaskStore
from gateway.delivery.outbox import Outbox
from gateway.delivery.store import ResultStore
from gateway.inference.registry import ModelRegistry, fingerprint_models
from gateway.inference.server import TritonServer
from gateway.ingest.assembler import StudyAssembler
from gateway.ingest.native import NativeReceiver, unsupported_reason
from gateway.ingest.notices import NoticeSCP
from gateway.ingest.receiver import StoreSCP, check_port_free
from gateway.ingest.spool import Spool, node_file_name
from gateway.ingest.stow import StowStore
from gateway.ingest.ups_tasks import UpsTaskSCP
from gateway.ops import retention
from gateway.ops.audit import AuditLog
from gateway.ops.events import EventSink
from gateway.ops.health import LoopState, OtherState, health_report, snapshot_on_loop, update_gauges
from gateway.ops.http_api import ApiBackend, HttpApi
from gateway.ops.metrics import Metrics
from gateway.orchestration.imaging import log_capabilities, select_imaging
from gateway.orchestration.intake import StudyIntake
from gateway.orchestration.notifications import BackgroundNotifications
from gateway.orchestration.order_watch import OrderWatch
from gateway.orchestration.routing import Router
from gateway.orchestration.runtime import LoopRuntime
from gateway.orchestration.series_pipeline import PipelineParts
from gateway.orchestration.tracker import StudyTracker
from gateway.orchestration.ups_performer import TaskPerformer
from gateway.reporting.critical_alerts import CriticalAlerts
from gateway.reporting.dispatcher import ReportDispatcher
from gateway.reporting.notify import StatNotifier
from gateway.results.encode import ResultEncoder
from gateway.results.seg import mask_on_image
from gateway.review.dicom_verdicts import DicomVerdicts
from gateway.review.monitoring import DriftWatch, publish_metrics
from gateway.review.service import Review
from gateway.workflow.context import OrderContext
from gateway.workflow.hl7_listener import Hl7Listener
from gateway.workflow.orders import OrderStore
from gateway.workflow.worklist import WorklistLookup

logger = logging.getLogger(__name__)

STOP_STACK_DUMP_S = 45.0
IO_THREADS = 2  # FHIR / HL7 report files, order reads of the HL7 listener
LOOP_ANSWER_S = 5.0  # how long /health waits for the event loop's snapshot
MARKED_STUDIES_REMEMBERED = 10_000  # studies whose shared-spool "received by" mark this node knows it wrote


class Gateway:
    def __init__(self, settings: Settings) -> None:
        silence_identifier_warnings()
        self.settings = settings
        self.spool = Spool(settings.spool_dir, min_free_bytes=settings.receiver.min_free_disk_mb * 2**20)
        self._marked: set[str] = set()  # studies this node marked as received by it in a shared spool
        self.assembler = StudyAssembler(
            settings.quiet_period_s,
            incomplete_guard_s=settings.incomplete_guard_s,
            longest_wait_s=settings.receiver.notice_longest_wait_s,
        )
        self.results = ResultStore(settings.results_dir)
        self.http = HttpPoster()  # webhooks and FHIR: one connection pool, built here, off the loop
        self.notifier = StatNotifier(settings.stat_webhook_url, http=self.http)
        self.failure_alerts = StatNotifier(
            settings.failure_webhook_url, setting="failure_webhook_url", http=self.http
        )
        self.database = engine_for(settings.database_url)
        cluster = settings.cluster
        self.record = Recorder(self.database, settings.node_id, claims_jobs=cluster.enabled)
        self.shared_queue = (
            SharedQueue(self.database, settings.node_id, settings.scheduling, lease_s=cluster.lease_s)
            if cluster.enabled
            else None
        )
        self.audit = AuditLog(settings.audit_log, node=settings.node_id, mirror=self.record.audit_event)
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
        # Intake's blocking steps (a re-opened study's headers, its order) on a thread of their own: the serial step
        # that queues every study never waits behind report building under load.
        self.intake_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-intake")
        self.tasks = TaskStore(self.database, settings.node_id) if settings.ups.accept_tasks else None
        self.reports = ReportDispatcher(
            settings,
            self.audit,
            self.io_executor,
            http=self.http,
            tasks=self.tasks,
            pending_deliveries=self.outbox.pending_for_study,
        )
        self.metrics = Metrics()
        self.events = EventSink(self.audit, self.metrics, self.record)
        self.tracker = StudyTracker(self.spool, self.results, self.reports, self.events)
        self.orders = OrderStore(self.database, settings.node_id)
        self.performer = (
            TaskPerformer(
                settings,
                self.tasks,
                self.spool,
                self.assembler,
                on_stored=self.on_stored,
                on_event=self.audit.record,
            )
            if self.tasks is not None
            else None
        )
        self.notices = (
            NoticeSCP(
                self.assembler,
                NoticeStore(self.database, settings.node_id),
                tasks=UpsTaskSCP(
                    self.tasks, sources=[p.ae_title for p in settings.peers], on_task=self.performer.received
                )
                if self.tasks is not None and self.performer is not None
                else None,
            )
            if settings.receiver.accept_notices or self.tasks is not None
            else None
        )
        worklist = settings.worklist
        self.order_context = OrderContext(
            self.orders,
            WorklistLookup(worklist.scp, calling_ae=settings.receiver.ae_title, timeout_s=worklist.timeout_s)
            if worklist.scp is not None
            else None,
        )
        self.order_watch = OrderWatch(self.order_context, self.assembler, self.database)
        if settings.orders.enabled or worklist.scp is not None or cluster.enabled:  # where an order can exist
            self.order_watch.attach()
        self.critical = CriticalAlerts.for_settings(
            settings,
            self.database,
            http=self.http,
            on_event=self.audit.record,
            observe=lambda step, seconds: self.metrics.critical_result_seconds.labels(step).observe(seconds),
        )
        self.intake = StudyIntake(
            self.assembler,
            Router(settings.pipelines),
            self.tracker,
            self.events,
            self.intake_executor,
            orders=self.order_context,
        )
        self.backend, self.dali, self.decoder, self.decoder_reason = select_imaging(settings)
        self.encoder = ResultEncoder(settings.encode_processes, routine_nice=settings.encode_routine_nice)
        self.triton_server: TritonServer | None = None
        self.triton_url = settings.triton.url
        self.scp: StoreSCP | NativeReceiver | None = None
        self.services_scp: StoreSCP | None = (
            None  # engine "native": the other DIMSE services, on their own port
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.model_hashes: dict[str, str] = {}
        self.runtime: LoopRuntime | None = None  # built on the loop
        self.review = Review(self.database, settings)
        self.orders_listener = Hl7Listener.for_settings(
            settings.orders,
            self.orders,
            executor=self.io_executor,
            on_event=self.audit.record,
            reports=self.review.reports,
        )
        self.api: HttpApi | None = None
        self.disk = retention.DiskForecast(settings.data_dir, settings.receiver.min_free_disk_mb * 2**20)

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> Gateway:
        """Start every part (receiver last, so nothing is accepted before it can be analysed); on any error,
        stop what was started and raise."""
        log_capabilities(self.backend, self.dali, self.decoder_reason, pipelines=len(self.settings.pipelines))
        try:
            check_port_free(self.settings.receiver.host, self.settings.receiver.port)
            migrate.upgrade(self.database)
            self.record.start()
            self.audit.start_writer()
            self._audit_pipeline_changes()
            shared_spool = self.shared_queue is not None  # other nodes may be writing into it right now
            folders = (self.settings.results_dir, self.settings.outbox_dir)
            for folder in folders if shared_spool else (self.settings.spool_dir, *folders):
                removed = remove_temporary_files(folder)
                if removed:
                    logger.info(
                        "removed %d temporary file(s) left by an interrupted write in %s", removed, folder
                    )
            self.model_hashes.update(
                fingerprint_models(
                    self.settings.triton.model_repository,
                    self.settings.pipelines,
                    ModelRegistry(
                        self.settings.data_dir / "model_registry.json",
                        engine=self.database,
                        node=self.settings.node_id,
                    ),
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
            recovered = set()
            for record in self.spool.recover(self._studies_to_recover()):
                self.assembler.add(record)
                recovered.add(record.study_instance_uid)
            if self.notices is not None and recovered:
                restored = self.notices.restore(recovered)
                if restored:
                    logger.info("%d completeness notice(s) of recovered studies applied again", restored)
            self._start_receiver_and_api()
        except BaseException:
            self.stop()
            raise
        return self

    def _studies_to_recover(self) -> set[str] | None:
        """All unprocessed studies of the spool; in a cluster (a shared spool) only those no live node is
        receiving or analysing: this node's, and those of nodes that are gone."""
        if self.shared_queue is None:
            return None
        self.shared_queue.heartbeat()
        return self.shared_queue.studies_to_recover(self.spool.unprocessed_studies())

    def _adopt(self, studies: list[str]) -> None:
        """A dead node's studies that it had not routed: assembled here (blocking; the cluster's heartbeat task).
        Also those the database never heard of whose files have been quiet for a lease period."""
        assert self.shared_queue is not None
        quiet = self.spool.unprocessed_studies(quiet_for_s=self.settings.cluster.lease_s)
        unknown = self.shared_queue.studies_to_recover(quiet, unknown_only=True)
        if unknown:  # left to a live node that received it and has not recorded it yet (a database outage)
            live = {node_file_name(node) for node in self.shared_queue.live_nodes()}
            unknown = {uid for uid in unknown if not self.spool.received_by(uid) & live}
        chosen = set(studies) | unknown
        if unknown:
            logger.warning("%d spooled study(ies) that no live node recorded, adopted here", len(unknown))
        for record in self.spool.recover(chosen):
            self.assembler.add(record)
        if self.notices is not None and chosen:
            self.notices.restore(chosen)  # the dead node's MPPS / IAN of these studies (shared database)

    def _start_receiver_and_api(self) -> None:
        receiver = self.settings.receiver
        refused = lambda status: self.metrics.instances_refused.labels(f"0x{status:04X}").inc()  # noqa: E731
        if receiver.engine == "native":
            reason = unsupported_reason(receiver, ups_tasks=self.settings.ups.accept_tasks)
            if reason:
                raise ConfigError(f'[receiver] engine = "native" cannot be used: {reason}')
            if self.shared_queue is not None and receiver.journal_mb:
                # A node's journal is replayed by that node's next start only; in a cluster a node that never
                # returns would leave its last acknowledged instances there, so each one is fsynced in the spool.
                logger.info(
                    "native receiver without its journal: in a cluster each instance is fsynced directly"
                )
                receiver = receiver.model_copy(update={"journal_mb": 0})
            self.scp = NativeReceiver(
                receiver,
                self.spool,
                self.on_stored,
                allowed_calling_aes=self.settings.allowed_calling_aes(),
                on_refused=refused,
                on_association_end=self.assembler.association_ended,
                node_id=self.settings.node_id,
            )
            if receiver.services_port is not None:
                services = receiver.model_copy(
                    update={"port": receiver.services_port, "engine": "pynetdicom"}
                )
                self.services_scp = self._pynetdicom_receiver(services, refused)
        else:
            self.scp = self._pynetdicom_receiver(receiver, refused)
        self.scp.start()
        if self.services_scp is not None:
            self.services_scp.start()
        if self.settings.http.enabled:
            stow = StowStore(
                self.spool,
                self.on_stored,
                self.assembler.association_ended,
                on_refused=lambda status: self.metrics.instances_refused.labels(f"0x{status:04X}").inc(),
            )
            self.api = HttpApi(
                self.settings.http,
                ApiBackend(
                    health=self.health,
                    metrics=self.render_metrics,
                    dead_letters=lambda: [dataclasses.asdict(j) for j in self.outbox.dead_letters()],
                    resend=self.outbox.resend,
                    studies=lambda where: [row.as_json() for row in list_studies(self.database, where)],
                    worklist=self._worklist,
                    study=lambda uid: (lambda t: t.as_json() if t else None)(
                        study_timeline(self.database, uid)
                    ),
                    critical=self.critical,
                    stow=stow.open,
                    review=self.review,
                    image_path=lambda study, sop: instance_path(self.database, study, sop),
                    window_of=lambda name: next(
                        (p.output.display_window for p in self.settings.pipelines if p.name == name), None
                    ),
                    mask_of=lambda study, sop: mask_on_image(
                        sorted((self.settings.results_dir / study).glob("SEG_*.dcm")), sop
                    ),
                ),
            )
            assert self._loop is not None
            self.api.start(self._loop)

    def _pynetdicom_receiver(self, receiver: ReceiverSettings, refused: Callable[[int], None]) -> StoreSCP:
        """The Python receiver: C-STORE and every other DIMSE service the gateway answers (MPPS / IAN, UPS, the
        viewers' verdict objects)."""
        return StoreSCP(
            receiver,
            self.spool,
            self.on_stored,
            allowed_calling_aes=self.settings.allowed_calling_aes(),
            on_refused=refused,
            on_association_end=self.assembler.association_ended,
            notices=self.notices,
            intercept=DicomVerdicts(self.review.verdicts, self.settings.data_dir / "verdicts"),
        )

    def _worklist(self, where: StudyFilter) -> list[dict[str, Any]]:
        """The studies with the pipelines that analysed each and their rollout mode for its sending PACS (a
        pipeline since removed from the settings: "retired")."""
        rows = list_studies(self.database, where)
        analysed = pipelines_of(self.database, [row.study_uid for row in rows])
        configured = {p.name: p for p in self.settings.pipelines}

        def mode(name: str, calling_ae: str) -> str:
            pipeline = configured.get(name)
            return pipeline.mode_for(calling_ae).value if pipeline is not None else "retired"

        return [
            {
                **row.as_json(),
                "pipelines": [
                    {"name": name, "mode": mode(name, row.calling_ae)}
                    for name in analysed.get(row.study_uid, [])
                ],
            }
            for row in rows
        ]

    def stop(self) -> None:
        logger.info("gateway stopping")
        # A stop that hangs (seen once under load, not reproduced) leaves every thread's stack on the process's
        # stderr (the real one: an embedding application may have replaced sys.stderr with something unfiled).
        faulthandler.dump_traceback_later(STOP_STACK_DUMP_S, exit=False, file=sys.__stderr__ or 2)
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
        if self.services_scp is not None:
            self.services_scp.stop()
            self.services_scp = None
        if self._loop is not None and self.runtime is not None:
            self._loop.call_soon_threadsafe(self.runtime.stopping.set)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=30)
            self._loop_thread = None
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.io_executor.shutdown(wait=True, cancel_futures=False)
        self.intake_executor.shutdown(wait=True, cancel_futures=True)
        self.order_watch.close()
        if self.performer is not None:
            self.performer.close()
        if self.critical is not None:
            self.critical.close()
        self.audit.close()
        self.record.close()
        self.database.dispose()
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
        """Called on an association thread (or a STOW-RS request's) once an instance is durable; the receiver
        reports the association's end to ``assembler.association_ended``."""
        self.events.instance_stored(record)
        if self.shared_queue is not None and record.study_instance_uid not in self._marked:
            self.spool.mark_received_by(record.study_instance_uid, self.settings.node_id)
            if len(self._marked) >= MARKED_STUDIES_REMEMBERED:
                self._marked.clear()  # marking again is harmless (the file exists)
            self._marked.add(record.study_instance_uid)
        self.assembler.add(record, receiving=True)

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
                node=self.settings.node_id,
                database={
                    "url": shown(self.settings.database_url),
                    "backlog": self.record.backlog,
                    "error": self.record.last_error,
                },
            ),
        )
        if loop_problem:
            report["status"] = "degraded"
            report["reasons"].append(loop_problem)
        report["receiver"] = self._receiver_state()
        return report

    def _receiver_state(self) -> dict[str, Any]:
        """Which C-STORE receiver runs (the native one with its process and restarts)."""
        scp = self.scp
        if isinstance(scp, NativeReceiver):
            state: dict[str, Any] = {
                "engine": "native",
                "pid": scp.pid,
                "restarts": scp.restarts,
                "binary": str(scp.binary),
                "journal_mb": scp.settings.journal_mb,  # 0: each instance's file fsynced before its acknowledgement
            }
            if self.services_scp is not None:
                state["services"] = {"engine": "pynetdicom", "port": self.services_scp.port}
            return state
        return {"engine": "pynetdicom"}

    def _snapshot(self) -> LoopState:
        """What the event loop owns, copied; only ever run on the loop."""
        return self.runtime.snapshot() if self.runtime is not None else LoopState()

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
        if self.runtime is not None:
            self.runtime.watch.wake_threadsafe()

    def _triton_exited(self) -> None:
        """Called by the Triton supervisor the moment the server dies: workers hold from now on."""
        if self.runtime is not None:
            self.runtime.watch.unavailable_threadsafe()

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

    def _audit_pipeline_changes(self) -> None:
        """Models, rollout modes, pilots and thresholds are changed in the settings file: every change a start
        sees is kept (before / after) in the system of record and the audit log."""
        changes = record_pipeline_changes(
            self.database,
            {p.name: p.governed() for p in self.settings.pipelines},
            node=self.settings.node_id,
            source="settings at start-up",
            at=time.time(),
        )
        for change in changes:
            logger.info("pipeline %s: governed settings changed (audited)", change["pipeline"])
            self.audit.record("pipeline_changed", **change)

    def _drift_watch(self) -> DriftWatch:
        async def post(url: str, body: bytes) -> int:
            return await self.http.post(
                url,
                body,
                content_type="application/json",
                timeout_s=10.0,
                attempts=3,
                backoff=Backoff(base_s=1.0, max_s=30.0),
                what="drift alarm",
            )

        return DriftWatch(
            self.database,
            self.settings.review,
            publish=lambda stats: publish_metrics(self.metrics, stats),
            post=post,
            record_event=self.audit.record,
            executor=self.io_executor,
        )

    async def _main(self) -> None:
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
            critical=self.critical,
        )
        runtime = LoopRuntime(
            parts,
            triton_url=self.triton_url,
            local_triton=self.triton_server is not None,
            intake=self.intake,
            outbox=self.outbox,
            reports=self.reports,
            http=self.http,
            shared_queue=self.shared_queue,
            adopt=self._adopt,
        )
        self.runtime = runtime  # from here a stop() reaches it
        try:
            await runtime.prepare()
        except BaseException:
            await runtime.close()
            raise
        listener = self.orders_listener
        if listener is not None:
            await listener.start()
        drift = asyncio.create_task(self._drift_watch().run(), name="drift-watch")
        matcher = asyncio.create_task(
            self.review.reports.match_forever(self.settings.review.report_match_interval_s, self.io_executor),
            name="report-matcher",
        )
        self._ready.set()
        try:
            await runtime.run()
        finally:
            drift.cancel()
            matcher.cancel()
            if listener is not None:
                await listener.stop()
