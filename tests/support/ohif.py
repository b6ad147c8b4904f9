"""OHIF Viewer (the `@ohif/app` npm package's prebuilt build) served on loopback in front of a real Orthanc.

The build is fetched by `make ohif` (`npm pack`, into build/ohif/); this module serves its `dist/` folder with an
index.html fallback for the viewer's client-side routes, an `app-config.js` whose one DICOMweb data source is
this same origin's `/dicom-web`, and a proxy from `/dicom-web/...` to Orthanc's DICOMweb plugin - so the browser
talks to one origin and no CORS configuration is needed.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"
OHIF_DIST = Path(__file__).resolve().parents[2] / "build" / "ohif" / "package" / "dist"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (tests)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def require_ohif() -> Path:
    if not (OHIF_DIST / "index.html").exists():
        pytest.skip("the OHIF build is not fetched (`make ohif`; `make test` does it)")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return OHIF_DIST


class OhifServer:
    """Serves the OHIF build and proxies DICOMweb to ``orthanc_url`` (an ``http://127.0.0.1:PORT`` URL)."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        self.dist = dist
        target = urllib.parse.urlsplit(orthanc_url)
        self.orthanc = (target.hostname or LOOPBACK, target.port or 80)
        self.errors: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/dicom-web/"):
                    outer._proxy(self)
                    return
                path = urllib.parse.urlsplit(self.path).path
                if path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                    return
                file = (outer.dist / path.lstrip("/")).resolve()
                if not file.is_relative_to(outer.dist) or not file.is_file():
                    file = outer.dist / "index.html"  # a client-side route of the single-page app
                self._send(200, file.read_bytes(), _content_type(file))

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def _proxy(self, handler: BaseHTTPRequestHandler) -> None:
        connection = http.client.HTTPConnection(*self.orthanc, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "range")}
        try:
            connection.request("GET", handler.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status >= 400:
            self.errors.append(f"{response.status} {handler.path}")
        handler.send_response(response.status)
        for name in ("Content-Type",):
            if response.getheader(name):
                handler.send_header(name, str(response.getheader(name)))
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self) -> OhifServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _content_type(path: Path) -> str:
    return {
        ".html": "text/html; charset=utf-8",
        ".js": "application/javascript",
        ".css": "text/css",
        ".wasm": "application/wasm",
        ".json": "application/json",
        ".svg": "image/svg+xml",
        ".woff2": "font/woff2",
        ".png": "image/png",
    }.get(path.suffix, "application/octet-stream")
