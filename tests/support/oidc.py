"""A local OpenID Connect provider for the tests: an RSA signing key, its JWKS served over HTTP on loopback
(what the gateway fetches), tokens signed with it (or with a stranger's key), and the browser sign-in of the
dashboard - an authorization endpoint that signs in ``user`` at once and a token endpoint that checks PKCE."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
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
        self.user: tuple[str, list[str], list[str]] = ("u-4711", ["radiologist"], [])  # who signs in
        self.codes: dict[
            str, tuple[str, str, list[str], list[str]]
        ] = {}  # code -> (challenge, sub, roles, groups)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header(
                    "Access-Control-Allow-Origin", "*"
                )  # the dashboard's page calls the token endpoint
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path.endswith("/auth"):  # the user signs in at once
                    query = dict(urllib.parse.parse_qsl(url.query))
                    code = secrets.token_urlsafe(16)
                    provider.codes[code] = (query["code_challenge"], *provider.user)
                    target = f"{query['redirect_uri']}?{urllib.parse.urlencode({'code': code, 'state': query['state']})}"
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.end_headers()
                    return
                provider.fetches += 1
                self._json(200, provider.jwks)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                found = provider.codes.pop(form.get("code", ""), None)
                verifier = form.get("code_verifier", "").encode()
                expected = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                if found is None or found[0] != expected:
                    self._json(400, {"error": "invalid_grant"})
                    return
                _, subject, roles, groups = found
                token = provider.token(subject, roles, groups=groups)
                self._json(
                    200, {"access_token": token, "id_token": token, "token_type": "Bearer", "expires_in": 300}
                )

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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/realms/radiology/protocol/openid-connect"

    def config(self) -> str:
        return (
            f'[http.oidc]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_url = "{self.jwks_url}"\n'
            f'authorization_endpoint = "{self.base_url}/auth"\ntoken_endpoint = "{self.base_url}/token"\n'
        )
