"""The coded-terminology table (``terminology.toml``): finding types by key, finding sites by body part."""

from __future__ import annotations

import sys
from functools import cache
from importlib import resources

from gateway.core.domain import CodedConcept
from gateway.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@cache
def _table() -> dict[str, dict[str, CodedConcept]]:
    raw = tomllib.loads(resources.files("gateway.core").joinpath("terminology.toml").read_text())
    return {
        section: {key.upper(): CodedConcept(**entry) for key, entry in entries.items()}
        for section, entries in raw.items()
    }


def finding_type(key: str) -> CodedConcept:
    try:
        return _table()["findings"][key.upper()]
    except KeyError:
        known = ", ".join(sorted(k.lower() for k in _table()["findings"]))
        raise ConfigError(
            f"unknown finding type {key!r}; known: {known} (gateway/core/terminology.toml)"
        ) from None


def finding_site(body_part: str) -> CodedConcept | None:
    """The anatomic site for a BodyPartExamined value, or ``None`` when the table has no entry."""
    return _table()["sites"].get(body_part.strip().upper()) if body_part else None


def finding_key(code: CodedConcept) -> str | None:
    """The terminology key of a finding type code ("hemorrhage" for SCT 50960005), or None for a site's own."""
    for key, known in _table()["findings"].items():
        if known.value == code.value and known.scheme == code.scheme:
            return key.lower()
    return None
