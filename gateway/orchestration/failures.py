"""A routed series that could not be analysed is a result too: counted, audited, alerted, and answered with a
failure SR at the destination, so that "the AI failed" never reads as "the AI found nothing".

Nothing raised here takes a worker down: a failure SR that cannot be built or stored is logged, the alert and the
study's completion still happen.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.core.domain import RolloutMode
from gateway.orchestration.routing import InferenceJob
from gateway.orchestration.series_pipeline import OutcomeKind, PipelineParts, SeriesOutcome, superseded
from gateway.orchestration.tracker import StudyProgress
from gateway.reporting.notify import FailureEvent
from gateway.results.common import SeriesAnalysis
from gateway.results.hygiene import clean_headers
from gateway.results.sr import build_sr
from preprocessing.series import read_headers

logger = logging.getLogger(__name__)


class FailurePublisher:
    def __init__(self, parts: PipelineParts) -> None:
        self.parts = parts

    async def fail(self, job: InferenceJob, reason: str, kind: str) -> SeriesOutcome:
        study, series, pipeline = job.study, job.series, job.pipeline
        progress = self.parts.tracker.get(study.study_instance_uid)
        if progress is not None:
            progress.failed += 1
        sr_uid = ""
        try:
            sr_uid = await self._publish(job, reason, progress)
        except Exception as exc:  # the failure path itself must never take the worker down
            logger.error(
                "series %s: failure result could not be built or stored: %s: %s",
                series.series_instance_uid,
                type(exc).__name__,
                exc,
            )
        self.parts.events.series_failed(
            study=study.study_instance_uid,
            series=series.series_instance_uid,
            pipeline=pipeline.name,
            kind=kind,
            reason=reason,
            results=[sr_uid] if sr_uid else [],
        )
        event = FailureEvent(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            pipeline=pipeline.name,
            reason_kind=kind,
            reason=reason[:500],
            sr_sop_instance_uid=sr_uid,
            calling_ae=study.calling_ae,
            created_at=time.time(),
        )
        self.parts.notifications.send(self.parts.failure_alerts, event, failed_event="failure_alert_failed")
        return SeriesOutcome(kind=OutcomeKind.FAILED, results=(sr_uid,) if sr_uid else (), reason=reason)

    async def _publish(self, job: InferenceJob, reason: str, progress: StudyProgress | None) -> str:
        """Build, store and send the failure SR of one series; returns its SOP Instance UID ("" if none)."""
        study, series, pipeline, parts = job.study, job.series, job.pipeline, self.parts
        loop = asyncio.get_running_loop()
        headers = await loop.run_in_executor(
            parts.executor, read_headers, [r.path for r in series.instances if r.has_pixel_data]
        )
        if not headers:
            logger.error(
                "series %s: no readable header, no failure SR can be built", series.series_instance_uid
            )
            return ""
        sources, _ = clean_headers(headers)
        analysis = SeriesAnalysis(
            pipeline_name=pipeline.name,
            algorithm_name=pipeline.provenance.algorithm_name,
            algorithm_version=pipeline.provenance.algorithm_version,
            model_name=pipeline.model,
            model_version="",  # no model answer was used
            findings=(),
            study_score=0.0,
            stat=False,
            stat_threshold=pipeline.output.stat_threshold,
            report_threshold=pipeline.output.report_threshold,
            display_window=pipeline.output.display_window,
            sources=sources,
            model_sha256=parts.model_hashes.get(pipeline.model, ""),
            incomplete_reason=study.incomplete_reason,
        )
        result_key = f"{series.series_instance_uid}/{pipeline.name}"
        previous, _ = await loop.run_in_executor(
            parts.executor,
            superseded,
            parts.spool,
            parts.results,
            study.study_instance_uid,
            result_key,
            analysis,
        )
        sr = await loop.run_in_executor(
            parts.executor, lambda: build_sr(analysis, findings=[], previous=previous, failure=reason)
        )
        paths = await loop.run_in_executor(parts.executor, parts.results.save, study.study_instance_uid, [sr])
        if pipeline.mode_for(study.calling_ae) is not RolloutMode.SILENT:
            destination = parts.settings.destination_for(study.calling_ae)
            if destination is not None:
                await parts.outbox.submit(
                    destination, study.study_instance_uid, paths, priority=job.priority.name
                )
        if progress is not None:
            progress.sr_by_series[result_key] = str(sr.SOPInstanceUID)
            progress.objects_by_series[result_key] = [str(sr.SOPInstanceUID)]
            progress.results.append(str(sr.SOPInstanceUID))
        return str(sr.SOPInstanceUID)
