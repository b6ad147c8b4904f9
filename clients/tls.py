"""TLS server contexts, one way for every listener of the gateway (DICOM, HL7 MLLP): TLS 1.2 or later, and with a
CA file, callers must present a certificate it signed (mutual TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_tls_context(cert_file: Path, key_file: Path, ca_file: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(ca_file))
    return context
