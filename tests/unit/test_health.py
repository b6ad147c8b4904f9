"""What /health reports, from hand-built snapshots."""

from __future__ import annotations

from typing import Any

from gateway.ops.health import LoopState, OtherState, health_report


def _other(children: dict[str, Any]) -> OtherState:
    return OtherState(
        triton_url="127.0.0.1:8001",
        failing_destinations={},
        spool_error="",
        audit_error="",
        audit_backlog=0,
        workers_configured=2,
        worker_restarts=0,
        studies_pending=0,
        outbox_pending={},
        dead_letters=0,
        children=children,
        disk={},
    )


def _triton_child(running: bool) -> dict[str, Any]:
    return {
        "encoders": {"restarts": 0},
        "tritonserver": {"running": running, "pid": 42 if running else None, "restarts": 1, "last_exit": ""},
    }


def test_a_managed_triton_that_is_not_running_is_not_ready_whatever_the_last_probe_said() -> None:
    # The supervisor sees the kill at once; the readiness probe only at its next tick. Health follows the
    # supervisor (this was the race where /health said "ready" with the server dead and a restart counted).
    report = health_report(
        LoopState(triton_ready=True, workers_started=True, workers_alive=2), _other(_triton_child(False))
    )
    assert report["triton"]["ready"] is False
    assert report["status"] == "degraded"
    assert any("Triton" in reason for reason in report["reasons"])


def test_a_running_managed_triton_is_ready_when_probed_ready() -> None:
    report = health_report(
        LoopState(triton_ready=True, workers_started=True, workers_alive=2), _other(_triton_child(True))
    )
    assert report["triton"]["ready"] is True
    assert report["status"] == "ok"


def test_a_remote_triton_is_judged_by_the_probe_alone() -> None:
    up = health_report(LoopState(triton_ready=True), _other({"encoders": {"restarts": 0}}))
    down = health_report(LoopState(triton_ready=False), _other({"encoders": {"restarts": 0}}))
    assert up["triton"]["ready"] is True and down["triton"]["ready"] is False
    assert down["status"] == "degraded"
