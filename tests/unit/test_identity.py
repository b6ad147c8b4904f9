"""Who is calling: service tokens and OpenID Connect tokens (keys from a JWKS file), and what each role may do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.settings import HttpSettings, TokenRole
from gateway.ops.identity import AuthenticationError, Authenticator, hash_token
from tests.support.oidc import AUDIENCE, ISSUER, Provider


def _settings(tmp_path: Path, provider: Provider, **oidc: object) -> HttpSettings:
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(provider.jwks))
    return HttpSettings.model_validate(
        {
            "tokens": ({"name": "monitor", "role": "read-only", "sha256": hash_token("service-secret")},),
            "oidc": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(keys), **oidc},
        }
    )


def test_people_and_machines_become_principals_with_their_roles(tmp_path: Path) -> None:
    provider = Provider()
    auth = Authenticator(_settings(tmp_path, provider, role_map={"Radiology-Readers": "radiologist"}))
    machine = auth.principal("service-secret")
    assert machine.via == "token" and machine.roles == {TokenRole.READ_ONLY} and machine.name == "monitor"
    person = auth.principal(
        provider.token("u-1", ["Radiology-Readers", "qa", "sender", "unrelated"], groups=["pilot"])
    )
    assert person.via == "oidc" and person.name == "u-1" and person.groups == {"pilot"}
    assert person.roles == {TokenRole.RADIOLOGIST, TokenRole.QA}  # a person is never a sender
    assert person.may(TokenRole.RADIOLOGIST) and not person.may(TokenRole.OPERATOR)
    for bad in (None, "", "not-a-token", provider.token("u-1", ["qa"], stranger=True)):
        with pytest.raises(AuthenticationError):
            auth.principal(bad)


@pytest.mark.parametrize(
    ("role", "allowed", "refused"),
    [
        (TokenRole.ADMIN, [TokenRole.OPERATOR, TokenRole.QA, TokenRole.SENDER], [TokenRole.RADIOLOGIST]),
        (TokenRole.OPERATOR, [TokenRole.READ_ONLY], [TokenRole.QA, TokenRole.RADIOLOGIST, TokenRole.ADMIN]),
        (TokenRole.READ_ONLY, [], [TokenRole.QA, TokenRole.RADIOLOGIST, TokenRole.OPERATOR]),
        (TokenRole.RADIOLOGIST, [TokenRole.READ_ONLY], [TokenRole.QA, TokenRole.OPERATOR, TokenRole.ADMIN]),
        (TokenRole.QA, [TokenRole.READ_ONLY], [TokenRole.RADIOLOGIST, TokenRole.OPERATOR, TokenRole.ADMIN]),
    ],
)
def test_what_each_role_acts_as(role: TokenRole, allowed: list[TokenRole], refused: list[TokenRole]) -> None:
    from gateway.ops.identity import Principal

    principal = Principal(name="x", roles=frozenset({role}), via="token")
    assert principal.may(role)
    assert all(principal.may(r) for r in allowed)
    assert not any(principal.may(r) for r in refused)


def test_oidc_settings_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match="exactly one of jwks_url or jwks_file"):
        HttpSettings.model_validate({"oidc": {"issuer": ISSUER, "audience": AUDIENCE}})
    with pytest.raises(ValueError, match="asymmetric"):
        HttpSettings.model_validate(
            {
                "oidc": {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "jwks_url": "http://127.0.0.1:1/",
                    "algorithms": ("HS256",),
                }
            }
        )
