"""Graceful degradation on real components: Triton outage under load, a destination PACS that is down, the disk
watermark, health/metrics endpoints and the token-protected admin API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import TritonServer, free_port
from gateway.ops.audit import AuditLog
from gateway.ops.http_api import hash_token
from tests.support.servers import Orthanc, http_json, storescu, wait_for

pytestmark = pytest.mark.integration

PIPELINE = (
    '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
)


def _done(audit: AuditLog) -> list[str]:
    return [e["study"] for e in audit.read() if e["event"] == "study_done"]


def test_triton_outage_queues_studies_reports_degraded_and_works_off_stat_first(
    tmp_path: Path, model_repository: Path
) -> None:
    triton = TritonServer(model_repository, tmp_path / "triton", grpc_port=free_port()).start()
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 1\n'
        f'[receiver]\nport = {port}\nallowed_calling_aes = ["STORESCU"]\n[http]\nport = 0\n'
        f'[triton]\nurl = "{triton.grpc_url}"\nretry_max_s = 2.0\n' + PIPELINE
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    gateway = Gateway(settings).start()
    assert gateway.api is not None
    health_url = f"http://127.0.0.1:{gateway.api.port}/health"
    try:
        wait_for(lambda: http_json(health_url)[0] == 200, timeout_s=20, what="healthy gateway")
        triton.stop()
        outage_started = time.monotonic()
        _, health = wait_for(
            lambda: (r := http_json(health_url))[0] == 503 and r, timeout_s=30, what="degraded health"
        )
        assert health["status"] == "degraded" and "Triton" in health["reasons"][0]
        routine = [
            write_head_ct(tmp_path / f"r{i}", slices=8, rows=256, cols=256, seed=70 + i) for i in range(3)
        ]
        stat = write_head_ct(tmp_path / "stat", slices=8, rows=256, cols=256, seed=79, priority="STAT")
        for series in [*routine, stat]:  # the PACS is never blocked while Triton is down
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        time.sleep(4.0)
        assert _done(audit) == [], "nothing can finish while Triton is down"
        assert http_json(health_url)[1]["queue"]["STAT"] + http_json(health_url)[1]["queue"]["ROUTINE"] >= 1
        triton = TritonServer(model_repository, tmp_path / "triton2", grpc_port=triton.grpc_port).start()
        outage_s = time.monotonic() - outage_started
        expected = {s.study_uid for s in [*routine, stat]}
        wait_for(lambda: expected <= set(_done(audit)), timeout_s=120, what="the backlog to be worked off")
        order = _done(audit)
        assert order[0] == stat.study_uid, "the STAT study leaves the backlog first"
        assert wait_for(lambda: http_json(health_url)[0] == 200, timeout_s=30, what="health back to ok")
        metrics = http_json(f"http://127.0.0.1:{gateway.api.port}/metrics")[1]
        retries = [
            line for line in metrics.splitlines() if line.startswith("gateway_inference_retries_total")
        ]
        assert retries and float(retries[0].split()[-1]) >= 1
        assert "gateway_stage_seconds_bucket" in metrics and "gateway_triton_up 1.0" in metrics
        print(
            f"\nTriton outage {outage_s:.1f}s: {len(expected)} studies delayed, 0 lost; STAT finished first"
        )
    finally:
        gateway.stop()
        triton.stop()


def test_failing_destination_never_stalls_others_and_dead_letters_can_be_resent(
    tmp_path: Path, triton: str
) -> None:
    good = Orthanc(tmp_path / "good").start()
    down_port = free_port()
    port = free_port()
    operator, reader = "operator-secret-token", "reader-secret-token"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n'
        f'[receiver]\nport = {port}\n[triton]\nurl = "{triton}"\n'
        "[delivery]\nmax_attempts = 3\nretry_base_s = 0.2\nretry_max_s = 0.5\ntimeout_s = 5\n"
        "[http]\nport = 0\n"
        f'[[http.tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{hash_token(operator)}"\n'
        f'[[http.tokens]]\nname = "viewer"\nrole = "read-only"\nsha256 = "{hash_token(reader)}"\n'
        f'[[peers]]\nae_title = "PACS_DOWN"\nhost = "127.0.0.1"\nport = {down_port}\n'
        f'[[peers]]\nae_title = "PACS_UP"\nhost = "127.0.0.1"\nport = {good.dicom_port}\n' + PIPELINE
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    gateway = Gateway(settings).start()
    revived: Orthanc | None = None
    try:
        assert gateway.api is not None
        base = f"http://127.0.0.1:{gateway.api.port}"
        to_down = write_head_ct(tmp_path / "a", slices=6, rows=256, cols=256, seed=81)
        to_up = write_head_ct(tmp_path / "b", slices=6, rows=256, cols=256, seed=82)
        assert storescu(list(to_down.paths), port=port, calling_ae="PACS_DOWN").returncode == 0
        assert storescu(list(to_up.paths), port=port, calling_ae="PACS_UP").returncode == 0
        # The healthy PACS gets its results although the other destination keeps failing.
        wait_for(
            lambda: good.series_of_study(to_up.study_uid), timeout_s=60, what="results at the healthy PACS"
        )
        dead = wait_for(
            lambda: [e for e in audit.read() if e["event"] == "delivery_dead_letter"],
            timeout_s=60,
            what="dead letter",
        )
        assert dead[0]["study"] == to_down.study_uid and dead[0]["destination"].startswith("PACS_DOWN@")
        status, health = http_json(f"{base}/health")
        assert (
            status == 503 and any("PACS_DOWN" in r for r in health["reasons"]) and health["dead_letters"] == 1
        )

        # Admin API: no token -> 401, read-only may list but not resend -> 403.
        assert http_json(f"{base}/admin/dead-letters")[0] == 401
        status, listed = http_json(f"{base}/admin/dead-letters", token=reader)
        assert status == 200 and listed[0]["study_uid"] == to_down.study_uid
        assert http_json(f"{base}/admin/resend", method="POST", token=reader, body={})[0] == 403
        assert http_json(f"{base}/admin/resend", method="POST", token="wrong", body={})[0] == 401

        # The destination comes back; the CLI re-queues the dead letter and it is delivered.
        revived = Orthanc(tmp_path / "revived", dicom_port=down_port).start()
        cli = subprocess.run(
            [sys.executable, "-m", "gateway", "resend", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0 and "re-queued 1 of 1" in cli.stdout
        wait_for(lambda: revived.series_of_study(to_down.study_uid), timeout_s=60, what="re-sent results")
        assert http_json(f"{base}/health")[1]["dead_letters"] == 0

        # The operator token can re-send through the API as well (nothing left to re-send now).
        assert http_json(f"{base}/admin/resend", method="POST", token=operator, body={}) == (
            200,
            {"resent": []},
        )
    finally:
        gateway.stop()
        good.stop()
        if revived is not None:
            revived.stop()


def test_disk_watermark_refuses_with_out_of_resources_and_stores_nothing(tmp_path: Path, triton: str) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {port}\nmin_free_disk_mb = 1000000000\n'
        f'[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        series = write_head_ct(tmp_path / "x", slices=1, rows=64, cols=64)
        import pydicom

        ds: Dataset = pydicom.dcmread(series.paths[0])
        ae = AE(ae_title="ANY_SCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert int(status.Status) == 0xA700
        assert not (tmp_path / "data" / "spool" / series.study_uid).exists()
        assert gateway.api is not None
        code, health = http_json(f"http://127.0.0.1:{gateway.api.port}/health")
        assert code == 503 and any("watermark" in r for r in health["reasons"])
    finally:
        gateway.stop()
