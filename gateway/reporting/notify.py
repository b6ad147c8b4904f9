"""STAT events: a structured log line for every critical study, and an HTTP POST to a webhook if configured.

The event carries UIDs, pipeline, model version and scores - never patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from clients.http_post import HttpPoster
from gateway.core.retry import Backoff

logger = logging.getLogger("gateway.stat")
WEBHOOK_BACKOFF = Backoff(0.5)  # between the tries of one webhook call


@dataclass(frozen=True, kw_only=True)
class StatEvent:
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    algorithm_name: str
    algorithm_version: str
    model_name: str
    model_version: str
    study_score: float
    max_confidence: float
    findings: int
    sr_sop_instance_uid: str
    calling_ae: str
    event: str = "stat"
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True, kw_only=True)
class FailureEvent:
    """A routed series that could not be analysed: the destination gets a failure SR, operators this alert."""

    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    reason_kind: str  # the error class: DecodeError, InferenceError, ...
    reason: str
    sr_sop_instance_uid: str
    calling_ae: str
    event: str = "analysis_failed"
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class StatNotifier:
    def __init__(
        self,
        webhook_url: str = "",
        *,
        attempts: int = 3,
        timeout_s: float = 5.0,
        setting: str = "stat_webhook_url",
        http: HttpPoster | None = None,
    ) -> None:
        if webhook_url and not webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"{setting} must be an http(s) URL, got {webhook_url!r}")
        self.webhook_url = webhook_url
        self.attempts = attempts
        self.timeout_s = timeout_s
        # The gateway shares one client; a notifier made on its own, with a webhook, gets its own.
        self.http = http if http is not None or not webhook_url else HttpPoster()

    def log(self, event: StatEvent | FailureEvent) -> None:
        if isinstance(event, StatEvent):
            logger.warning("STAT %s", event.to_json())
        else:
            logger.error("analysis failed %s", event.to_json())

    async def post(self, event: StatEvent | FailureEvent) -> None:
        """POST the event to the webhook (nothing when none is configured), with a timeout per try and
        asynchronous waits between tries; raises DeliveryError when every try failed."""
        if not self.webhook_url or self.http is None:
            return
        await self.http.post(
            self.webhook_url,
            event.to_json().encode(),
            content_type="application/json",
            timeout_s=self.timeout_s,
            attempts=self.attempts,
            backoff=WEBHOOK_BACKOFF,
            what="webhook",
        )
