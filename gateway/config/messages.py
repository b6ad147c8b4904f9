"""A pydantic ``ValidationError`` in the words of the configuration file: every line names the TOML key
(``pipelines[0].report_threshold``, ``receiver.port``) the way an operator writes it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

# The pipeline table is flat in TOML; its model groups the keys into these parts (not part of a key's name).
PIPELINE_PARTS = frozenset({"route", "input", "output", "provenance"})

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dataclass_type": "a table",
    "is_instance_of": "a value of another type",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def key_name(loc: Sequence[int | str]) -> str:
    """``('pipelines', 0, 'output', 'report_threshold')`` -> ``pipelines[0].report_threshold``."""
    parts: list[str] = []
    for index, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]" if parts else f"[{item}]"]
        elif (item in PIPELINE_PARTS and index == 2 and loc[0] == "pipelines") or "[" in item:
            continue
        else:
            parts.append(item)
    return ".".join(parts)


def _line(error: Any) -> str:
    key = key_name(error["loc"])
    kind = error["type"]
    got = error.get("input")
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {got!r}"
    if kind in _BOUNDS:
        bound = next(iter(error["ctx"].values()))
        return f"{key} must be {_BOUNDS[kind]} {bound}, got {got!r}"
    if kind in ("enum", "literal_error"):
        expected = error["ctx"]["expected"]
        choices = expected if "''" in expected else expected.replace("'", "")
        return f"{key} must be {choices}; got {got!r}"
    if kind == "missing":
        return f"{key}: required setting missing"
    if kind == "too_short":
        return f"{key} must not be empty"
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        return f"{key} {message}" if message.startswith("must") else f"{key}: {message}" if key else message
    return f"{key}: {error['msg']}"


def _suggest(unknown: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(unknown, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def describe(error: ValidationError, model: type[BaseModel], raw: dict[str, Any]) -> str:
    """One line per problem; unknown keys grouped per table, with the closest known key when one is close."""
    lines: list[str] = []
    unknown: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        if item["type"] == "extra_forbidden":
            table = key_name(item["loc"][:-1])
            unknown.setdefault(table, []).append(str(item["loc"][-1]))
            continue
        line = _line(item)
        if line not in lines:
            lines.append(line)
    for table, keys in unknown.items():
        known = _known_keys(model, table)
        names = ", ".join(f"{k}{_suggest(k, known)}" for k in sorted(keys))
        lines.append(f"{table + ': ' if table else ''}unknown setting(s) {names}")
    return lines[0] if len(lines) == 1 else "invalid configuration:\n  " + "\n  ".join(lines)


def _known_keys(model: type[BaseModel], table: str) -> set[str]:
    """The keys a table accepts (aliases, the flat pipeline keys included)."""
    current: Any = model
    for name in [p.split("[")[0] for p in table.split(".") if p]:
        field = current.model_fields.get(name) if hasattr(current, "model_fields") else None
        if field is None:
            return set()
        current = _model_of(field.annotation)
    return flat_keys(current) if hasattr(current, "model_fields") else set()


def flat_keys(model: Any) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if name in PIPELINE_PARTS and hasattr(field.annotation, "model_fields"):
            keys |= {f.alias or n for n, f in field.annotation.model_fields.items()}
        else:
            keys.add(field.alias or name)
    return keys


def _model_of(annotation: Any) -> Any:
    """The model inside ``tuple[Model, ...]``, ``Model | None`` or ``Model``."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
