"""The governance report of one model: what a committee reads before it moves the model from silent to assist
to triage - its version history, where it runs and in which mode, volumes, what the radiologists said about its
findings, how it agrees with the signed reports, and its drift alarms. Markdown for people, CSV for a sheet."""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from gateway.config.settings import Settings
from gateway.database.monitoring import alarms, model_history, pipeline_changes
from gateway.review.monitoring import ModelSiteStats, evaluate

CSV_COLUMNS = (
    "model_name",
    "model_version",
    "site",
    "studies",
    "positive_studies",
    "positive_rate",
    "findings",
    "silent_findings",
    "verdicts",
    "accepted",
    "acceptance_rate",
    "median_seconds_to_verdict",
    "true_positive",
    "false_positive",
    "false_negative",
    "true_negative",
    "sensitivity",
    "ppv",
    "psi",
    "cusum",
)


@dataclass(frozen=True)
class GovernanceReport:
    markdown: str
    csv: str
    stats: list[ModelSiteStats]


def _date(at: float) -> str:
    return dt.datetime.fromtimestamp(at, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


GOVERNED = (
    "model",
    "algorithm_version",
    "mode",
    "pilot_sites",
    "pilot_groups",
    "report_threshold",
    "stat_threshold",
)


def _diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """The change in words, keys in one order (JSONB keeps none)."""
    if before is None or after is None:
        values = after or before or {}
        return ", ".join(f"{k} {values[k]}" for k in GOVERNED if k in values)
    return ", ".join(
        f"{k} {before.get(k)} -> {after.get(k)}" for k in GOVERNED if before.get(k) != after.get(k)
    )


def governance_report(engine: Engine, settings: Settings, model: str, since: float) -> GovernanceReport:
    stats = evaluate(engine, settings.review, model, since)
    history = model_history(engine, model)
    raised = alarms(engine, model, since)
    pipelines = [p for p in settings.pipelines if p.model == model]
    lines = [
        f"# Governance report: {model}",
        "",
        f"Period: since {_date(since)}; generated {_date(dt.datetime.now(dt.timezone.utc).timestamp())}.",
        "Sites are the sending PACS (calling AE titles). Acceptance counts accepted and modified findings; "
        "sensitivity and PPV are against the signed reports (uncertain reports left out).",
        "",
        "## Versions",
        "",
        "| Triton version | Algorithm version | SHA-256 | First seen |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {h['triton_version']} | {h['algorithm_version']} | `{h['sha256'][:16]}` | {_date(h['first_seen_at'])} |"
        for h in history
    ] or ["| - | - | - | never loaded |"]
    lines += ["", "## Pipelines and rollout modes (current settings)", ""]
    lines += [
        f"- **{p.name}**: mode **{p.mode.value}**"
        + (f" at the pilot sites {', '.join(p.pilot_sites)} (silent elsewhere)" if p.pilot_sites else "")
        + (f", shown to the groups {', '.join(p.pilot_groups)}" if p.pilot_groups else "")
        + f", report threshold {p.output.report_threshold}, STAT threshold {p.output.stat_threshold}"
        for p in pipelines
    ] or ["- no pipeline of the current settings uses this model"]
    lines += [
        "",
        "## Volumes, verdicts and report concordance",
        "",
        "| Version | Site | Studies | Positive | Findings (silent) | Verdicts | Accepted | Median time to verdict "
        "| TP / FP / FN / TN | Sensitivity | PPV | Score PSI | CUSUM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        wait = "-" if s.median_seconds_to_verdict is None else f"{s.median_seconds_to_verdict / 60:.1f} min"
        lines.append(
            f"| {s.model_version} | {s.site or '-'} | {s.studies} | {_pct(s.positive_rate)} | "
            f"{s.findings} ({s.silent_findings}) | {s.verdicts} | {_pct(s.acceptance_rate)} | {wait} | "
            f"{s.true_positive} / {s.false_positive} / {s.false_negative} / {s.true_negative} | "
            f"{_pct(s.sensitivity)} | {_pct(s.ppv)} | {_num(s.psi)} | {_num(s.cusum, 2)} |"
        )
    if not stats:
        lines.append("| - | - | 0 | - | 0 | 0 | - | - | - | - | - | - | - |")
    changes = pipeline_changes(engine, [p.name for p in pipelines], since) if pipelines else []
    lines += ["", "## Changes of rollout mode, pilot, thresholds and model (audited)", ""]
    lines += [
        f"- {_date(c['at'])}: **{c['pipeline']}** "
        + ("added" if c["before"] is None else "removed" if c["after"] is None else "changed")
        + ": "
        + _diff(c["before"], c["after"])
        for c in changes
    ] or ["- none in the period"]
    lines += ["", "## Drift alarms", ""]
    lines += [
        f"- {_date(a['at'])}: version {a['model_version']} at {a['site'] or '-'}: "
        + (
            f"acceptance fell to {_pct(a['value'])} (CUSUM fired at verdict {a['at_count']})"
            if a["kind"] == "acceptance"
            else f"score distribution moved from its baseline (PSI {a['value']:.3f})"
        )
        + ("" if a["notified"] else " - webhook not (yet) delivered")
        for a in raised
    ] or ["- none"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for s in stats:
        writer.writerow(s.as_json())
    return GovernanceReport(markdown="\n".join(lines) + "\n", csv=out.getvalue(), stats=stats)
