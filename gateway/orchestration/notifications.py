"""Webhook calls (STAT, analysis failure) in the background: the log line goes out at once, the POST with its
retries runs as a task on the event loop while the worker goes on, so a dead or slow webhook never holds an
analysis worker (nor a thread).
A call that fails every try is logged and audited; a stopping gateway waits for calls in flight, bounded."""

from __future__ import annotations

import asyncio
import logging

from gateway.ops.events import EventSink
from gateway.reporting.notify import FailureEvent, StatEvent, StatNotifier

logger = logging.getLogger(__name__)


class BackgroundNotifications:
    def __init__(self, events: EventSink) -> None:
        self.events = events
        self._in_flight: set[asyncio.Task[None]] = set()

    def send(self, notifier: StatNotifier, event: StatEvent | FailureEvent, *, failed_event: str) -> None:
        """Log ``event`` now and POST it in the background (only on the event loop)."""
        notifier.log(event)
        if not notifier.webhook_url:
            return
        task = asyncio.create_task(self._post(notifier, event, failed_event), name=f"webhook-{failed_event}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _post(self, notifier: StatNotifier, event: StatEvent | FailureEvent, failed_event: str) -> None:
        try:
            await notifier.post(event)
        except Exception as exc:  # reported; the analysis it was about has gone on
            logger.error("%s: %s", failed_event.replace("_", " "), exc)
            self.events.record(failed_event, study=event.study_instance_uid, reason=str(exc)[:300])
            return
        self.events.record(failed_event.removesuffix("_failed") + "_sent", study=event.study_instance_uid)

    async def drain(self, timeout_s: float) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
