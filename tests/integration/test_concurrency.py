"""The concurrency model holds under load: the event loop owns the job queue and the study tracker, HTTP threads
read only snapshots the loop hands them, and /health and /metrics driven hard while studies flow never fail."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from gateway.orchestration.scheduler import JobQueue
from tests.support.servers import http_json, storescu, wait_for

pytestmark = pytest.mark.integration

PIPELINE = (
    '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
)
OBSERVERS = ("waiting", "depth_by_priority", "depth_by_pacs", "qsize")


def _gateway(tmp_path: Path, triton: str, port: int) -> Gateway:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n'
        f"[receiver]\nport = {port}\n[http]\nport = 0\n"
        f'[triton]\nurl = "{triton}"\n' + PIPELINE
    )
    return Gateway(load_settings(config))


def test_http_threads_never_touch_the_job_queue(
    tmp_path: Path, triton: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read of the queue happens on the event loop's thread, however /health and /metrics are called.
    (Before: the HTTP handler thread iterated the queue's deques while the loop appended to them.)"""
    readers: list[str] = []

    def watched(name: str) -> Callable[..., Any]:
        original = getattr(JobQueue, name)

        def call(self: JobQueue, *args: Any, **kwargs: Any) -> Any:
            readers.append(threading.current_thread().name)
            return original(self, *args, **kwargs)

        return call

    for name in OBSERVERS:
        monkeypatch.setattr(JobQueue, name, watched(name))
    gateway = _gateway(tmp_path, triton, free_port()).start()
    try:
        assert gateway.api is not None
        base = f"http://127.0.0.1:{gateway.api.port}"
        for _ in range(5):
            assert http_json(f"{base}/health")[0] == 200
            assert http_json(f"{base}/metrics")[0] == 200
        assert readers, "health and metrics report the queue"
        assert set(readers) == {"gateway-loop"}, sorted(set(readers))
    finally:
        gateway.stop()


def test_health_and_metrics_driven_hard_while_studies_flow_never_fail(tmp_path: Path, triton: str) -> None:
    port = free_port()
    gateway = _gateway(tmp_path, triton, port).start()
    audit = AuditLog(gateway.settings.audit_log)
    studies = [write_head_ct(tmp_path / f"s{i}", slices=6, rows=128, cols=128, seed=70 + i) for i in range(6)]
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def hammer(path: str) -> None:
        while not stop.is_set():
            try:
                status, body = http_json(f"http://127.0.0.1:{gateway.api.port}{path}")  # type: ignore[union-attr]
            except Exception as exc:  # a reset connection or a timeout is a failure too
                failures.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            calls[0] += 1
            if status != 200 or (path == "/health" and body.get("status") != "ok"):
                failures.append(f"{path}: {status} {str(body)[:200]}")
            elif path == "/metrics" and "gateway_queue_depth" not in body:
                failures.append(f"{path}: no queue gauge in {len(body)} bytes")

    threads = [threading.Thread(target=hammer, args=(p,), daemon=True) for p in ("/health", "/metrics") * 2]
    try:
        for t in threads:
            t.start()
        for study in studies:
            assert storescu(list(study.paths), port=port, calling_ae="STORESCU").returncode == 0
        wait_for(
            lambda: (
                {s.study_uid for s in studies}
                <= {e["study"] for e in audit.read() if e["event"] == "study_done"}
            ),
            timeout_s=120,
            what="every study analysed",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        gateway.stop()
    print(f"\n{calls[0]} health / metrics calls while {len(studies)} studies flowed")
    assert calls[0] > 50, "the endpoints were driven hard"
    assert failures == [], failures[:5]


class _BlackHole:
    """An HTTP endpoint that accepts connections and never answers (a hung webhook receiver)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/stat"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_hung_stat_webhook_never_holds_an_analysis_worker(tmp_path: Path, triton: str) -> None:
    """The STAT log line goes out at once and the study completes while the webhook's retries (3 tries of 5 s)
    are still running; the failed webhook is audited afterwards. (Before: the worker waited about 16 s.)"""
    hole = _BlackHole()
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\nstat_webhook_url = "{hole.url}"\n'
        f'[receiver]\nport = {port}\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'mode = "triage"\nstat_threshold = 0.5\nmodalities = ["CT"]\ninput_size = [256, 256]\n'
        '[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        series = write_head_ct(tmp_path / "s", slices=12, lesions=(Lesion(x=260, y=250, slice=6),), seed=91)
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        events = wait_for(
            lambda: (
                [e["event"] for e in gateway.audit.read() if e["event"] == "stat_notification_failed"]
                and [e["event"] for e in gateway.audit.read()]
            ),
            timeout_s=90,
            what="the hung webhook to be given up",
        )
        [analysed] = [e for e in gateway.audit.read() if e["event"] == "series_analysed"]
        assert analysed["stat"] is True
        assert events.index("series_analysed") < events.index("stat_notification_failed")
        assert events.index("study_done") < events.index("stat_notification_failed"), events
    finally:
        gateway.stop()
        hole.close()


def test_the_loop_never_does_file_io_or_dicom_parsing_itself(
    tmp_path: Path, triton: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-opening a study (its headers read back from the spool), the processed marker, the audit trail's
    fsynced appends, the delivery job file, the superseded results, the FHIR / HL7 documents: all off the event
    loop's thread. (Before: the loop parsed every spooled header of a re-sent study and fsynced the marker and
    every audit event.)"""
    from gateway.delivery.outbox import Outbox
    from gateway.ingest.spool import Spool
    from gateway.orchestration import series_pipeline
    from gateway.reporting.dispatcher import ReportDispatcher

    callers: dict[str, set[str]] = {}

    def watched(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            callers.setdefault(name, set()).add(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    audited_first: list[bool] = []
    original_mark = Spool.mark_processed

    def mark_processed(spool: Spool, study_uid: str, *args: Any, **kwargs: Any) -> None:
        # The study's study_done event is already on disk when its marker is written (the crash-safe order).
        audit = AuditLog(spool.root.parent / "audit.jsonl")
        audited_first.append(any(e["study"] == study_uid for e in audit.read() if e["event"] == "study_done"))
        original_mark(spool, study_uid, *args, **kwargs)

    monkeypatch.setattr(Spool, "mark_processed", mark_processed)
    for owner, name in (
        (AuditLog, "_write"),
        (Spool, "study_records"),
        (Spool, "mark_processed"),
        (Outbox, "enqueue"),
        (ReportDispatcher, "write_documents"),
        (series_pipeline, "superseded"),
    ):
        watched(owner, name)
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n'
        f'[receiver]\nport = {port}\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
        f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {free_port()}\n' + PIPELINE
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        series = write_head_ct(tmp_path / "s", slices=6, rows=128, cols=128, seed=77)
        for sent in (1, 2):  # the second time the study is re-opened from the spool
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
            wait_for(
                lambda n=sent: [e for e in gateway.audit.read() if e["event"] == "study_done"][n - 1 :],
                timeout_s=90,
                what=f"study done ({sent})",
            )
    finally:
        gateway.stop()
    assert set(callers) == {
        "_write",
        "study_records",
        "mark_processed",
        "enqueue",
        "write_documents",
        "superseded",
    }, callers
    assert audited_first == [True, True]
    on_loop = {name for name, threads in callers.items() if "gateway-loop" in threads}
    assert on_loop == set(), callers
