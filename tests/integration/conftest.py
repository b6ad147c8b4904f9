"""Shared fixture: the gateway on real components, with Orthanc as the PACS, a STAT webhook, a FHIR receiver
and an MLLP listener."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.support.servers import MllpListener, Orthanc, WebhookReceiver, wait_for

CONFIG = """
data_dir = "{data_dir}"
quiet_period_s = 1.0
workers = 2
stat_webhook_url = "{webhook}"
failure_webhook_url = "{alerts}"

[fhir]
url = "{fhir}"

[hl7]
endpoint = "127.0.0.1:{mllp}"
timeout_s = 2.0

[receiver]
port = {port}
{receiver_extra}
[http]
port = 0

[triton]
url = "{triton}"

[[peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}

[[peers]]
ae_title = "STORESCU"
host = "127.0.0.1"
port = {orthanc_port}

[[pipelines]]
name = "ct_hyperdensity"
model = "ct_head_hyperdensity"
algorithm_name = "Head CT Hyperdensity Reference"
algorithm_version = "0.1.0"
mode = "triage"
report_threshold = 0.5
stat_threshold = 0.7
modalities = ["CT"]
input_size = [256, 256]
intensity = "hu"
display_window = [40.0, 80.0]
segmentation = true

[pipelines.labels]
0 = "hemorrhage"
"""


@dataclass
class Env:
    gateway: Gateway
    orthanc: Orthanc
    webhook: WebhookReceiver
    fhir: WebhookReceiver
    mllp: MllpListener
    audit: AuditLog
    data_dir: Path
    triton_url: str
    alerts: WebhookReceiver  # failure_webhook_url

    def wait_study_done(self, study_uid: str, timeout_s: float = 120.0) -> dict:
        def done() -> dict | None:
            for event in self.audit.read():
                if event["event"] == "study_done" and event["study"] == study_uid:
                    return event
            return None

        return wait_for(done, timeout_s=timeout_s, what=f"study {study_uid} to be processed")

    def results(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        return [
            pydicom.dcmread(p)
            for p in sorted((self.data_dir / "results" / study_uid).glob(f"{modality}_*.dcm"))
        ]

    def events(self, name: str, study_uid: str) -> list[dict]:
        return [e for e in self.audit.read() if e["event"] == name and e.get("study") == study_uid]


@contextlib.contextmanager
def running_env(tmp_path: Path, triton: str, receiver_extra: str = "") -> Iterator[Env]:
    """The gateway and its peers; ``receiver_extra``: more [receiver] settings."""
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"gateway": ["AI_GATEWAY", "127.0.0.1", port]}).start()
    with (
        WebhookReceiver() as webhook,
        WebhookReceiver() as fhir,
        WebhookReceiver() as alerts,
        MllpListener() as mllp,
    ):
        config = tmp_path / "gateway.toml"
        config.write_text(
            CONFIG.format(
                data_dir=tmp_path / "data",
                webhook=webhook.url,
                alerts=alerts.url.replace("/stat", "/alerts"),
                fhir=fhir.url.replace("/stat", "/fhir"),
                mllp=mllp.port,
                port=port,
                receiver_extra=receiver_extra,
                triton=triton,
                orthanc_port=orthanc.dicom_port,
            )
        )
        settings = load_settings(config)
        gateway = Gateway(settings).start()
        try:
            yield Env(
                gateway,
                orthanc,
                webhook,
                fhir,
                mllp,
                AuditLog(settings.audit_log),
                settings.data_dir,
                triton,
                alerts,
            )
        finally:
            gateway.stop()
            orthanc.stop()


@pytest.fixture
def env(tmp_path: Path, triton: str) -> Iterator[Env]:
    with running_env(tmp_path, triton) as running:
        yield running


@pytest.fixture
def native_env(tmp_path: Path, triton: str) -> Iterator[Env]:
    """The same, with the native receiver (``make native``) in front of the spool."""
    with running_env(
        tmp_path, triton, 'engine = "native"\naccept_notices = false\njournal_mb = 16\n'
    ) as running:
        yield running
