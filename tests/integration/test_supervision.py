"""Supervision of the gateway's child processes on real components: a tritonserver killed under load is restarted
and every study finishes without an operator, and a gateway killed by SIGKILL leaves no child behind (Triton and
its backend stubs included), so the next start never finds a second server running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.support.servers import http_json, storescu, wait_for

pytestmark = pytest.mark.integration

PIPELINE = (
    '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
    'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
)


def _config(tmp_path: Path, port: int) -> Path:
    """A gateway that starts its own Triton (no [triton] url)."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 2\n'
        f"[receiver]\nport = {port}\n[http]\nport = 0\n[triton]\nstartup_timeout_s = 240\n" + PIPELINE
    )
    return config


def _parents() -> dict[int, int]:
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def _descendants(pid: int) -> set[int]:
    parents = _parents()
    tree, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _done(audit: AuditLog) -> set[str]:
    return {e["study"] for e in audit.read() if e["event"] == "study_done"}


def _health_or_none(url: str) -> tuple[int, Any] | None:
    """/health, or None when it did not answer within the client's timeout (a clean-clone PostgreSQL run on two
    busy cores once took longer while Triton restarted; the test asks again rather than failing on that)."""
    try:
        return http_json(url)
    except OSError:
        return None


def test_triton_killed_under_load_is_restarted_and_every_study_finishes(
    tmp_path: Path, model_repository: Path
) -> None:
    port = free_port()
    settings = load_settings(_config(tmp_path, port))
    audit = AuditLog(settings.audit_log)
    studies = [write_head_ct(tmp_path / f"s{i}", slices=8, rows=256, cols=256, seed=90 + i) for i in range(6)]
    gateway = Gateway(settings).start()
    try:
        assert gateway.api is not None and gateway.triton_server is not None
        health_url = f"http://127.0.0.1:{gateway.api.port}/health"
        server = gateway.triton_server
        for study in studies:
            assert storescu(list(study.paths), port=port, calling_ae="STORESCU").returncode == 0
        wait_for(
            lambda: any(e["event"] == "series_analysed" for e in audit.read()),
            timeout_s=60,
            what="first analysis",
        )
        victim = server.server_pid
        assert victim is not None
        stubs = {p for p in _descendants(victim) if "triton_python_backend_stub" in _cmdline(p)}
        assert stubs, "the server's Python-backend stubs are running"
        killed_at = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        # The dead server's stubs do not linger as orphans.
        wait_for(lambda: not _alive(stubs | {victim}), timeout_s=20, what="the killed server's stubs to go")
        _, health = wait_for(
            lambda: (
                (r := _health_or_none(health_url)) is not None
                and r[1]["children"]["tritonserver"]["restarts"] >= 1
                and r[1]["triton"]["ready"]
                and r
            ),
            timeout_s=240,
            what="Triton restarted and ready",
        )
        ready_at = time.monotonic()
        assert (
            health["children"]["tritonserver"]["running"]
            and health["children"]["tritonserver"]["pid"] != victim
        )
        wait_for(
            lambda: {s.study_uid for s in studies} <= _done(audit),
            timeout_s=180,
            what="every study to finish",
        )
        finished_at = time.monotonic()
        assert {s.study_uid for s in studies} <= _done(audit)
        for study in studies:
            assert len(list((settings.results_dir / study.study_uid).glob("SR_*.dcm"))) == 1
        failed = [e for e in audit.read() if e["event"] == "series_failed"]
        assert failed == [], "a study failed instead of waiting for the restarted server"
        metrics = http_json(f"http://127.0.0.1:{gateway.api.port}/metrics")[1]
        assert 'gateway_child_restarts{child="tritonserver"} 1.0' in metrics
        print(
            f"\nTriton kill -9 under load: restarted and ready {ready_at - killed_at:.1f}s after the kill; "
            f"{len(studies)} studies, 0 lost, all finished {finished_at - ready_at:.1f}s after the restart"
        )
    finally:
        gateway.stop()
    assert not server.running


def test_sigkilled_gateway_leaves_no_child_triton_included(tmp_path: Path, model_repository: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    out = open(tmp_path / "gateway.log", "ab")  # noqa: SIM115 - closed below
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=out, stderr=out
    )
    try:

        def listening() -> bool:
            assert gateway.poll() is None, "gateway exited during start-up"
            import socket

            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout_s=240, what="gateway to listen")
        children = _descendants(gateway.pid)
        servers = {p for p in children if "bin/tritonserver" in _cmdline(p)}
        stubs = {p for p in children if "triton_python_backend_stub" in _cmdline(p)}
        assert servers and stubs, "the gateway started a tritonserver with its backend stubs"
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(timeout=10)
        wait_for(lambda: not _alive(children), timeout_s=30, what="every child of the killed gateway to exit")
    finally:
        if gateway.poll() is None:
            gateway.kill()
        out.close()
    # A new gateway on the same configuration starts cleanly: nothing holds its ports or its data.
    restarted = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)])
    try:
        wait_for(lambda: _serving(port, restarted), timeout_s=240, what="the restarted gateway to listen")
    finally:
        restarted.send_signal(signal.SIGTERM)
        try:
            restarted.wait(timeout=60)
        finally:
            if (
                restarted.poll() is None
            ):  # it did not stop: fail, but leave no gateway (its guard ends Triton)
                restarted.kill()
                restarted.wait(timeout=30)
    assert restarted.returncode == 0


def _serving(port: int, process: subprocess.Popen[bytes]) -> bool:
    import socket

    assert process.poll() is None, "the restarted gateway exited"
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of another process (Linux tgkill), as the kernel may do with a kill()."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(
    sys.platform != "linux" or not sys.maxsize > 2**32, reason="tgkill syscall number is x86_64 Linux"
)
def test_sigterm_delivered_to_any_thread_stops_the_gateway(tmp_path: Path) -> None:
    """SIGTERM that the kernel hands to a worker thread instead of the main thread still stops `gateway serve`.
    (Before: the main thread sat in threading.Event.wait(), never ran the Python handler, and the gateway ran on.)"""
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(_config(tmp_path, port))]
    )
    try:
        wait_for(lambda: _serving(port, gateway), timeout_s=240, what="the gateway to listen")
        threads = [
            int(t.name) for t in Path(f"/proc/{gateway.pid}/task").iterdir() if int(t.name) != gateway.pid
        ]
        assert threads, "the gateway runs worker threads"
        _tgkill(gateway.pid, threads[-1], signal.SIGTERM)
        assert gateway.wait(timeout=60) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(timeout=30)
