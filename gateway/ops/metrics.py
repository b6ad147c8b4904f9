"""Prometheus metrics of one gateway instance (its own registry, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "gateway_instances_received", "Instances stored durably", ["calling_ae"], registry=r
        )
        self.instances_refused = Counter(
            "gateway_instances_refused", "C-STORE requests refused", ["status"], registry=r
        )
        self.studies_completed = Counter("gateway_studies_completed", "Studies fully processed", registry=r)
        self.series_analysed = Counter("gateway_series_analysed", "Series analysed", ["pipeline"], registry=r)
        self.series_failed = Counter(
            "gateway_series_failed", "Series that could not be analysed", ["pipeline"], registry=r
        )
        self.findings_implausible = Counter(
            "gateway_findings_implausible",
            "Findings dropped as implausible: outside the pipeline's anatomy or size range",
            ["pipeline", "reason"],
            registry=r,
        )
        self.analysis_failures = Counter(
            "gateway_analysis_failures",
            "Routed series that could not be analysed (a failure SR went out), by pipeline and reason",
            ["pipeline", "reason"],
            registry=r,
        )
        self.series_skipped = Counter("gateway_series_skipped", "Series no pipeline applies to", registry=r)
        self.findings = Counter("gateway_findings", "Findings reported", ["pipeline"], registry=r)
        self.stat_studies = Counter("gateway_stat_series", "Series flagged STAT", ["pipeline"], registry=r)
        self.inference_retries = Counter(
            "gateway_inference_retries", "Jobs re-queued because Triton was unavailable", registry=r
        )
        self.output_failures = Counter(
            "gateway_output_failures",
            "Result objects of an analysed series that could not be built (the others were kept)",
            ["output", "pipeline"],
            registry=r,
        )
        self.resource_errors = Counter(
            "gateway_resource_errors",
            "Jobs deferred because a resource ran out (disk full, file descriptors, memory)",
            ["reason"],
            registry=r,
        )
        self.header_repairs = Counter(
            "gateway_header_repairs",
            "Studies in which a copied header attribute broke its VR and was repaired or dropped",
            ["attribute", "action"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "gateway_worker_restarts", "Analysis workers that died and were replaced", registry=r
        )
        self.workers_alive = Gauge("gateway_workers_alive", "Analysis workers running", registry=r)
        self.purged = Counter("gateway_purged", "Items removed by retention", ["kind"], registry=r)
        self.disk_hours_left = Gauge(
            "gateway_disk_hours_until_watermark",
            "Hours until the data disk reaches the receiver watermark at the last hour's rate (-1: not filling)",
            registry=r,
        )
        self.disk_fill_rate = Gauge(
            "gateway_disk_fill_rate_bytes_per_hour",
            "Rate the data disk filled at over the last hour",
            registry=r,
        )
        self.child_restarts = Gauge(
            "gateway_child_restarts", "Restarts of supervised child processes", ["child"], registry=r
        )
        self.stage_seconds = Histogram(
            "gateway_stage_seconds",
            "Time per pipeline stage, by the study's priority class",
            ["stage", "priority"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.study_seconds = Histogram(
            "gateway_study_seconds",
            "Time from a study's last instance to its results (the per-study latency target), by priority class",
            ["priority"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.critical_result_seconds = Histogram(
            "gateway_critical_result_seconds",
            "Critical results: time from the STAT SR stored to the first notification and to the acknowledgement",
            ["step"],  # notify | acknowledge
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.queue_depth = Gauge("gateway_queue_depth", "Jobs waiting for a worker", ["priority"], registry=r)
        model = ["model", "version", "site"]
        self.model_acceptance = Gauge(
            "gateway_model_acceptance_rate",
            "Share of AI findings accepted (or modified) by radiologists",
            model,
            registry=r,
        )
        self.model_positive_rate = Gauge(
            "gateway_model_positive_rate", "Share of analysed studies with an AI finding", model, registry=r
        )
        self.model_cusum = Gauge(
            "gateway_model_acceptance_cusum",
            "CUSUM statistic of the acceptance rate (alarm above its threshold)",
            model,
            registry=r,
        )
        self.model_psi = Gauge(
            "gateway_model_score_psi",
            "Population stability index of the scores against the baseline",
            model,
            registry=r,
        )
        self.model_alarms = Gauge(
            "gateway_model_drift_alarms", "Drift alarms raised so far", [*model, "kind"], registry=r
        )
        self.queue_depth_pacs = Gauge(
            "gateway_queue_depth_pacs",
            "Jobs waiting for a worker, per sending PACS (calling AE)",
            ["pacs"],
            registry=r,
        )
        self.triton_request_seconds = Histogram(
            "gateway_triton_request_seconds",
            "Triton inference request latency",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.triton_request_slices = Histogram(
            "gateway_triton_request_slices",
            "Slices (batch size) per Triton request",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.triton_request_studies = Histogram(
            "gateway_triton_request_studies",
            "Studies sharing one Triton request (cross-study batching of per-slice models)",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.studies_pending = Gauge(
            "gateway_studies_pending", "Studies receiving or waiting for completion", registry=r
        )
        self.studies_in_flight = Gauge("gateway_studies_in_flight", "Studies being analysed", registry=r)
        self.triton_up = Gauge("gateway_triton_up", "1 when Triton answers as ready", registry=r)
        self.degraded = Gauge("gateway_degraded", "1 when the gateway reports itself degraded", registry=r)
        self.outbox_pending = Gauge(
            "gateway_outbox_pending", "Delivery jobs waiting", ["destination"], registry=r
        )
        self.dead_letters = Gauge("gateway_dead_letters", "Delivery jobs in the dead-letter area", registry=r)
        self.spool_free_bytes = Gauge(
            "gateway_spool_free_bytes", "Free space on the spool file system", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
