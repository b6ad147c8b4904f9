"""FHIR and HL7 delivery on the event loop: a silent RIS costs no thread and never holds the loop; what is
still retrying at stop is cancelled after a bounded wait and stays on disk."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from gateway.config.settings import load_settings
from gateway.demo.phantoms import write_head_ct
from gateway.ops.audit import AuditLog
from gateway.reporting.dispatcher import ReportDispatcher
from gateway.results.content import SeriesReport, reported_findings
from preprocessing.series import load_series
from tests.support.analysis import make_analysis, make_finding


@pytest.fixture
def silent_endpoint() -> object:
    """A TCP endpoint that accepts connections and never answers (a hung RIS)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.listen(16)
    yield server
    server.close()


def _report(tmp_path: Path) -> SeriesReport:
    loaded = load_series(write_head_ct(tmp_path / "ct", slices=3, rows=64, cols=64).paths)
    analysis = make_analysis(loaded, (make_finding(loaded, 1, 0.95),), stat=True)
    return SeriesReport(
        analysis=analysis, findings=tuple(reported_findings(analysis)), sr_sop_instance_uid="1.2.3"
    )


def _dispatcher(tmp_path: Path, port: int, audit: AuditLog) -> ReportDispatcher:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[fhir]\nurl = "http://127.0.0.1:{port}/fhir"\ntimeout_s = 0.5\nattempts = 2\n'
        f'[hl7]\nendpoint = "127.0.0.1:{port}"\ntimeout_s = 0.5\nattempts = 2\n'
    )
    return ReportDispatcher(load_settings(config), audit, backoff_s=0.05)


def test_a_silent_ris_holds_no_thread_and_never_blocks_the_loop(
    tmp_path: Path, silent_endpoint: socket.socket
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    dispatcher = _dispatcher(tmp_path, silent_endpoint.getsockname()[1], audit)
    folder = tmp_path / "results"
    folder.mkdir()
    report = _report(tmp_path)

    async def scenario() -> tuple[float, int, float]:
        threads_before = threading.active_count()
        started = time.perf_counter()
        dispatcher.submit(folder, [report], stat=True)
        submitted = time.perf_counter() - started
        # While FHIR and HL7 wait on the silent endpoint (2 tries of 0.5 s each at least), other work on the
        # loop goes on: 20 short sleeps finish long before the deliveries give up.
        for _ in range(20):
            await asyncio.sleep(0.01)
        ticked = time.time()
        threads_during = threading.active_count() - threads_before
        await dispatcher.drain(10.0)
        return submitted, threads_during, ticked

    submitted, extra_threads, ticked = asyncio.run(scenario())
    assert submitted < 0.05, "submit returns at once"
    # The documents are written in the default executor (one thread at most); the deliveries add none.
    assert extra_threads <= 1
    events = {e["event"]: e for e in audit.read()}
    assert ticked < min(events["fhir_failed"]["time"], events["hl7_failed"]["time"]), "the loop was held"
    reason = events["fhir_failed"]["reason"]
    assert "after 2 tries" in reason and "no answer within 0.5 s" in reason
    assert "after 2 tries" in events["hl7_failed"]["reason"]
    assert {p.name.split("_")[0] for p in folder.iterdir()} == {"FHIR", "HL7"}


def test_a_stop_waits_a_bounded_time_then_cancels_what_still_retries(
    tmp_path: Path, silent_endpoint: socket.socket
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    dispatcher = _dispatcher(tmp_path, silent_endpoint.getsockname()[1], audit)
    folder = tmp_path / "results"
    folder.mkdir()

    async def scenario() -> float:
        dispatcher.submit(folder, [_report(tmp_path)], stat=False)
        await asyncio.sleep(0.3)  # written, now waiting on the silent endpoint
        started = time.perf_counter()
        await dispatcher.drain(0.2)
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 1.0
    assert list(folder.glob("FHIR_*.json")) and list(folder.glob("HL7_ORU_*.hl7"))
