"""Reading a final radiology report for each AI finding type: positive, negative or uncertain.

A small, documented rule set in the manner of NegEx (Chapman et al., 2001): finding-type terms, negation and
uncertainty triggers with a direction and a reach in words, and terminators that end a trigger's reach. The
rules live in ``report_rules.toml`` (its header explains them); the labelled sentences of
``tests/data/report_sentences.tsv`` measure them in CI. Nothing here keeps or logs the report's text: the caller
gets the deciding sentence as evidence and stores it with the QA item.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ReportLabel(str, Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"


# A sentence or report is decided by its strongest mention: a finding stated anywhere is stated.
_STRENGTH = {ReportLabel.NEGATIVE: 0, ReportLabel.UNCERTAIN: 1, ReportLabel.POSITIVE: 2}

_SECTION = re.compile(r"^\s*([A-Za-z][A-Za-z /]{1,40}):\s*", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|[!?\n]")
_WORD = re.compile(r"[\w/]+")


@dataclass(frozen=True, kw_only=True)
class _Trigger:
    kind: str  # negation | uncertainty | terminator
    direction: str  # before | after | either ("" for terminators)


@dataclass(frozen=True, kw_only=True)
class ReportReading:
    """How a report reads for one finding type, and the sentence that decided it (empty: not mentioned)."""

    finding: str
    label: ReportLabel
    evidence: str = ""

    @property
    def mentioned(self) -> bool:
        return bool(self.evidence)


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    ordered = sorted(
        {p.lower() for p in phrases}, key=len, reverse=True
    )  # longer phrases win over their parts

    def bounded(phrase: str) -> str:  # whole words only, where the phrase starts or ends with a word
        body = re.escape(phrase).replace(r"\ ", r"\s+")
        head = r"(?<![\w/])" if re.match(r"[\w/]", phrase) else ""
        tail = r"(?![\w/])" if re.search(r"[\w/]$", phrase) else ""
        return f"{head}{body}{tail}"

    return re.compile("|".join(bounded(p) for p in ordered))


@dataclass(frozen=True)
class ReportRules:
    """The parsed rule set: terms per finding type, triggers and terminators."""

    window_words: int
    ignored_sections: frozenset[str]
    terms: Mapping[str, re.Pattern[str]]
    triggers: Mapping[str, tuple[_Trigger, ...]]
    trigger_pattern: re.Pattern[str]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], origin: str) -> ReportRules:
        try:
            triggers: dict[str, list[_Trigger]] = {}
            for kind in ("negation", "uncertainty"):
                for direction, phrases in raw[kind].items():
                    if direction not in ("before", "after", "either"):
                        raise ConfigError(f"{origin}: [{kind}] {direction!r} is not before, after or either")
                    for phrase in phrases:
                        triggers.setdefault(" ".join(phrase.lower().split()), []).append(
                            _Trigger(kind=kind, direction=direction)
                        )
            for phrase in raw["terminators"]["phrases"]:
                triggers.setdefault(" ".join(phrase.lower().split()), []).append(
                    _Trigger(kind="terminator", direction="")
                )
            terms = {name.lower(): _phrase_pattern(entry["terms"]) for name, entry in raw["findings"].items()}
            return cls(
                window_words=int(raw.get("window_words", 8)),
                ignored_sections=frozenset(s.lower() for s in raw.get("ignored_sections", ())),
                terms=terms,
                triggers={phrase: tuple(kinds) for phrase, kinds in triggers.items()},
                trigger_pattern=_phrase_pattern(triggers),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{origin}: not a report rule set ({exc!r}); see gateway/review/report_rules.toml"
            ) from None

    @property
    def finding_types(self) -> tuple[str, ...]:
        return tuple(sorted(self.terms))


@cache
def _packaged_rules() -> ReportRules:
    text = resources.files("gateway.review").joinpath("report_rules.toml").read_text()
    return ReportRules.from_mapping(tomllib.loads(text), "gateway/review/report_rules.toml")


def load_rules(path: Path | None = None) -> ReportRules:
    """The packaged rule set, or a site's own file."""
    if path is None:
        return _packaged_rules()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"report rules {path}: {exc}") from None
    return ReportRules.from_mapping(raw, str(path))


