"""The HTTP API against its own OpenAPI document: schemathesis generates requests (valid and invalid) for every
operation of a running gateway and checks each answer - no server error, documented status codes, content
types and response schemas, and the bearer-token roles enforced."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.delivery.outbox import DeliveryJob
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from tests.support.servers import http_json

OPERATOR = secrets.token_urlsafe(24)
READER = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("http_api")
    config = tmp / "gateway.toml"
    # No Triton is needed to serve the API: a remote one that is not there keeps the gateway degraded (503).
    config.write_text(
        f'data_dir = "{tmp / "data"}"\n[receiver]\nport = {free_port()}\n'
        f'[triton]\nurl = "127.0.0.1:{free_port()}"\n[http]\nport = 0\n'
        f'[[http.tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{hash_token(OPERATOR)}"\n'
        f'[[http.tokens]]\nname = "viewer"\nrole = "read-only"\nsha256 = "{hash_token(READER)}"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.api is not None
        for n in range(3):  # something for the admin endpoints to list and move
            gateway.outbox._write(
                gateway.outbox.dead_dir,
                DeliveryJob(
                    job_id=f"dead{n}",
                    study_uid=f"1.2.3.{n}",
                    destination="X@127.0.0.1:1",
                    paths=[],
                    created_at=float(n),
                ),
            )
        yield f"http://127.0.0.1:{gateway.api.port}"
    finally:
        gateway.stop()


def test_every_operation_conforms_to_the_openapi_document(gateway_url: str, tmp_path: Path) -> None:
    # The schemathesis command line (its pytest plugin does not follow pytest 9): every check (all are on by
    # default; schemathesis.toml turns off the 5xx check for /health only), examples that
    # fit the document and examples that do not, with the operator token; a failed check fails the test.
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{gateway_url}/openapi.json",
            "--max-examples",
            "60",
            "--seed",
            "20261202",
            "--header",
            f"Authorization: Bearer {OPERATOR}",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        # Our hooks only (STOW-RS bodies), importable from the repository root.
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    [junit] = tmp_path.glob("junit*.xml")
    report = junit.read_text()
    # Every operation of the document was exercised.
    for operation in (
        "GET /health",
        "GET /metrics",
        "GET /admin/dead-letters",
        "POST /admin/resend",
        "GET /studies",
        "GET /studies/{study_uid}",
    ):
        assert operation in report


def test_the_document_lists_the_endpoints_and_their_token_scheme(gateway_url: str) -> None:
    status, document = http_json(f"{gateway_url}/openapi.json")
    assert status == 200
    assert set(document["paths"]) == {
        "/health",
        "/metrics",
        "/admin/dead-letters",
        "/admin/resend",
        "/studies",
        "/studies/{study_uid}",
        "/critical-results/{study_uid}",
        "/critical-results/{study_uid}/acknowledge",
        "/critical-results/acknowledge",
        "/critical-results/acknowledge/confirm",
        "/studies/{study_uid}/findings",
        "/studies/{study_uid}/verdicts",
        "/studies/{study_uid}/verdicts/fhir",
        "/studies/{study_uid}/comparisons",
        "/qa/discrepancies",
        "/qa/discrepancies/{item}/assign",
        "/qa/discrepancies/{item}/close",
        "/admin/pipelines",
        "/studies/{study_uid}/images/{sop_uid}/rendered",
        "/studies/{study_uid}/images/{sop_uid}/heatmap",
        "/models/statistics",
    }
    verdicts = document["paths"]["/studies/{study_uid}/verdicts"]["post"]
    assert verdicts["security"] == [{"HTTPBearer": []}]
    assert {"201", "404", "409", "422"} <= set(verdicts["responses"])
    acknowledge = document["paths"]["/critical-results/{study_uid}/acknowledge"]["post"]
    assert acknowledge["security"] == [{"HTTPBearer": []}]
    assert "security" not in document["paths"]["/critical-results/acknowledge/confirm"]["post"]  # signed
    assert document["paths"]["/studies"]["get"]["security"] == [{"HTTPBearer": []}]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in document["paths"]["/health"]["get"]
    assert document["paths"]["/admin/resend"]["post"]["security"] == [{"HTTPBearer": []}]


def test_roles_errors_and_the_body_limit(gateway_url: str) -> None:
    assert http_json(f"{gateway_url}/admin/dead-letters")[0] == 401
    status, listed = http_json(f"{gateway_url}/admin/dead-letters", token=READER)
    assert status == 200 and isinstance(listed, list)
    status, error = http_json(f"{gateway_url}/admin/resend", method="POST", token=READER, body={})
    assert status == 403 and "operator" in error["error"]
    status, error = http_json(
        f"{gateway_url}/admin/resend", method="POST", token=OPERATOR, body={"jobs": "all"}
    )
    assert status == 400 and "jobs" in error["error"]
    assert http_json(f"{gateway_url}/nowhere") == (404, {"error": "not found"})
    # A body over the limit is refused on its declared length, before it is read: the client sends the headers
    # and reads the answer (sending 2 MB first races the server's early close: a broken pipe, not a status).
    host, port = gateway_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", "/admin/resend")
        connection.putheader("Authorization", f"Bearer {OPERATOR}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2_000_000))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "body over" in json.loads(response.read())["error"]
    finally:
        connection.close()
