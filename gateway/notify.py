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

from gateway.errors import DeliveryError

logger = logging.getLogger("gateway.stat")


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


class StatNotifier:
    def __init__(self, webhook_url: str = "", *, attempts: int = 3, timeout_s: float = 5.0) -> None:
        if webhook_url and not webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"stat_webhook_url must be an http(s) URL, got {webhook_url!r}")
        self.webhook_url = webhook_url
        self.attempts = attempts
        self.timeout_s = timeout_s

    def emit(self, event: StatEvent) -> None:
        logger.warning("STAT %s", event.to_json())
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
                time.sleep(0.5 * 2 ** (attempt - 1))
        raise DeliveryError(f"STAT webhook {self.webhook_url} failed after {self.attempts} tries: {last}")
