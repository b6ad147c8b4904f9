"""Where settings come from: the embedded ``default_config.toml``, an optional TOML file, command-line flags."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def embedded_defaults() -> dict[str, Any]:
    return tomllib.loads(resources.files("gateway.config").joinpath("default_config.toml").read_text())


def read_file(config_file: Path) -> dict[str, Any]:
    try:
        text = Path(config_file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file} is not valid TOML: {exc}") from exc


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value (arrays of tables included) replaces the base's."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def freeze(value: Any) -> Any:
    """TOML arrays as tuples (the settings are immutable); tables stay dicts."""
    if isinstance(value, dict):
        return {key: freeze(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(freeze(item) for item in value)
    return value
