"""STAT events: a structured log line for every critical study, and an HTTP POST to a webhook if configured.

The event carries UIDs, pipeline, model version and scores - never patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from gateway.core.errors import DeliveryError
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
    ) -> None:
        if webhook_url and not webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"{setting} must be an http(s) URL, got {webhook_url!r}")
        self.webhook_url = webhook_url
        self.attempts = attempts
        self.timeout_s = timeout_s

    def emit(self, event: StatEvent | FailureEvent) -> None:
        """The log line, then the webhook (blocking, with its retries)."""
        self.log(event)
        self.post(event)

    def log(self, event: StatEvent | FailureEvent) -> None:
        if isinstance(event, StatEvent):
            logger.warning("STAT %s", event.to_json())
        else:
            logger.error("analysis failed %s", event.to_json())

    def post(self, event: StatEvent | FailureEvent) -> None:
        """POST the event to the webhook (nothing when none is configured); raises DeliveryError when every try
        failed. Blocking: callers on the event loop run it in an executor, in the background."""
        if not self.webhook_url:
            return
        body = event.to_json().encode()
        last = ""
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(
                self.webhook_url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    if 200 <= response.status < 300:
                        return
                    last = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            if attempt < self.attempts:
                time.sleep(WEBHOOK_BACKOFF.delay(attempt))
        raise DeliveryError(f"webhook {self.webhook_url} failed after {self.attempts} tries: {last}")
