"""Who is calling the HTTP API, and what they may do.

Two kinds of bearer token, one answer (a ``Principal``):

- **Service tokens** (machines: a PACS integration, a monitoring system, a STOW-RS sender): random strings made
  by ``gateway token``, configured by their SHA-256 digest in ``[[http.tokens]]``, compared in constant time.
- **OpenID Connect** (people): a signed JWT from the site's identity provider, checked against the provider's
  published keys (JWKS, fetched and cached; or a file), its issuer, audience, expiry and not-before. The user is
  the token's subject - a pseudonymous id, the only thing verdicts and audit events record about a person.
  Roles come from a claim (``roles`` by default), mapped through ``role_map`` where the provider names them
  differently; groups (``groups``) decide who sees a pilot's results.

What each role may do is the ``ACTS_AS`` table: an endpoint names the roles it admits, and a principal is
admitted when one of its roles acts as one of them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.config.settings import HttpSettings, HttpToken, OidcSettings, TokenRole
from gateway.core.errors import ConfigError

logger = logging.getLogger(__name__)

# Which roles each role acts as. Admin runs the gateway and reviews QA, but records no verdicts (a verdict is a
# radiologist's). Read-only and operator see the gateway's work (studies, queues), not the AI's findings;
# radiologists and QA see that work too (the worklist).
ACTS_AS: dict[TokenRole, frozenset[TokenRole]] = {
    TokenRole.READ_ONLY: frozenset({TokenRole.READ_ONLY}),
    TokenRole.OPERATOR: frozenset({TokenRole.OPERATOR, TokenRole.READ_ONLY}),
    TokenRole.ADMIN: frozenset(
        {TokenRole.ADMIN, TokenRole.OPERATOR, TokenRole.READ_ONLY, TokenRole.QA, TokenRole.SENDER}
    ),
    TokenRole.SENDER: frozenset({TokenRole.SENDER}),
    TokenRole.RADIOLOGIST: frozenset({TokenRole.RADIOLOGIST, TokenRole.READ_ONLY}),
    TokenRole.QA: frozenset({TokenRole.QA, TokenRole.READ_ONLY}),
}
RESULT_READERS = (TokenRole.RADIOLOGIST, TokenRole.QA)  # who may see AI findings (admin acts as QA)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Principal:
    """An authenticated caller: a service token or a person signed in with OpenID Connect."""

    name: str  # the token's name, or the person's pseudonymous subject
    roles: frozenset[TokenRole]
    via: str  # "token" | "oidc"
    groups: frozenset[str] = frozenset()
    token: HttpToken | None = None  # the service token, when via == "token"

    def may(self, *roles: TokenRole) -> bool:
        return any(role in ACTS_AS[own] for own in self.roles for role in roles)

    @property
    def source_ae(self) -> str:
        """The AE title a STOW-RS sender's instances are recorded under."""
        return self.token.source_ae if self.token is not None else self.name[:16]


class AuthenticationError(Exception):
    """The bearer token is missing, unknown, expired or not signed by the configured provider (HTTP 401)."""


@dataclass
class _Keys:
    """The provider's signing keys: from the JWKS URL (PyJWKClient, cached, refetched for an unknown key id) or
    from a file (read once)."""

    settings: OidcSettings
    _client: Any = None
    _file_keys: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def key_for(self, token: str) -> Any:
        import jwt  # PyJWT: only a gateway with OpenID Connect on needs it

        if self.settings.jwks_file is not None:
            with self._lock:
                if not self._file_keys:
                    try:
                        keys = jwt.PyJWKSet.from_json(self.settings.jwks_file.read_text())
                    except (OSError, jwt.PyJWKSetError, json.JSONDecodeError) as exc:
                        raise ConfigError(f"[http.oidc] jwks_file {self.settings.jwks_file}: {exc}") from None
                    self._file_keys = {k.key_id or "": k for k in keys.keys}
            kid = jwt.get_unverified_header(token).get("kid") or ""
            if kid not in self._file_keys:
                if kid == "" and len(self._file_keys) == 1:
                    return next(iter(self._file_keys.values())).key
                raise AuthenticationError(f"token signed with an unknown key id {kid!r}")
            return self._file_keys[kid].key
        with self._lock:
            if self._client is None:
                self._client = jwt.PyJWKClient(
                    self.settings.jwks_url, cache_keys=True, lifespan=3600, timeout=10
                )
        try:
            return self._client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            logger.error("OpenID Connect keys could not be fetched from %s: %s", self.settings.jwks_url, exc)
            raise AuthenticationError("the identity provider's keys could not be fetched") from None
        except jwt.PyJWKClientError as exc:
            raise AuthenticationError(f"token signed with an unknown key: {exc}") from None


class Authenticator:
    """Bearer token -> Principal (or AuthenticationError)."""

    def __init__(self, settings: HttpSettings) -> None:
        self.tokens = settings.tokens
        self.oidc = settings.oidc
        self._keys = _Keys(settings.oidc) if settings.oidc.enabled else None

    def principal(self, bearer: str | None) -> Principal:
        if not bearer:
            raise AuthenticationError("missing bearer token")
        bearer = bearer.strip()
        if self._keys is not None and bearer.count(".") == 2 and bearer.startswith("ey"):
            return self._person(bearer)
        digest = hash_token(bearer)
        for token in self.tokens:
            if hmac.compare_digest(digest, token.sha256):
                return Principal(name=token.name, roles=frozenset({token.role}), via="token", token=token)
        raise AuthenticationError("unknown bearer token")

    def _person(self, bearer: str) -> Principal:
        import jwt

        assert self._keys is not None
        try:
            claims = jwt.decode(
                bearer,
                self._keys.key_for(bearer),
                algorithms=list(self.oidc.algorithms),
                audience=self.oidc.audience,
                issuer=self.oidc.issuer,
                leeway=self.oidc.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", self.oidc.user_claim]},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"token refused: {exc}") from None
        user = str(claims[self.oidc.user_claim])
        roles = frozenset(self._roles(claims.get(self.oidc.roles_claim)))
        groups = claims.get(self.oidc.groups_claim) or []
        return Principal(
            name=user,
            roles=roles,
            via="oidc",
            groups=frozenset(str(g) for g in (groups if isinstance(groups, list) else [groups])),
        )

    def _roles(self, claimed: Any) -> Iterable[TokenRole]:
        names = claimed if isinstance(claimed, list) else [claimed] if isinstance(claimed, str) else []
        for name in names:
            mapped = self.oidc.role_map.get(str(name))
            if mapped is not None:
                yield mapped
                continue
            try:
                role = TokenRole(str(name))
            except ValueError:
                continue  # a role of another application at the same provider
            if role is not TokenRole.SENDER:  # senders are machines: service tokens only
                yield role
