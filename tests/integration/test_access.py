"""Access control on the DICOM port: DICOM TLS with a locally generated CA (mutual TLS), and the source-address
allow-list."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from clients.dicom_scu import echo, store_datasets
from gateway.app import Gateway
from gateway.config.settings import Peer, load_settings
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from tests.support.pki import make_pki
from tests.support.servers import storescu

pytestmark = pytest.mark.integration


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    return echo(Peer.parse(f"AI_GATEWAY@127.0.0.1:{port}"), calling_ae="TLS_SCU", ssl_context=context)


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_dicom_tls_with_client_certificates(tmp_path: Path, triton: str, engine: str) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
        f'[receiver]\nport = {port}\ntls_cert_file = "{pki["server.pem"]}"\ntls_key_file = "{pki["server.key"]}"\n'
        f'tls_ca_file = "{pki["ca.pem"]}"\nengine = "{engine}"\naccept_notices = {str(engine != "native").lower()}\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.health()["receiver"]["engine"] == engine
        mutual = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        mutual.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert _echo(port, mutual)
        # A study over TLS is stored like any other.
        series = write_head_ct(tmp_path / "s", slices=1, rows=64, cols=64)
        peer = Peer.parse(f"AI_GATEWAY@127.0.0.1:{port}")
        report = store_datasets(
            [pydicom.dcmread(series.paths[0])], peer, calling_ae="TLS_SCU", ssl_context=mutual
        )
        assert report.ok and report.sent == 1
        assert list((tmp_path / "data" / "spool" / series.study_uid).glob("*/*.dcm"))
        # Without a client certificate, or without TLS at all, nothing gets through.
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        assert not _echo(port, anonymous)
        assert not _echo(port, None)
        # The command line speaks TLS too.
        cli = [
            sys.executable,
            "-m",
            "gateway",
            "echo",
            f"AI_GATEWAY@127.0.0.1:{port}",
            "--tls-ca",
            str(pki["ca.pem"]),
        ]
        mutual_cli = subprocess.run(
            [*cli, "--tls-cert", str(pki["client.pem"]), "--tls-key", str(pki["client.key"])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert mutual_cli.returncode == 0 and "success" in mutual_cli.stdout
        assert subprocess.run(cli, capture_output=True, text=True, timeout=60).returncode == 2
    finally:
        gateway.stop()


def test_source_address_allow_list(tmp_path: Path, triton: str) -> None:
    series = write_head_ct(tmp_path / "s", slices=1, rows=64, cols=64)
    for allowed, accepted in ((["10.9.8.7"], False), (["127.0.0.1"], True)):
        port = free_port()
        config = tmp_path / f"gateway-{accepted}.toml"
        config.write_text(
            f'data_dir = "{tmp_path / f"data-{accepted}"}"\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
            f"[receiver]\nport = {port}\nallowed_addresses = {allowed!r}\n".replace("'", '"')
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            result = storescu(list(series.paths), port=port, calling_ae="ANY")
            assert (result.returncode == 0) is accepted, result.stderr
            stored = list((tmp_path / f"data-{accepted}" / "spool").glob("*/*/*.dcm"))
            assert bool(stored) is accepted
        finally:
            gateway.stop()
