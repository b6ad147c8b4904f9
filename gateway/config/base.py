"""What every settings model is built from: strict, frozen models that refuse unknown keys, and the shared
field types (AE titles, ports, probabilities, paths resolved against the config file's folder).

Strict means a TOML value of the wrong type is an error, never converted: ``port = "104"`` or ``workers = true``
is refused, an integer is accepted where a number is expected. Arrays arrive as tuples (``sources.freeze``).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationInfo

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1..16 characters


class Section(BaseModel):
    """A table of the configuration file."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Part(BaseModel):
    """A group of a table's keys (the TOML keeps them flat): fields have the TOML key as alias."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True
    )


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def check_ae(value: str) -> str:
    if not _AE_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value


def _check_port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"must be 1-65535, got {value}")
    return value


def _check_listen_port(value: int) -> int:
    if not 0 <= value < 65536:
        raise ValueError(f"must be 0-65535 (0: any free port), got {value}")
    return value


AeTitle = Annotated[str, BeforeValidator(_strip), AfterValidator(check_ae)]
Port = Annotated[int, AfterValidator(_check_port)]
ListenPort = Annotated[int, AfterValidator(_check_listen_port)]  # 0: the system picks a free port
Upper = Annotated[str, BeforeValidator(_upper)]
Lower = Annotated[str, BeforeValidator(_lower)]
Positive = Annotated[float, Field(gt=0)]
Seconds = Positive  # a duration, > 0
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Pair = tuple[float, float]


def base_dir(info: ValidationInfo) -> Path:
    """The folder relative paths are resolved against: the config file's, else the working directory."""
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def resolve(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir(info) / path).resolve()


def resolve_optional(value: Any, info: ValidationInfo) -> Path | None:
    """A path, or None for ``""``."""
    if value is None or value == "":
        return None
    return resolve(value, info)


ResolvedPath = Annotated[Path, BeforeValidator(resolve)]
OptionalPath = Annotated[Path | None, BeforeValidator(resolve_optional)]


class Choice(str, enum.Enum):
    """A closed vocabulary of a setting: compares equal to, prints as and serialises as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# The field type of a vocabulary is ``Annotated[Kind, LAX]``: a TOML string of one of its values (only the
# enum's own values are accepted; strict mode would accept enum members only).
LAX = Strict(False)
