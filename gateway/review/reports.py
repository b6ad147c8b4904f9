"""Final reports against the AI: the consistent second reader.

A signed report (HL7 ORU^R01, final or corrected) is linked to its study by accession number (or the Study
Instance UID the message names), stored, and read with the report rule set for every finding type of every
pipeline that analysed the study. What the AI said and what the report says give, per finding type:

    concordant     both positive, or the AI found nothing and the report says it is absent
    ai_only        the AI found it, the report says it is absent: a possible false positive, or a reader's miss
    report_only    the report states it, the AI found nothing: an AI miss
    uncertain      the report hedges ("cannot be excluded"): recorded, not a discrepancy

A discordant comparison of a shown result (assist, triage) is a QA item (open -> assigned -> closed) with the
report's deciding sentence as evidence; a silent pipeline's comparison feeds its monitoring only. Each report
also records whether it was AI-assisted: the AI's results were delivered and viewed (findings opened or a
verdict recorded) before sign-off. A report that arrives before its study (or the study's analysis) is in the
system of record is stored without comparisons and compared once it is: ``compare_pending`` runs every
``[review] report_match_interval_s`` for the reports of the last ``PENDING_DAYS`` days.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Any

from sqlalchemy import Engine

from gateway.config.settings import Settings
from gateway.core.domain import RolloutMode
from gateway.core.terminology import finding_key
from gateway.database.reports import (
    ComparisonRow,
    ai_seen_before,
    analysed_pipelines,
    attach_comparisons,
    comparisons,
    pending_reports,
    record_view,
    store_report,
    study_for_accession,
    study_state,
    update_qa,
)
from gateway.review.report_text import ReportLabel, load_rules, read_report
from gateway.workflow.final_reports import FinalReport

logger = logging.getLogger(__name__)

QA_STATES = ("open", "assigned", "closed")
ANALYSED = frozenset({"results_stored", "delivered", "failed"})  # the study's every routed series is done
PENDING_DAYS = 14


def outcome_of(ai_positive: bool, label: ReportLabel) -> str:
    if label is ReportLabel.UNCERTAIN:
        return "uncertain"
    if ai_positive == (label is ReportLabel.POSITIVE):
        return "concordant"
    return "ai_only" if ai_positive else "report_only"


class FinalReports:
    """The HL7 listener's report sink, and the QA items it makes."""

    def __init__(self, engine: Engine, settings: Settings, node: str) -> None:
        self.engine = engine
        self.node = node
        self.rules = load_rules(settings.review.report_rules)
        self.pipelines = {p.name: p for p in settings.pipelines}

    def __call__(self, report: FinalReport) -> list[ComparisonRow]:
        return self.receive(report)

    def receive(self, report: FinalReport) -> list[ComparisonRow]:
        """Store ``report`` and its comparisons (committed before it returns: the ACK follows)."""
        study = report.study_uid or study_for_accession(self.engine, report.accession_number)
        delivered, viewed = ai_seen_before(self.engine, study, report.signed_at) if study else (False, False)
        analysed = bool(study) and study_state(self.engine, study) in ANALYSED
        rows = self._compare(report, study) if analysed and report.compared else []  # else: compare_pending
        now = time.time()
        stored = store_report(
            self.engine,
            {
                "accession_number": report.accession_number,
                "study_uid": study,
                "status": report.status,
                "signed_at": report.signed_at,
                "received_at": now,
                "control_id": report.control_id,
                "text": report.text,
                "ai_delivered_before": delivered,
                "ai_viewed_before": viewed,
                "ai_assisted": delivered and viewed,
            },
            rows,
            self.node,
        )
        discordant = sum(r.qa_state == "open" for r in stored)
        logger.info(
            "final report for study %s (status %s): %d comparison(s), %d discrepancy(ies) for QA",
            study or "not yet known",
            report.status,
            len(stored),
            discordant,
        )
        return stored

    def _compare(self, report: FinalReport, study: str) -> list[dict[str, Any]]:
        rows = []
        now = time.time()
        for analysed in analysed_pipelines(self.engine, study):
            pipeline = self.pipelines.get(analysed.pipeline)
            if pipeline is None:
                continue  # a pipeline removed since: its results are history, not compared
            for code in {(c.value, c.scheme): c for c in pipeline.output.labels.values()}.values():
                key = finding_key(code)
                if key is None or key not in self.rules.terms:
                    continue  # no rule set for a site's own finding type: nothing to read the report with
                confidence = analysed.max_confidence_by_code.get(code.value)
                reading = read_report(report.text, key, self.rules)
                outcome = outcome_of(confidence is not None, reading.label)
                mode = pipeline.mode_for(analysed.calling_ae)
                shown = mode is not RolloutMode.SILENT
                rows.append(
                    {
                        "study_uid": study,
                        "accession_number": report.accession_number,
                        "pipeline": pipeline.name,
                        "mode": mode.value,
                        "calling_ae": analysed.calling_ae,
                        "finding_type": key,
                        "model_name": analysed.model_name,
                        "model_version": analysed.model_version,
                        "ai_positive": confidence is not None,
                        "max_confidence": confidence,
                        "report_label": reading.label.value,
                        "outcome": outcome,
                        "evidence": reading.evidence[:2000],
                        "qa_state": "open" if shown and outcome in ("ai_only", "report_only") else "none",
                        "at": now,
                        "updated_at": now,
                    }
                )
        return rows

    def compare_pending(self) -> list[ComparisonRow]:
        """Compare the reports that came before their study's analysis, now that it is recorded."""
        done: list[ComparisonRow] = []
        for row in pending_reports(self.engine, time.time() - PENDING_DAYS * 86400):
            report = FinalReport(
                accession_number=row["accession_number"],
                study_uid=row["study_uid"],
                status=row["status"],
                signed_at=row["signed_at"],
                text=row["text"],
                control_id=row["control_id"],
            )
            study = report.study_uid or study_for_accession(self.engine, report.accession_number)
            if not study or study_state(self.engine, study) not in ANALYSED:
                continue  # not yet known, or some of its series still being analysed: every pipeline must be in
            rows = self._compare(report, study)
            if not rows:
                continue  # the study is known, its analysis not yet recorded
            seen = ai_seen_before(self.engine, study, report.signed_at)
            compared = attach_comparisons(self.engine, row["id"], study, seen, rows, self.node)
            logger.info(
                "final report for study %s compared once its analysis was recorded: %d discrepancy(ies) for QA",
                study,
                sum(c.qa_state == "open" for c in compared),
            )
            done.extend(compared)
        return done

    async def match_forever(self, interval_s: float, executor: Executor | None = None) -> None:
        """``compare_pending`` every ``interval_s`` on the gateway's loop (the queries in an executor)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await loop.run_in_executor(executor, self.compare_pending)
            except Exception as exc:  # a database outage: the next round tries again
                logger.warning("pending final reports could not be compared now: %s", exc)

    # -- the QA worklist (HTTP API) ----------------------------------------------------------------------------

    def discrepancies(self, state: str | None) -> list[dict[str, Any]]:
        if state is not None and state not in QA_STATES:
            raise ValueError(f"state must be one of {', '.join(QA_STATES)}")
        if state is None:
            items = [c for c in comparisons(self.engine) if c.qa_state in QA_STATES]
        else:
            items = comparisons(self.engine, qa_state=state)
        return [c.as_json() for c in items]

    def study_comparisons(self, study_uid: str) -> list[dict[str, Any]]:
        return [c.as_json() for c in comparisons(self.engine, study_uid=study_uid)]

    def assign(self, item: int, to: str, by: str) -> dict[str, Any] | None:
        row = update_qa(
            self.engine, item, state="assigned", assigned_to=to, note=f"assigned by {by}", at=time.time()
        )
        return row.as_json() if row else None

    def close(self, item: int, note: str, by: str) -> dict[str, Any] | None:
        row = update_qa(
            self.engine, item, state="closed", assigned_to=None, note=f"{by}: {note}", at=time.time()
        )
        return row.as_json() if row else None

    def viewed(self, study_uid: str, viewer: str) -> None:
        record_view(self.engine, study_uid, viewer, time.time())
