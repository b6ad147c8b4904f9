"""HTTP endpoints: /health and /metrics (read freely on loopback) and /admin/* (bearer tokens with roles).

Roles: read-only < operator < admin. ``GET /admin/dead-letters`` needs read-only, ``POST /admin/resend``
needs operator. Tokens are configured by SHA-256 digest only and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.config.settings import HttpSettings
from gateway.core.errors import ConfigError

logger = logging.getLogger(__name__)

ROLE_RANK = {"read-only": 0, "operator": 1, "admin": 2}


@dataclass(frozen=True, kw_only=True)
class ApiBackend:
    """What the API exposes, as plain callables (the API never reaches into the engine)."""

    health: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]
    dead_letters: Callable[[], list[dict[str, Any]]]
    resend: Callable[[list[str] | None], list[str]]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminApi:
    def __init__(self, settings: HttpSettings, backend: ApiBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def role_of(self, header: str | None) -> str | None:
        if not header or not header.startswith("Bearer "):
            return None
        digest = hash_token(header[len("Bearer ") :].strip())
        for token in self.settings.tokens:
            if hmac.compare_digest(digest, token.sha256):
                return token.role
        return None

    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dicom-ai-gateway"

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("http %s", fmt % args)

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, payload: Any) -> None:
                self._send(status, json.dumps(payload, default=str).encode())

            def _authorised(self, needed: str) -> bool:
                role = api.role_of(self.headers.get("Authorization"))
                if role is None:
                    self._json(401, {"error": "missing or unknown bearer token"})
                    return False
                if ROLE_RANK[role] < ROLE_RANK[needed]:
                    self._json(403, {"error": f"role {role} may not do this; {needed} or above is needed"})
                    return False
                return True

            def do_GET(self) -> None:
                if self.path == "/health":
                    health = api.backend.health()
                    self._json(200 if health["status"] == "ok" else 503, health)
                elif self.path == "/metrics":
                    self._send(200, api.backend.metrics(), "text/plain; version=0.0.4")
                elif self.path == "/admin/dead-letters":
                    if self._authorised("read-only"):
                        self._json(200, api.backend.dead_letters())
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path != "/admin/resend":
                    self._json(404, {"error": "not found"})
                    return
                if not self._authorised("operator"):
                    return
                length = int(self.headers.get("Content-Length", "0") or 0)
                try:
                    body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}")
                    jobs = body.get("jobs")
                    if jobs is not None and not (
                        isinstance(jobs, list) and all(isinstance(j, str) for j in jobs)
                    ):
                        raise ValueError("jobs must be a list of job ids")
                except ValueError as exc:
                    self._json(400, {"error": str(exc)})
                    return
                self._json(200, {"resent": api.backend.resend(jobs)})

        try:
            self.server = ThreadingHTTPServer((self.settings.host, self.settings.port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve HTTP on {self.settings.host}:{self.settings.port}: {exc.strerror}; "
                "set [http] port (0 picks a free one) or enabled = false"
            ) from exc
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="gateway-http", daemon=True)
        self._thread.start()
        logger.info("HTTP health/metrics/admin on %s:%d", self.settings.host, self.port)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self.settings.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
