"""How each model version does at each site, and whether it drifts.

Per model version and site (the sending PACS's AE title): studies analysed, positive rate, the score
distribution, acceptance (accept and modify count as accepted: the finding was there; reject does not), time
to verdict, and sensitivity and positive predictive value against the final reports (uncertain reports left
out; the shown pipelines' comparisons, or the silent pilot's where the model is only silent). Silent-mode
findings of the site are its score baseline.

Drift, evaluated by ``evaluate`` (the gateway runs it every ``[review] monitor_interval_s``):

- **acceptance**: the Bernoulli CUSUM of ``drift.AcceptanceCusum`` over the current verdicts in the order they
  were given; each firing is an alarm (kept once, with the verdict count it fired at);
- **scores**: the PSI of the latest ``psi_min_scores`` shown findings' confidences against the baseline - the
  site's silent-mode findings when there are enough, else the model version's first ``psi_min_scores`` there;
  above ``psi_alarm`` it is an alarm (once per model version and site).
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine

from gateway.config.settings import ReviewSettings
from gateway.database.monitoring import (
    comparison_counts,
    mark_notified,
    model_names,
    record_alarm,
    scores,
    sites_and_versions,
    verdict_sequence,
    volumes,
)
from gateway.review.drift import AcceptanceCusum, population_stability_index, score_histogram

logger = logging.getLogger(__name__)
ACCEPTED = frozenset({"accept", "modify"})


@dataclass(frozen=True, kw_only=True)
class Alarm:
    model_name: str
    model_version: str
    site: str
    kind: str  # acceptance | scores
    at_count: int
    value: float
    new: bool  # first seen by this evaluation

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class ModelSiteStats:
    model_name: str
    model_version: str
    site: str
    studies: int = 0
    positive_studies: int = 0
    findings: int = 0
    silent_findings: int = 0
    score_histogram: list[float] = field(default_factory=list)
    verdicts: int = 0
    accepted: int = 0
    median_seconds_to_verdict: float | None = None
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0
    psi: float | None = None
    # The scores the PSI compares against: "silent mode" (the site's silent pilot) or "first findings"
    baseline_source: str = ""
    baseline_histogram: list[float] = field(default_factory=list)
    cusum: float = 0.0
    alarms: list[Alarm] = field(default_factory=list)

    @property
    def positive_rate(self) -> float | None:
        return self.positive_studies / self.studies if self.studies else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.verdicts if self.verdicts else None

    @property
    def sensitivity(self) -> float | None:
        n = self.true_positive + self.false_negative
        return self.true_positive / n if n else None

    @property
    def ppv(self) -> float | None:
        n = self.true_positive + self.false_positive
        return self.true_positive / n if n else None

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "alarms"}
        out["alarms"] = [a.as_json() for a in self.alarms]
        for name in ("positive_rate", "acceptance_rate", "sensitivity", "ppv"):
            out[name] = getattr(self, name)
        return out


def publish_metrics(metrics: Any, stats: list[ModelSiteStats]) -> None:
    """The model gauges of ``/metrics`` (``ops.metrics.Metrics``) from one evaluation."""
    for s in stats:
        labels = (s.model_name, s.model_version, s.site)
        if s.acceptance_rate is not None:
            metrics.model_acceptance.labels(*labels).set(s.acceptance_rate)
        if s.positive_rate is not None:
            metrics.model_positive_rate.labels(*labels).set(s.positive_rate)
        metrics.model_cusum.labels(*labels).set(s.cusum)
        if s.psi is not None:
            metrics.model_psi.labels(*labels).set(s.psi)
        for kind in ("acceptance", "scores"):
            metrics.model_alarms.labels(*labels, kind).set(sum(a.kind == kind for a in s.alarms))


def _baseline(
    engine: Engine, model: str, version: str, site: str, settings: ReviewSettings
) -> tuple[list[float], list[float], str]:
    """(the baseline scores, the shown scores compared with them, what the baseline is): the site's silent-mode
    findings when there are enough, else the model version's first findings there."""
    n = settings.psi_min_scores
    baseline = scores(engine, model, version, site, silent=True)
    if len(baseline) >= n:
        return baseline, scores(engine, model, version, site, silent=False), "silent mode"
    everything = scores(engine, model, version, site, silent=None)
    return everything[:n], everything[n:], "first findings"


def _psi(baseline: list[float], shown: list[float], settings: ReviewSettings) -> float | None:
    n = settings.psi_min_scores
    if len(baseline) < n or len(shown) < n:
        return None
    return population_stability_index(baseline, shown[-n:])


