"""The load benchmark's SLO gate passes and fails as it should: the same short Locust run against the real
gateway and Triton exits 0 under reachable targets and non-zero under an impossible one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, triton: str, name: str, targets: str, *extra: str) -> tuple[int, dict, str]:
    slo = tmp_path / f"{name}.toml"
    slo.write_text(targets)
    out = tmp_path / name
    command = [
        sys.executable, "-m", "benchmarks.run_bench", "--pacs", "2", "--duration", "8s", "--slices", "8",
        "--pacing", "3", "--drain", "60", "--slo", str(slo), "--out", str(out), "--triton-url", triton, *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    report_file = out / "slo_report.json"
    assert report_file.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, json.loads(report_file.read_text()), done.stdout


def test_slo_gate_fails_on_an_impossible_target_and_passes_a_reachable_one(
    tmp_path: Path, triton: str
) -> None:
    impossible = "[targets.ROUTINE]\np50_ms = 1\np95_ms = 2\n"
    code, report, stdout = run_bench(tmp_path, triton, "impossible", impossible)
    assert code != 0
    assert report["passed"] is False and report["missing_results"] == 0
    [routine] = [r for r in report["rows"] if r["priority"] == "ROUTINE"]
    assert routine["studies"] >= 1 and routine["p50_ms"] > 1 and routine["p50_ms_ok"] is False
    assert "SLO FAILED" in stdout
    for name in ("locust_stats.csv", "locust.html", "latency.svg", "slo_report.md"):
        assert (tmp_path / "impossible" / name).stat().st_size > 0

    reachable = "[targets.ROUTINE]\np50_ms = 120000\np95_ms = 240000\n[targets.STAT]\np95_ms = 240000\n"
    code, report, stdout = run_bench(tmp_path, triton, "reachable", reachable, "--triton-users", "1")
    assert report["passed"] is True and code == 0, stdout[-2000:]
    assert {r["priority"] for r in report["rows"] if r["studies"]} == {"ROUTINE", "STAT"}
    # The Triton gRPC user class ran next to the simulated PACS, without a failed request.
    stats = (tmp_path / "reachable" / "locust_stats.csv").read_text().splitlines()
    [grpc_row] = [line.split(",") for line in stats if line.startswith("gRPC,")]
    assert int(grpc_row[2]) >= 1 and int(grpc_row[3]) == 0, grpc_row
