"""The system of record on the command line: ``gateway db upgrade|status``, ``gateway studies`` (a table,
filtered) and ``gateway study UID`` (one study's timeline). Read-only except ``db upgrade``; safe while the
gateway runs (SQLite readers never block its writer)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from gateway.config.settings import Settings, load_settings
from gateway.core.errors import ConfigError, DatabaseError
from gateway.database import migrate
from gateway.database.connect import engine_for, shown
from gateway.database.queries import StudyFilter, StudyRow, list_studies, study_timeline
from gateway.database.states import StudyState
from gateway.review.governance import governance_report

EXAMPLES = """\
examples:
  gateway studies --priority STAT --pacs PACS_B --since today --waited-more-than 2m
  gateway studies --state failed --since 24h
  gateway study 1.2.826.0.1.3680043.8.498.1 --json
  gateway db upgrade --config site.toml
"""


def _since(text: str) -> float:
    """'today', '90m', '2h', '3d', an ISO date or date-time (local time)."""
    text = text.strip().lower()
    if text == "today":
        return dt.datetime.combine(dt.date.today(), dt.time()).timestamp()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * unit
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 'today', a duration (90m, 2h, 3d) or a date (2026-12-01, 2026-12-01T08:00)"
        ) from None


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use seconds or a duration such as 90s, 2m, 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="settings file ([database] url, data_dir)"
    )
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the gateway's data directory")


def add_parsers(sub: Any) -> None:
    db = sub.add_parser(
        "db",
        help="the system of record: migrate it (upgrade) or show where it stands (status)",
        description="The gateway migrates its database at start-up; `gateway db upgrade` does it beforehand "
        "(for example before several gateways start on one PostgreSQL), `gateway db status` shows the URL "
        "(password hidden), the migration and the row counts.",
    )
    db.add_argument("action", choices=["upgrade", "status"])
    _common(db)

    studies = sub.add_parser(
        "studies",
        help="list studies from the system of record (state, priority, PACS, time, waits)",
        description="Studies newest first (STAT first), with their state, priority, sending PACS, instances, "
        "findings and how long they waited from complete to analysis.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(studies)
    studies.add_argument("--state", choices=[s.value for s in StudyState])
    studies.add_argument("--priority", type=str.upper, choices=["STAT", "URGENT", "ROUTINE"])
    studies.add_argument("--pacs", metavar="AE", help="the sending PACS's calling AE title")
    studies.add_argument("--since", type=_since, metavar="WHEN", help="first received at or after WHEN")
    studies.add_argument("--until", type=_since, metavar="WHEN", help="first received before WHEN")
    studies.add_argument(
        "--waited-more-than", type=_duration, metavar="DURATION", help="from complete until analysis started"
    )
    studies.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    studies.add_argument("--json", action="store_true", help="JSON instead of a table")

    study = sub.add_parser(
        "study",
        help="one study's timeline: every stage with its time, node and outcome",
        description="Received, complete, queued, analysing, results stored, delivered (and every series "
        "analysis, delivery and notification), each with its time and the gateway node that did it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(study)
    study.add_argument("study_uid", metavar="UID", help="Study Instance UID")
    study.add_argument("--json", action="store_true", help="JSON instead of text")

    report = sub.add_parser(
        "report",
        help="the governance report of one model: versions, volumes, verdicts, report concordance, drift alarms",
        description="What a governance committee reads before moving a model from silent to assist to triage: "
        "its version history, the pipelines and rollout modes that use it, per version and site the studies, "
        "positive rate, radiologists' acceptance and time to verdict, sensitivity and PPV against the signed "
        "reports, the score drift (PSI) and acceptance CUSUM, and every drift alarm. Printed as Markdown; "
        "--out also writes it with a CSV of the numbers.",
        epilog="examples:\n  gateway report --model ct_head_hyperdensity --since 2026-11-01 --out reports/\n"
        "  gateway report --model cxr_opacity --since 30d --config site.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(report)
    report.add_argument("--model", required=True, help="the model's name in the Triton repository")
    report.add_argument(
        "--since", type=_since, default=0.0, metavar="WHEN", help="today, 30d, or a date (default: all)"
    )
    report.add_argument(
        "--out", type=Path, metavar="DIR", help="also write governance-MODEL.md and .csv here"
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"data_dir": str(args.data_dir.resolve())} if args.data_dir else {}
    return load_settings(args.config, overrides)


def _stamp(at: float | None) -> str:
    return "-" if at is None else dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _wait(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = engine_for(settings.database_url)
    try:
        if args.action == "upgrade":
            before, after = migrate.upgrade(engine)
            print(f"{shown(settings.database_url)}: {before or 'empty'} -> {after}")
            return 0
        try:
            revision = migrate.current(engine)
        except Exception as exc:
            raise DatabaseError(
                f"{shown(settings.database_url)} cannot be read: {type(exc).__name__}"
            ) from None
        print(f"database   {shown(settings.database_url)}")
        print(f"migration  {revision or 'none (empty database)'} (this build: {migrate.head()})")
        if revision is not None:
            from sqlalchemy import func, select

            from gateway.database.schema import metadata

            with engine.connect() as connection:
                for name, table in sorted(metadata.tables.items()):
                    rows = connection.execute(select(func.count()).select_from(table)).scalar_one()
                    print(f"  {name:<18} {rows} row(s)")
        return 0 if revision == migrate.head() else 1
    finally:
        engine.dispose()


def _open(settings: Settings) -> Any:
    engine = engine_for(settings.database_url)
    if migrate.current(engine) is None:
        engine.dispose()
        raise DatabaseError(
            f"{shown(settings.database_url)} holds no system of record yet: start the gateway or run "
            "`gateway db upgrade` (check --config / --data-dir)"
        )
    return engine


def cmd_studies(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    engine = _open(_settings(args))
    try:
        rows = list_studies(
            engine,
            StudyFilter(
                state=args.state,
                priority=args.priority,
                pacs=args.pacs,
                since=args.since,
                until=args.until,
                waited_more_than_s=args.waited_more_than,
                limit=args.limit,
            ),
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    print(render_table(rows))
    return 0


def render_table(rows: list[StudyRow]) -> str:
    header = ("STUDY UID", "STATE", "PRIORITY", "PACS", "RECEIVED", "INST", "FIND", "WAIT", "NODE")
    lines = [
        (
            row.study_uid,
            row.state,
            row.priority + (" (STAT finding)" if row.stat and row.priority != "STAT" else ""),
            row.calling_ae,
            _stamp(row.first_received_at),
            str(row.instances),
            str(row.findings),
            _wait(row.wait_s),
            row.node,
        )
        for row in rows
    ]
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.append(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}")
    return "\n".join(out)


def cmd_study(args: argparse.Namespace) -> int:
    engine = _open(_settings(args))
    try:
        timeline = study_timeline(engine, args.study_uid)
    finally:
        engine.dispose()
    if timeline is None:
        print(f"study {args.study_uid} is not in the system of record", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(timeline.as_json(), indent=2, default=str))
        return 0
    s = timeline.study
    print(f"study     {s.study_uid}")
    print(f"state     {s.state} since {_stamp(s.state_since)}{f' ({s.detail})' if s.detail else ''}")
    print(f"priority  {s.priority}{'  STAT finding' if s.stat else ''}   from {s.calling_ae}   node {s.node}")
    print(f"images    {s.instances} in {s.series} series   findings {s.findings}   waited {_wait(s.wait_s)}")
    print("timeline")
    start = timeline.steps[0].at if timeline.steps else 0.0
    for step in timeline.steps:
        print(
            f"  {_stamp(step.at)}  +{step.at - start:8.1f}s  {step.stage:<24} {step.node:<12} {step.detail}"
        )
    for analysis in timeline.analyses:
        print(
            f"analysis  {analysis['pipeline']}: {analysis['outcome']}, model {analysis['model_name']} "
            f"v{analysis['model_version']} sha256 {analysis['model_hash'][:12]}, {analysis['findings']} finding(s), "
            f"{len(analysis['result_uids'])} result(s)"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _open(settings)
    try:
        report = governance_report(engine, settings, args.model, args.since)
    finally:
        engine.dispose()
    print(report.markdown, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"governance-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.model)}"
        (args.out / f"{stem}.md").write_text(report.markdown)
        (args.out / f"{stem}.csv").write_text(report.csv)
        print(f"\nwritten: {args.out / f'{stem}.md'}, {args.out / f'{stem}.csv'}", file=sys.stderr)
    return 0


HANDLERS = {"db": cmd_db, "studies": cmd_studies, "study": cmd_study, "report": cmd_report}