def site_statistics(
    engine: Engine, settings: ReviewSettings, model: str, version: str, site: str, since: float = 0.0
) -> ModelSiteStats:
    stats = ModelSiteStats(model_name=model, model_version=version, site=site)
    all_scores = scores(engine, model, version, site, silent=None, since=since)
    stats.findings = len(all_scores)
    stats.silent_findings = len(scores(engine, model, version, site, silent=True, since=since))
    stats.score_histogram = [round(v, 4) for v in score_histogram(all_scores)] if all_scores else []
    sequence = verdict_sequence(engine, model, version, site, since)
    stats.verdicts = len(sequence)
    stats.accepted = sum(p.kind in ACCEPTED for p in sequence)
    waits = [p.seconds_to_verdict for p in sequence if p.seconds_to_verdict is not None]
    stats.median_seconds_to_verdict = round(statistics.median(waits), 1) if waits else None
    # Against the reports: the shown pipelines' comparisons; a model only in silent mode, its pilot's.
    counts = comparison_counts(engine, model, version, site, silent=False, since=since) or comparison_counts(
        engine, model, version, site, silent=True, since=since
    )
    stats.true_positive = counts.get("1/positive", 0)
    stats.false_positive = counts.get("1/negative", 0)
    stats.false_negative = counts.get("0/positive", 0)
    stats.true_negative = counts.get("0/negative", 0)
    chart = AcceptanceCusum(
        p0=settings.acceptance_expected, p1=settings.acceptance_alarm_at, h=settings.cusum_threshold
    )
    accepted = [
        p.kind in ACCEPTED for p in verdict_sequence(engine, model, version, site)
    ]  # the whole history
    fired = chart.run(accepted)
    stats.cusum = round(chart.statistic, 3)
    now = time.time()
    for count in fired:
        window = accepted[max(0, count - 50) : count]  # the acceptance of the 50 verdicts before the alarm
        rate = sum(window) / len(window)
        new = record_alarm(
            engine,
            model=model,
            version=version,
            site=site,
            kind="acceptance",
            at_count=count,
            value=rate,
            at=now,
        )
        stats.alarms.append(
            Alarm(
                model_name=model,
                model_version=version,
                site=site,
                kind="acceptance",
                at_count=count,
                value=round(rate, 3),
                new=new,
            )
        )
    baseline, shown, source = _baseline(engine, model, version, site, settings)
    stats.baseline_source = source
    stats.baseline_histogram = [round(v, 4) for v in score_histogram(baseline)] if baseline else []
    stats.psi = _psi(baseline, shown, settings)
    if stats.psi is not None and stats.psi > settings.psi_alarm:
        new = record_alarm(
            engine,
            model=model,
            version=version,
            site=site,
            kind="scores",
            at_count=0,
            value=stats.psi,
            at=now,
        )
        stats.alarms.append(
            Alarm(
                model_name=model,
                model_version=version,
                site=site,
                kind="scores",
                at_count=0,
                value=round(stats.psi, 3),
                new=new,
            )
        )
    return stats


def evaluate(
    engine: Engine, settings: ReviewSettings, model: str | None = None, since: float = 0.0
) -> list[ModelSiteStats]:
    """Statistics and drift checks of every model version and site (or of one model's)."""
    out = []
    for name in [model] if model is not None else model_names(engine):
        analysed = {(v.model_version, v.site): v for v in volumes(engine, name, since)}
        reported = {(version, site) for _, version, site in sites_and_versions(engine, name)}
        for version, site in sorted(set(analysed) | reported):
            stats = site_statistics(engine, settings, name, version, site, since)
            volume = analysed.get((version, site))
            if volume is not None:
                stats.studies, stats.positive_studies = volume.studies, volume.positive_studies
            out.append(stats)
    return out


class DriftWatch:
    """Evaluates every ``monitor_interval_s`` on the gateway's loop (the queries in an executor): sets the
    model gauges, and posts each new alarm to ``alarm_webhook_url`` (once: the system of record remembers it)."""

    def __init__(
        self,
        engine: Engine,
        settings: ReviewSettings,
        *,
        publish: Callable[[list[ModelSiteStats]], None],
        post: Callable[[str, bytes], Awaitable[object]] | None,
        record_event: Callable[..., None],
        executor: Executor | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.publish = publish
        self.post = post
        self.record_event = record_event
        self.executor = executor

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_interval_s)
            await self.check()

    async def check(self) -> list[ModelSiteStats]:
        loop = asyncio.get_running_loop()
        try:
            stats = await loop.run_in_executor(self.executor, evaluate, self.engine, self.settings)
        except Exception as exc:  # a database outage: the next round tries again
            logger.warning("model monitoring could not be evaluated now: %s", exc)
            return []
        self.publish(stats)
        for alarm in (a for s in stats for a in s.alarms if a.new):
            logger.warning(
                "drift alarm: model %s version %s at %s: %s (%.3f)",
                alarm.model_name,
                alarm.model_version,
                alarm.site,
                alarm.kind,
                alarm.value,
            )
            self.record_event("drift_alarm", **alarm.as_json())
            if self.post is not None and self.settings.alarm_webhook_url:
                body = json.dumps({"event": "drift_alarm", **alarm.as_json()}).encode()
                try:
                    await self.post(self.settings.alarm_webhook_url, body)
                except Exception as exc:
                    logger.error("drift alarm webhook failed: %s", exc)
                    continue
                await loop.run_in_executor(self.executor, mark_notified, self.engine, alarm.as_json())
        return stats