def sentences(report: str, rules: ReportRules) -> list[str]:
    """The report's sentences outside the ignored sections (reason for study, history ...)."""
    out: list[str] = []
    parts = _SECTION.split(report)
    # split() with one group: [text before the first header, header, text, header, text ...]
    chunks = [("", parts[0])] + [
        (parts[i].strip().lower(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)
    ]
    for section, text in chunks:
        if section in rules.ignored_sections:
            continue
        out.extend(s.strip() for s in _SENTENCE_END.split(text) if s.strip())
    return out


def _words_between(text: str, start: int, end: int) -> int:
    return len(_WORD.findall(text[start:end])) if end > start else 0


def classify_sentence(sentence: str, finding: str, rules: ReportRules | None = None) -> ReportLabel | None:
    """How one sentence reads for ``finding`` (a key of the rule set), or None when it does not mention it."""
    rules = rules or load_rules()
    try:
        term_pattern = rules.terms[finding.lower()]
    except KeyError:
        raise ConfigError(
            f"no report rules for finding type {finding!r}; known: {', '.join(rules.finding_types)}"
        ) from None
    text = " ".join(sentence.lower().split())
    hits = [
        (m.start(), m.end(), rules.triggers[" ".join(m.group(0).split())])
        for m in rules.trigger_pattern.finditer(text)
    ]
    labels = [
        _mention(text, t.start(), t.end(), hits, rules.window_words) for t in term_pattern.finditer(text)
    ]
    if not labels:
        return None
    if ReportLabel.UNCERTAIN in labels:
        # In one sentence a hedged mention qualifies the others ("left basilar opacity, atelectasis versus
        # consolidation").
        return ReportLabel.UNCERTAIN
    return max(labels, key=_STRENGTH.__getitem__)


def _mention(
    text: str, start: int, end: int, hits: list[tuple[int, int, tuple[_Trigger, ...]]], window: int
) -> ReportLabel:
    """One mention of a term: which triggers reach it (nearest first, stopped by terminators)."""
    reaching: set[str] = set()
    before = [h for h in hits if h[1] <= start]
    for _, h_end, kinds in reversed(before):  # nearest first
        if any(k.kind == "terminator" for k in kinds) and not any(k.kind != "terminator" for k in kinds):
            break
        if _words_between(text, h_end, start) > window:
            break
        reaching.update(k.kind for k in kinds if k.direction in ("before", "either"))
    for h_start, _, kinds in (h for h in hits if h[0] >= end):
        if any(k.kind == "terminator" for k in kinds) and not any(k.kind != "terminator" for k in kinds):
            break
        if _words_between(text, end, h_start) > window:
            break
        reaching.update(k.kind for k in kinds if k.direction in ("after", "either"))
    if "uncertainty" in reaching:
        return ReportLabel.UNCERTAIN
    if "negation" in reaching:
        return ReportLabel.NEGATIVE
    return ReportLabel.POSITIVE


def read_report(report: str, finding: str, rules: ReportRules | None = None) -> ReportReading:
    """How a whole report reads for ``finding``: its strongest sentence, or negative when never mentioned."""
    rules = rules or load_rules()
    best: tuple[ReportLabel, str] | None = None
    for sentence in sentences(report, rules):
        label = classify_sentence(sentence, finding, rules)
        if label is not None and (best is None or _STRENGTH[label] > _STRENGTH[best[0]]):
            best = (label, sentence)
    if best is None:
        return ReportReading(finding=finding.lower(), label=ReportLabel.NEGATIVE)
    return ReportReading(finding=finding.lower(), label=best[0], evidence=best[1])
