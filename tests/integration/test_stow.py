"""DICOMweb STOW-RS into the gateway over HTTPS with bearer tokens, from real clients: the `dicomweb-client`
package and Orthanc's DICOMweb plugin. What is answered 200 is on disk, and a study stored this way is analysed
and its results delivered like a study sent by C-STORE."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.core.errors import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from gateway.ops.http_api import hash_token
from tests.support.pki import make_pki
from tests.support.servers import Orthanc, wait_for

pytestmark = pytest.mark.integration

SENDER, VIEWER = "sender-token-for-the-tests", "viewer-token-for-the-tests"
BOUNDARY = "stow-test-boundary"
PIPELINE = """
[[pipelines]]
name = "ct_hyperdensity"
model = "ct_head_hyperdensity"
algorithm_version = "0.1.0"
modalities = ["CT"]
input_size = [256, 256]
[pipelines.labels]
0 = "hemorrhage"
"""


@dataclass
class StowEnv:
    gateway: Gateway
    url: str
    ca: Path
    orthanc: Orthanc
    data: Path

    def done(self, study_uid: str) -> list[dict]:
        audit = AuditLog(self.data / "audit.jsonl")
        return [e for e in audit.read() if e["event"] == "study_done" and e.get("study") == study_uid]


@pytest.fixture
def stow_env(tmp_path: Path, triton: str) -> Iterator[StowEnv]:
    pki = make_pki(tmp_path / "pki")
    orthanc = Orthanc(tmp_path / "orthanc").start()  # the sender's PACS: results go back to it
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n[receiver]\nport = {free_port()}\n'
        f'[triton]\nurl = "{triton}"\n'
        f'[http]\nport = 0\ntls_cert_file = "{pki["server.pem"]}"\ntls_key_file = "{pki["server.key"]}"\n'
        "stow_max_bytes = 16777216\n"
        f'[[http.tokens]]\nname = "vna"\nrole = "sender"\nae_title = "VNA"\nsha256 = "{hash_token(SENDER)}"\n'
        f'[[http.tokens]]\nname = "viewer"\nrole = "read-only"\nsha256 = "{hash_token(VIEWER)}"\n'
        f'[[peers]]\nae_title = "VNA"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n' + PIPELINE
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.api is not None
        yield StowEnv(
            gateway, f"https://127.0.0.1:{gateway.api.port}", pki["ca.pem"], orthanc, tmp_path / "data"
        )
    finally:
        gateway.stop()
        orthanc.stop()


def _multipart(parts: list[bytes]) -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def test_dicomweb_client_stores_a_study_that_is_analysed_and_delivered(
    stow_env: StowEnv, tmp_path: Path
) -> None:
    series = write_head_ct(tmp_path / "s", slices=8, lesions=(Lesion(x=260, y=250, slice=4),), seed=61)
    datasets = [pydicom.dcmread(p) for p in series.paths]
    session = requests.Session()
    session.verify = str(stow_env.ca)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, replaces the session's CA
    client = DICOMwebClient(stow_env.url, session=session, headers={"Authorization": f"Bearer {SENDER}"})
    response = client.store_instances(datasets)  # over 1 MB: dicomweb-client sends it chunked
    stored = sorted(i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence)
    assert stored == sorted(ds.SOPInstanceUID for ds in datasets) and "FailedSOPSequence" not in response
    # Answered = on disk: every instance is in the spool the moment the response is read.
    spooled = {p.stem for p in (stow_env.data / "spool" / series.study_uid).glob("*/*.dcm")}
    assert spooled == set(stored)

    [done] = wait_for(lambda: stow_env.done(series.study_uid), timeout_s=90, what="the STOW study analysed")
    assert done["calling_ae"] == "VNA" and done["instances"] == 8 and done["results"]
    delivered = wait_for(
        lambda: [
            s
            for s in stow_env.orthanc.series_of_study(series.study_uid)
            if s["MainDicomTags"]["Modality"] == "SR"
        ],
        timeout_s=60,
        what="the SR delivered to the sender's PACS",
    )
    assert delivered


def test_stow_refuses_what_it_must_with_the_standard_statuses(stow_env: StowEnv, tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "s", slices=2, rows=64, cols=64, seed=62)
    files = [p.read_bytes() for p in series.paths]
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    with httpx.Client(
        base_url=stow_env.url, verify=ssl.create_default_context(cafile=str(stow_env.ca))
    ) as http:

        def post(body: bytes, token: str | None = SENDER, path: str = "/studies", ctype: str = content_type):
            headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})}
            return http.post(path, content=body, headers=headers)

        assert post(_multipart(files), token=None).status_code == 401
        assert post(_multipart(files), token=VIEWER).status_code == 403  # read-only may not store
        assert post(_multipart(files), ctype="application/dicom").status_code == 415
        assert post(b"no parts here", ctype="multipart/related; type=application/dicom").status_code == 400
        assert post(b"x" * (17 << 20)).status_code == 413  # over stow_max_bytes (16 MiB)
        assert not (stow_env.data / "spool" / series.study_uid).exists()
        # A sender token may not read the system of record.
        assert http.get("/studies", headers={"Authorization": f"Bearer {SENDER}"}).status_code == 403

        mixed = post(_multipart([files[0], b"\x00" * 128 + b"DICM broken"]))
        assert mixed.status_code == 202 and mixed.headers["content-type"] == "application/dicom+json"
        answer = pydicom.Dataset.from_json(mixed.json())
        assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
            pydicom.dcmread(series.paths[0]).SOPInstanceUID
        ]
        assert [int(i.FailureReason) for i in answer.FailedSOPSequence] == [STATUS_CANNOT_UNDERSTAND]

        other = post(_multipart(files[1:]), path="/studies/1.2.826.0.1.3680043.8.498.1")
        assert other.status_code == 409
        failed = pydicom.Dataset.from_json(other.json()).FailedSOPSequence
        assert [int(i.FailureReason) for i in failed] == [STATUS_DATASET_MISMATCH]
        assert post(_multipart(files[1:]), path=f"/studies/{series.study_uid}").status_code == 200
    assert {p.stem for p in (stow_env.data / "spool" / series.study_uid).glob("*/*.dcm")} == {
        pydicom.dcmread(p).SOPInstanceUID for p in series.paths
    }


def test_orthancs_dicomweb_plugin_sends_a_study_to_the_gateway(stow_env: StowEnv, tmp_path: Path) -> None:
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    source = Orthanc(
        tmp_path / "source",
        aet="SOURCE",
        extra={
            "Plugins": [str(plugin)],
            "HttpsVerifyPeers": True,
            "HttpsCACertificates": str(stow_env.ca),
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    "gateway": {
                        "Url": stow_env.url + "/",
                        "HttpHeaders": {"Authorization": f"Bearer {SENDER}"},
                    }
                },
            },
        },
    ).start()
    try:
        series = write_head_ct(tmp_path / "s", slices=4, rows=128, cols=128, seed=63)
        source.upload(list(series.paths))
        [study] = source.get("/studies")
        source.post("/dicom-web/servers/gateway/stow", f'{{"Resources": ["{study}"]}}')
        spooled = {p.stem for p in (stow_env.data / "spool" / series.study_uid).glob("*/*.dcm")}
        assert spooled == {pydicom.dcmread(p).SOPInstanceUID for p in series.paths}
        [done] = wait_for(lambda: stow_env.done(series.study_uid), timeout_s=90, what="the study analysed")
        assert done["calling_ae"] == "VNA" and done["instances"] == 4
    finally:
        source.stop()


def test_stow_over_mutual_tls_needs_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\n[triton]\nurl = "127.0.0.1:1"\n'
        f'[http]\nport = 0\ntls_cert_file = "{pki["server.pem"]}"\ntls_key_file = "{pki["server.key"]}"\n'
        f'tls_ca_file = "{pki["ca.pem"]}"\n'
        f'[[http.tokens]]\nname = "vna"\nrole = "sender"\nsha256 = "{hash_token(SENDER)}"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.api is not None
        url = f"https://127.0.0.1:{gateway.api.port}/studies"
        series = write_head_ct(tmp_path / "s", slices=1, rows=32, cols=32)
        body = _multipart([series.paths[0].read_bytes()])
        headers = {
            "Authorization": f"Bearer {SENDER}",
            "Content-Type": f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        }
        mutual = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        mutual.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert httpx.post(url, content=body, headers=headers, verify=mutual).status_code == 200
        with pytest.raises(httpx.HTTPError):  # the handshake fails without a client certificate
            httpx.post(
                url,
                content=body,
                headers=headers,
                verify=ssl.create_default_context(cafile=str(pki["ca.pem"])),
            )
    finally:
        gateway.stop()
