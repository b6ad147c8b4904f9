"""Triton errors are classified by their gRPC status code: "not now" is retried, the server's answer is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from clients.triton import is_transient


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        ("StatusCode.UNAVAILABLE", True),  # server down or restarting, model not ready
        ("StatusCode.DEADLINE_EXCEEDED", True),
        ("StatusCode.NOT_FOUND", True),  # model not loaded (yet)
        ("StatusCode.RESOURCE_EXHAUSTED", True),
        ("StatusCode.INVALID_ARGUMENT", False),  # wrong shape or datatype: the same request fails again
        ("StatusCode.INTERNAL", False),
        (None, False),
    ],
)
def test_status_code_decides(status: str | None, transient: bool) -> None:
    assert is_transient(InferenceServerException("some message", status=status)) is transient


def test_the_message_text_no_longer_decides() -> None:
    """A permanent error whose text happens to say "unavailable" (a tensor name, a parameter) is not retried."""
    exc = InferenceServerException(
        "input 'UNAVAILABLE_MASK' not found: unavailable", status="StatusCode.INVALID_ARGUMENT"
    )
    assert not is_transient(exc)


def test_transport_errors_are_transient_and_our_own_bugs_are_not() -> None:
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(TimeoutError())
    assert not is_transient(ValueError("bad tensor"))


def test_shared_memory_regions_of_dead_gateway_processes_are_removed(tmp_path: Path) -> None:
    """POSIX shared memory outlives a SIGKILLed process: a long-lived host's /dev/shm filled up with the regions
    of killed gateways. Those of processes that are gone (and old enough) are removed; live ones never."""
    import os
    import subprocess
    import sys
    import time

    from clients.triton_shm import remove_stale_regions

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    old = time.time() - 600
    names = {
        "dead": f"gateway_0_{dead_pid}_3",
        "dead but new": f"gateway_1_{dead_pid}_4",
        "alive": f"gateway_0_{os.getpid()}_0",
        "not ours": f"triton_python_backend_shm_region_{dead_pid}",
    }
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "dead but new":
            os.utime(tmp_path / name, (old, old))
    assert remove_stale_regions(tmp_path) == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
