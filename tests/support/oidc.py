"""A local OpenID Connect provider for the tests: an RSA signing key, its JWKS served over HTTP on loopback
(what the gateway fetches), and tokens signed with it (or with a stranger's key)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.hospital.test/realms/radiology"
AUDIENCE = "ai-gateway"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Provider:
    def __init__(self, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.key = _key()
        self.stranger = _key()  # a key the provider never published
        self.fetches = 0
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps(provider.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/protocol/openid-connect/certs"

    def __enter__(self) -> Provider:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token(
        self,
        subject: str,
        roles: list[str],
        *,
        groups: list[str] | None = None,
        audience: str = AUDIENCE,
        issuer: str = ISSUER,
        lifetime_s: float = 300.0,
        stranger: bool = False,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s),
            "roles": roles,
            "groups": groups or [],
            "name": "never recorded",
        }
        key = self.stranger if stranger else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": self.kid})

    def config(self) -> str:
        return f'[http.oidc]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_url = "{self.jwks_url}"\n'
