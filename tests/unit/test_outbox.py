"""Result delivery order and batching: STAT results overtake other studies' results, a study's own results keep
their order, several jobs share one association - checked against a real pynetdicom SCP on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

from benchmarks.phantoms import write_head_ct
from gateway.config.settings import DeliverySettings, Peer
from gateway.delivery.outbox import DeliveryJob, Outbox, next_batch
from gateway.inference.server import free_port


def _job(n: int, study: str, priority: str = "ROUTINE") -> DeliveryJob:
    return DeliveryJob(
        job_id=f"j{n}",
        study_uid=study,
        destination="X@127.0.0.1:1",
        paths=[],
        created_at=float(n),
        priority=priority,
    )


def test_stat_first_oldest_first_and_never_ahead_of_an_earlier_job_of_its_study() -> None:
    jobs = [_job(1, "A"), _job(2, "B"), _job(3, "C", "STAT"), _job(4, "A", "STAT"), _job(5, "D", "URGENT")]
    order = [j.job_id for j in next_batch(jobs)]
    # C is STAT; A's STAT job (j4) must wait for A's earlier routine job (j1), which therefore goes with it.
    assert order == ["j3", "j1", "j4", "j5", "j2"]
    assert [j.job_id for j in next_batch(jobs, limit=2)] == ["j3", "j1"]


def test_pending_jobs_go_over_one_association_stat_first(tmp_path: Path) -> None:
    received: list[str] = []
    associations: list[int] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            received.append(str(event.dataset.StudyInstanceUID))
        return 0x0000

    def on_accept(event: Any) -> None:
        with lock:
            associations.append(1)

    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accept)],
    )
    outbox = Outbox(tmp_path / "outbox", DeliverySettings(), calling_ae="AI_GATEWAY")
    try:
        peer = Peer.parse(f"PACS@127.0.0.1:{port}")
        studies = []
        for i, priority in enumerate(["ROUTINE", "ROUTINE", "ROUTINE", "STAT"]):
            series = write_head_ct(tmp_path / f"s{i}", slices=1, rows=32, cols=32, seed=i)
            uid = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).StudyInstanceUID)
            studies.append(uid)
            outbox.enqueue(peer, uid, list(series.paths), priority=priority)
            time.sleep(0.01)  # distinct creation times
        outbox.start()  # everything is pending before the worker starts: one batch
        deadline = time.time() + 20
        while len(received) < 4 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        outbox.stop()
        server.shutdown()
    assert received == [studies[3], studies[0], studies[1], studies[2]]  # the STAT study first
    assert len(associations) == 1
    assert sum(outbox.pending().values()) == 0
