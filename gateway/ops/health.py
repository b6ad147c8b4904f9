"""What ``/health`` says and what ``/metrics`` gauges show, built from snapshots.

State the event loop owns (the job queue, the study tracker, the workers, Triton's readiness) is copied into a
:class:`LoopState` *on the loop* and handed to the HTTP thread; the HTTP thread never iterates loop-owned
structures (the race of the issue that introduced this module). State owned by other threads (the outbox's
failing destinations) is read through their locked snapshots.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.ops.metrics import Metrics


@dataclass(frozen=True, kw_only=True)
class LoopState:
    """A copy of what the event loop owns, taken on the loop."""

    triton_ready: bool = False
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    queue: dict[str, int] = field(default_factory=dict)
    queue_by_pacs: dict[str, int] = field(default_factory=dict)
    studies_in_flight: int = 0
    workers_alive: int = 0
    workers_started: bool = False
    resource_error: str = ""
    cluster: dict[str, Any] = field(
        default_factory=dict
    )  # cluster mode: nodes alive, held studies, last error


@dataclass(frozen=True, kw_only=True)
class OtherState:
    """What the rest of the gateway reports (each part answers for its own thread safety)."""

    triton_url: str
    failing_destinations: Mapping[str, str]
    spool_error: str
    audit_error: str
    audit_backlog: int
    workers_configured: int
    worker_restarts: int
    studies_pending: int
    outbox_pending: dict[str, int]
    dead_letters: int
    children: dict[str, Any]
    disk: dict[str, Any]
    node: str = ""
    database: dict[str, Any] = field(default_factory=dict)  # url (no password), backlog, error


def health_report(loop: LoopState, other: OtherState) -> dict[str, Any]:
    """Status "ok" or "degraded" with the reasons; studies are accepted either way."""
    reasons = []
    managed = other.children.get("tritonserver")
    # A Triton this gateway runs is ready only while its process runs: the probe's flag may be a few seconds
    # old when the server has just died (the supervisor knows at once).
    triton_ready = loop.triton_ready and (managed is None or bool(managed.get("running")))
    if not triton_ready:
        reasons.append(f"Triton at {other.triton_url} is not ready: analyses are queued and retried")
    for destination, error in sorted(other.failing_destinations.items()):
        reasons.append(f"destination {destination} is failing ({error[:120]}): results are queued")
    if other.spool_error:
        reasons.append(other.spool_error)
    if loop.resource_error:
        reasons.append(f"results cannot be written: {loop.resource_error}; analyses are retried")
    if other.audit_error:
        reasons.append(
            f"audit trail cannot be written ({other.audit_error}): {other.audit_backlog} event(s) held"
        )
    if other.database.get("error"):
        reasons.append(
            f"system of record cannot be written ({other.database['error'][:160]}): "
            f"{other.database.get('backlog', 0)} write(s) held; studies are still received and analysed"
        )
    if loop.cluster.get("error"):
        reasons.append(
            f"the cluster's queue cannot be used ({loop.cluster['error'][:160]}): studies are still received; "
            "analysis resumes when the database answers"
        )
    if loop.workers_started and loop.workers_alive < other.workers_configured:
        reasons.append(f"only {loop.workers_alive} of {other.workers_configured} analysis workers alive")
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "node": other.node,
        "database": other.database,
        "triton": {"url": other.triton_url, "ready": triton_ready, "endpoints": loop.endpoints},
        "queue": loop.queue,  # in cluster mode: the whole cluster's
        **({"cluster": loop.cluster} if loop.cluster else {}),
        "queue_by_pacs": loop.queue_by_pacs,
        "studies_pending": other.studies_pending,
        "studies_in_flight": loop.studies_in_flight,
        "outbox_pending": other.outbox_pending,
        "dead_letters": other.dead_letters,
        "workers": {
            "alive": loop.workers_alive,
            "configured": other.workers_configured,
            "restarts": other.worker_restarts,
        },
        "children": other.children,
        "disk": other.disk,
    }


def update_gauges(metrics: Metrics, health: Mapping[str, Any], spool_root: Path) -> None:
    """Set every gauge of ``/metrics`` from one health report (counters are counted where things happen)."""
    m = metrics
    m.degraded.set(1 if health["status"] != "ok" else 0)
    m.triton_up.set(1 if health["triton"]["ready"] else 0)
    for priority, depth in health["queue"].items():
        m.queue_depth.labels(priority).set(depth)
    m.queue_depth_pacs.clear()
    for pacs, depth in health["queue_by_pacs"].items():
        m.queue_depth_pacs.labels(pacs).set(depth)
    m.studies_pending.set(health["studies_pending"])
    m.studies_in_flight.set(health["studies_in_flight"])
    for destination, count in health["outbox_pending"].items():
        m.outbox_pending.labels(destination).set(count)
    m.dead_letters.set(health["dead_letters"])
    m.workers_alive.set(health["workers"]["alive"])
    hours = health["disk"]["hours_until_watermark"]
    m.disk_hours_left.set(-1 if hours is None else hours)
    m.disk_fill_rate.set(health["disk"]["fill_rate_bytes_per_hour"])
    for child, state in health["children"].items():
        m.child_restarts.labels(child).set(state["restarts"])
    m.spool_free_bytes.set(shutil.disk_usage(spool_root).free)


def snapshot_on_loop(
    loop: asyncio.AbstractEventLoop | None,
    loop_thread: threading.Thread | None,
    take: Callable[[], LoopState],
    timeout_s: float,
) -> tuple[LoopState, str]:
    """``take()`` run on the event loop (from another thread: handed over, waited for), and a problem to report
    when the loop cannot answer."""
    if loop is None or loop.is_closed() or not loop.is_running():
        return LoopState(), "" if loop_thread is None else "the event loop is not running"
    if threading.current_thread() is loop_thread:
        return take(), ""

    async def snapshot() -> LoopState:
        return take()

    try:
        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=timeout_s), ""
    except Exception as exc:  # a loop that does not answer within timeout_s is itself the news
        return LoopState(), f"the event loop did not answer within {timeout_s:.0f} s ({type(exc).__name__})"
