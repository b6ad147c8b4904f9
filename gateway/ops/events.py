"""One sink for what the flow reports: every event becomes its canonical log line, its audit record and its
metrics in one call, so the three never disagree and no stage formats its own.

Log lines carry UIDs, pipeline names, counts and timings, never patient data (the fields are the audit's).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from gateway.core.domain import InstanceRecord
from gateway.database.jobs import QueuedJob, RoutedStudy
from gateway.database.recorder import Recorder
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EventSink:
    def __init__(self, audit: AuditLog, metrics: Metrics, record: Recorder | None = None) -> None:
        self.audit = audit
        self.metrics = metrics
        self.record_of = record  # the system of record (it also gets every audit event, via the audit log)

    def instance_stored(self, record: InstanceRecord) -> None:
        """An acknowledged instance (on an association thread: nothing here waits for a disk or a database)."""
        self.metrics.instances_received.labels(record.calling_ae or "?").inc()
        if self.record_of is not None:
            self.record_of.instance_stored(record)

    def study_routed(self, study: RoutedStudy, jobs: Sequence[QueuedJob], *, skipped: int) -> None:
        """A complete study and the series queued for analysis (the skipped ones are events of their own)."""
        logger.debug("study %s complete: %d series queued, %d skipped", study.study_uid, len(jobs), skipped)
        if self.record_of is not None:
            self.record_of.study_routed(study, jobs, skipped=skipped, at=time.time())

    def series_started(self, job: str, study_uid: str, *, attempts: int) -> None:
        if self.record_of is not None:
            self.record_of.job_started(job, study_uid, attempts, time.time())

    def after_recorded(self, step: Callable[[], T]) -> Future[T]:
        """Run ``step`` (blocking bookkeeping) once every event recorded so far is on disk, off the caller's
        thread when the audit has its writer."""
        return self.audit.then(step)

    def record(self, event: str, **fields: Any) -> None:
        """An audit-only event (purge, an output that could not be built, a notification that failed)."""
        self.audit.record(event, **fields)

    def series_skipped(
        self,
        *,
        study: str,
        series: str,
        reason: str,
        modality: str | None = None,
        pipeline: str | None = None,
        rule: str | None = None,
    ) -> None:
        """A series no pipeline analyses (routing, or an anatomy check that found no such anatomy)."""
        self.metrics.series_skipped.inc()
        shown = f"{series} ({modality or '?'})" if modality is not None else series
        logger.info("series %s not analysed: %s", shown, reason)
        extra = {k: v for k, v in (("pipeline", pipeline), ("rule", rule)) if v is not None}
        self.audit.record("series_skipped", study=study, series=series, **extra, reason=reason)

    def series_analysed(
        self,
        fields: Mapping[str, Any],
        *,
        findings: int,
        stat: bool,
        timings: Mapping[str, float],
        priority: str,
    ) -> None:
        pipeline = str(fields["pipeline"])
        logger.info("series analysed %s", json.dumps(fields))
        self.metrics.series_analysed.labels(pipeline).inc()
        self.metrics.findings.labels(pipeline).inc(findings)
        if stat:
            self.metrics.stat_studies.labels(pipeline).inc()
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage, priority).observe(seconds)
        self.audit.record("series_analysed", **fields)

    def series_failed(
        self, *, study: str, series: str, pipeline: str, kind: str, reason: str, results: list[str]
    ) -> None:
        """A routed series that could not be analysed (its failure SR, when one was built, in ``results``)."""
        self.metrics.series_failed.labels(pipeline).inc()
        self.metrics.analysis_failures.labels(pipeline, kind).inc()
        self.audit.record(
            "series_failed",
            study=study,
            series=series,
            pipeline=pipeline,
            reason_kind=kind,
            reason=reason,
            results=results,
        )

    def study_done(
        self,
        fields: Mapping[str, Any],
        *,
        repairs: set[tuple[str, str]],
        priority: str,
        waits: Mapping[str, float],
    ) -> None:
        if repairs:
            logger.warning(
                "study %s: header values that break their VR were repaired or dropped: %s",
                fields["study"],
                ", ".join(f"{keyword} {action}" for keyword, action in sorted(repairs)),
            )
            for keyword, action in repairs:
                self.metrics.header_repairs.labels(keyword, action).inc()
        logger.info("study done %s", json.dumps(fields))
        self.audit.record("study_done", **fields)
        self.metrics.studies_completed.inc()
        self.metrics.study_seconds.labels(priority).observe(
            float(fields["last_instance_to_done_ms"]) / 1000.0
        )
        for stage, seconds in waits.items():
            self.metrics.stage_seconds.labels(stage, priority).observe(seconds)
