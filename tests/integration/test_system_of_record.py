"""The system of record on a running gateway, on both backends: a study sent by a real PACS (storescu) and
delivered to a real one (Orthanc) leaves its whole life in the database - states in order with their times and
node, the series analysis with its model version and hash, the delivery, every audit event - and people can ask
for it: `gateway studies`, `gateway study UID`, GET /studies and /studies/{uid}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway import cli
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.database import schema
from gateway.database.queries import StudyFilter, list_studies
from gateway.database.states import StudyState
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from gateway.ops.http_api import StateName, hash_token
from tests.support.postgres import PostgresCluster
from tests.support.servers import Orthanc, http_json, storescu, wait_for

READER = "reader-token-for-the-system-of-record-test"


def _config(tmp_path: Path, port: int, triton: str, database_url: str, orthanc: Orthanc) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n'
        f'[receiver]\nport = {port}\n[triton]\nurl = "{triton}"\n'
        f'[database]\nurl = "{database_url}"\nnode_id = "node-a"\n'
        f'[http]\nport = 0\n[[http.tokens]]\nname = "viewer"\nrole = "read-only"\nsha256 = "{hash_token(READER)}"\n'
        f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    return config


def test_a_delivered_study_leaves_its_whole_life_in_the_database(
    tmp_path: Path, triton: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    # A password in the URL (the test cluster trusts loopback, so any is accepted) must never be shown.
    database_url = database_url.replace("gateway@", "gateway:s3cret-pw@")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    config = _config(tmp_path, port, triton, database_url, orthanc)
    series = write_head_ct(tmp_path / "s", slices=12, lesions=(Lesion(x=260, y=250, slice=6),), seed=91)
    uid = series.study_uid
    gateway = Gateway(load_settings(config)).start()
    try:
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        [row] = wait_for(
            lambda: list_studies(gateway.database, StudyFilter(state="delivered")),
            timeout_s=120,
            what="the study to be delivered in the system of record",
        )
        base = f"http://127.0.0.1:{gateway.api.port}" if gateway.api is not None else ""
        code, health = http_json(f"{base}/health")
        assert health["node"] == "node-a" and health["database"]["error"] == ""
        assert "s3cret-pw" not in json.dumps(health)
        assert health["database"]["url"].startswith(database_url.split(":")[0])
        assert http_json(f"{base}/studies")[0] == 401  # a token is needed
        code, listed = http_json(f"{base}/studies?priority=ROUTINE&pacs=STORESCU", token=READER)
        assert code == 200 and [s["study_uid"] for s in listed] == [uid]
        assert http_json(f"{base}/studies?pacs=ELSEWHERE", token=READER)[1] == []
        code, timeline = http_json(f"{base}/studies/{uid}", token=READER)
        assert code == 200 and timeline["study"]["state"] == "delivered"
        assert http_json(f"{base}/studies/1.2.3.999", token=READER)[0] == 404
    finally:
        try:
            gateway.stop()
        finally:
            orthanc.stop()

    assert (row.study_uid, row.instances, row.series, row.calling_ae, row.node) == (
        uid,
        12,
        1,
        "STORESCU",
        "node-a",
    )
    assert row.findings >= 1 and row.wait_s is not None and row.wait_s >= 0
    states = [s["stage"] for s in timeline["steps"] if s["stage"] in {x.value for x in StudyState}]
    assert states == ["receiving", "complete", "queued", "analysing", "results_stored", "delivered"]
    assert all(s["node"] == "node-a" for s in timeline["steps"])
    [analysis] = timeline["analyses"]
    assert analysis["model_name"] == "ct_head_hyperdensity" and analysis["outcome"] == "analysed"
    assert len(analysis["model_hash"]) == 64 and analysis["model_version"]
    assert analysis["result_uids"] and "infer_ms" in analysis["timings"]
    assert [j["state"] for j in timeline["jobs"]] == ["done"]
    assert {d["state"] for d in timeline["deliveries"]} == {"delivered"}

    # Every audit event of the run is in the database too, with the node; the file stays as the export.
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert audit and all(e["node"] == "node-a" for e in audit)
    from gateway.database.connect import engine_for

    engine = engine_for(database_url)
    try:
        with engine.connect() as c:
            stored = c.execute(select(func.count()).select_from(schema.audit_events)).scalar_one()
            instances = c.execute(select(func.count()).select_from(schema.instances)).scalar_one()
    finally:
        engine.dispose()
    assert stored == len(audit) and instances == 12

    # The same, as people ask for it on the command line.
    assert cli.main(["studies", "--config", str(config), "--state", "delivered", "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert uid in table and "delivered" in table and "1 study" in table
    assert cli.main(["study", uid, "--config", str(config)]) == 0
    text = capsys.readouterr().out
    for stage in (
        "receiving",
        "complete",
        "queued",
        "analysing",
        "results_stored",
        "delivered",
        "series_analysed",
    ):
        assert stage in text
    assert cli.main(["study", "1.2.3.999", "--config", str(config)]) == 1
    assert cli.main(["db", "status", "--config", str(config)]) == 0
    assert "audit_events" in capsys.readouterr().out


def test_the_api_offers_every_study_state() -> None:
    assert set(StateName.__args__) == {s.value for s in StudyState}  # type: ignore[attr-defined]


def test_with_postgres_down_studies_are_still_received_analysed_and_delivered_then_recorded(
    tmp_path: Path, triton: str, postgres: PostgresCluster
) -> None:
    """The spool is the source of truth: with the database stopped for the whole study, the gateway still
    acknowledges, analyses and delivers it, /health says what is wrong, /studies answers 503; once PostgreSQL is
    back, the held writes go in and the study's full life is recorded."""
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    config = _config(tmp_path, port, triton, postgres.create_database(), orthanc)
    series = write_head_ct(tmp_path / "s", slices=8, rows=256, cols=256, seed=17)
    gateway = Gateway(load_settings(config)).start()
    audit = AuditLog(tmp_path / "data" / "audit.jsonl")
    try:
        assert gateway.api is not None
        base = f"http://127.0.0.1:{gateway.api.port}"
        postgres.stop()
        try:
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
            wait_for(
                lambda: [e for e in audit.read() if e["event"] == "results_delivered"],
                timeout_s=120,
                what="the study to be delivered while PostgreSQL is down",
            )
            health = wait_for(
                lambda: (lambda h: h if h["database"]["error"] else None)(http_json(f"{base}/health")[1]),
                timeout_s=30,
                what="/health to report the database",
            )
            assert health["status"] == "degraded" and health["database"]["backlog"] > 0
            assert any("system of record" in reason for reason in health["reasons"])
            code, answer = http_json(f"{base}/studies", token=READER)
            assert code == 503 and "cannot be read" in answer["error"]
        finally:
            postgres.restart()
        [row] = wait_for(
            lambda: list_studies(gateway.database, StudyFilter(state="delivered")),
            timeout_s=60,
            what="the held writes to reach PostgreSQL",
        )
        assert row.study_uid == series.study_uid and row.instances == 8
        assert wait_for(lambda: http_json(f"{base}/health")[1]["database"]["error"] == "", timeout_s=30)
    finally:
        try:
            gateway.stop()
        finally:
            orthanc.stop()
