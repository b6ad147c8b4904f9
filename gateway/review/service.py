"""The review side of the gateway as one object the HTTP API and the HL7 listener are given: verdicts, final
reports and their QA items, who viewed the AI's results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from gateway.config.settings import Settings
from gateway.database.monitoring import pipeline_changes
from gateway.review.monitoring import evaluate
from gateway.review.reports import FinalReports
from gateway.review.verdicts import Verdicts


class Review:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.settings = settings
        self.verdicts = Verdicts(
            engine, settings.review, settings.node_id, {p.name: p for p in settings.pipelines}
        )
        self.reports = FinalReports(engine, settings, settings.node_id)

    def findings(
        self, study_uid: str, viewer: str | None = None, groups: frozenset[str] | None = None
    ) -> list[dict[str, Any]]:
        if viewer is not None:
            self.reports.viewed(study_uid, viewer)
        return self.verdicts.findings(study_uid, groups)

    def record(
        self, study_uid: str, body: Mapping[str, Any], reviewer: str, groups: frozenset[str] | None = None
    ) -> dict[str, Any]:
        return self.verdicts.record(study_uid, body, reviewer, groups)

    def history(self, study_uid: str) -> list[dict[str, Any]]:
        return self.verdicts.history(study_uid)

    def fhir(self, study_uid: str) -> dict[str, Any]:
        return self.verdicts.fhir(study_uid)

    def statistics(self) -> list[dict[str, Any]]:
        """Every model version and site: volumes, acceptance, report concordance, drift (evaluated now)."""
        return [s.as_json() for s in evaluate(self.verdicts.engine, self.settings.review)]

    def pipelines(self) -> dict[str, Any]:
        """The governed settings of every pipeline now, and every audited change of them."""
        return {
            "pipelines": {name: p.governed() for name, p in self.verdicts.pipelines.items()},
            "changes": pipeline_changes(self.verdicts.engine),
        }

    def comparisons(self, study_uid: str) -> list[dict[str, Any]]:
        return self.reports.study_comparisons(study_uid)

    def discrepancies(self, state: str | None) -> list[dict[str, Any]]:
        return self.reports.discrepancies(state)

    def assign(self, item: int, to: str, by: str) -> dict[str, Any] | None:
        return self.reports.assign(item, to, by)

    def close(self, item: int, note: str, by: str) -> dict[str, Any] | None:
        return self.reports.close(item, note, by)
