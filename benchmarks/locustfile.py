"""Locust load test of the gateway: simulated PACS send studies over DICOM; the results come back to a receiving
SCP this file runs; per-study latency (last instance sent -> SR received) is checked against targets.

User classes:
* ``RoutinePacs`` / ``StatPacs`` - each simulated user is one PACS (its own calling AE title) that sends whole
  studies with pynetdicom (one association per study; STAT studies carry Requested Procedure Priority STAT);
  ``BENCH_ROUTINE_USERS`` / ``BENCH_STAT_USERS`` of each, one study per ``BENCH_PACING_S`` seconds
  (``BENCH_ROUTINE_PACING_S`` for routine PACS).
  Modality and size: ``BENCH_STUDY`` = ``ct_head`` | ``ct_chest`` | ``cxr`` and ``BENCH_SLICES``.
* ``TritonUser`` (only when ``BENCH_TRITON_USERS`` > 0) - sends one ensemble request straight to Triton's gRPC
  endpoint (``BENCH_TRITON_GRPC``, through gevent-aware gRPC), for the model's own latency under the same load.

Locust reports each association as ``DICOM / C-STORE study`` and each study's end-to-end latency as
``E2E / <priority>``, in its CSV and HTML reports. When the run stops, the file waits for outstanding results
(``BENCH_DRAIN_S``), prints the SLO table, writes ``slo_report.json`` / ``.md`` and ``latency.svg`` into
``BENCH_OUT``, and sets the exit code to 1 when a target in ``BENCH_SLO`` (TOML) is missed or a study got no
result. Run it through ``python -m benchmarks.run_bench`` (``make bench``), which starts Triton and the gateway.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pydicom
import tomllib
from locust import User, between, constant_pacing, events, task
from pydicom.uid import generate_uid
from pynetdicom import AE

from gateway.demo.phantoms import Lesion, Nodule, Opacity, write_chest_ct, write_cxr, write_head_ct

GATEWAY = os.environ.get("BENCH_GATEWAY", "127.0.0.1:11112")
GATEWAY_AE = os.environ.get("BENCH_GATEWAY_AE", "AI_GATEWAY")
SCP_PORT = int(os.environ.get("BENCH_SCP_PORT", "11200"))
STUDY = os.environ.get("BENCH_STUDY", "ct_head")
SLICES = int(os.environ.get("BENCH_SLICES", "24"))
PACING_S = float(os.environ.get("BENCH_PACING_S", "4"))
DRAIN_S = float(os.environ.get("BENCH_DRAIN_S", "90"))
SLO_FILE = Path(os.environ.get("BENCH_SLO", Path(__file__).with_name("slo.toml")))
OUT = Path(os.environ.get("BENCH_OUT", "benchmarks/results"))
PERCENTILES = (50, 95)


def _template() -> list[pydicom.Dataset]:
    """One phantom study of the configured kind, read into memory once; every send copies it with new UIDs."""
    with tempfile.TemporaryDirectory() as tmp:
        if STUDY == "ct_chest":
            nodules = (Nodule(x_mm=-70.0, y_mm=-20.0, z_mm=SLICES * 2.5 / 2, diameter_mm=10.0),)  # mid-volume
            series = write_chest_ct(Path(tmp), slices=SLICES, nodules=nodules, seed=1)
        elif STUDY == "cxr":
            series = write_cxr(
                Path(tmp), opacities=(Opacity(x_mm=80.0, y_mm=-40.0, diameter_mm=20.0),), seed=1
            )
        else:
            lesion = Lesion(x=300, y=220, slice=SLICES // 2, radius_mm=8.0, hu=72.0)
            series = write_head_ct(Path(tmp), slices=SLICES, lesions=(lesion,), seed=1)
        return [pydicom.dcmread(p) for p in series.paths]


class Tracker:
    """Studies sent and results received, shared by every simulated PACS (greenlets) and the SCP (thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[float, str]] = {}  # study UID -> (last instance sent at, priority)
        self.latency_ms: dict[str, list[float]] = {}  # priority -> latencies
        self.done: set[str] = set()
        self.environment: Any = None
        self.first_sent_at = 0.0
        self.last_result_at = 0.0

    def study_sent(self, study_uid: str, priority: str) -> None:
        with self.lock:
            self.sent[study_uid] = (time.time(), priority)
            self.first_sent_at = self.first_sent_at or time.time()

    def result_received(self, study_uid: str, at: float | None = None) -> None:
        """The study's SR arrived (at ``at``, Unix s: when the result SCP got it; default now)."""
        arrived = time.time() if at is None else at
        with self.lock:
            if study_uid not in self.sent or study_uid in self.done:
                return
            self.done.add(study_uid)
            self.last_result_at = arrived
            sent_at, priority = self.sent[study_uid]
            latency = (arrived - sent_at) * 1000.0
            self.latency_ms.setdefault(priority, []).append(latency)
        if self.environment is not None:
            self.environment.events.request.fire(
                request_type="E2E", name=priority, response_time=latency, response_length=0, exception=None
            )

    def outstanding(self) -> int:
        with self.lock:
            return len(self.sent) - len(self.done)


TRACKER = Tracker()
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
_SCP: Any = None  # the result SCP's process


def _read_results(process: Any) -> None:
    """Each line of the result SCP: an SR's arrival time and study."""
    for line in process.stdout:
        at, _, study_uid = line.decode().strip().partition("\t")
        if study_uid:
            TRACKER.result_received(study_uid, float(at))


@events.init.add_listener
def _start_scp(environment: Any, **_: Any) -> None:
    """The result SCP runs in a process of its own (benchmarks/result_scp.py): in this gevent-patched process its
    threads would be greenlets that the simulated PACS starve under saturation, so that a C-STORE response could
    wait for the gateway's DIMSE timeout - a stall of the load generator that the STAT figures carried."""
    global _SCP
    import sys

    from gevent import subprocess as gevent_subprocess

    TRACKER.environment = environment
    _SCP = gevent_subprocess.Popen(
        [sys.executable, "-m", "benchmarks.result_scp", "--port", str(SCP_PORT)],
        stdout=gevent_subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],  # the repository root: benchmarks is a package there
    )
    gevent.spawn(_read_results, _SCP)


class _Pacs(User):
    abstract = True
    priority = "ROUTINE"
    wait_time = constant_pacing(PACING_S)
    _numbers = itertools.count(1)
    _template: list[pydicom.Dataset] | None = None

    def on_start(self) -> None:
        if _Pacs._template is None:
            _Pacs._template = _template()
        self.ae_title = f"PACS{next(self._numbers):02d}"[:16]
        self.ae = AE(ae_title=self.ae_title)
        self.ae.maximum_pdu_size = 0
        for sop_class in {str(ds.SOPClassUID) for ds in _Pacs._template}:
            self.ae.add_requested_context(sop_class, pydicom.uid.ExplicitVRLittleEndian)

    @task
    def send_study(self) -> None:
        assert _Pacs._template is not None
        study, series = generate_uid(), generate_uid()
        datasets = []
        for source in _Pacs._template:
            ds = copy.deepcopy(source)  # a shallow copy would share (and change) the template's elements
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            if self.priority != "ROUTINE":
                ds.RequestedProcedurePriority = self.priority
            datasets.append(ds)
        host, port = GATEWAY.rsplit(":", 1)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            assoc = self.ae.associate(host, int(port), ae_title=GATEWAY_AE)
            if not assoc.is_established:
                raise ConnectionError("association rejected or aborted")
            try:
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    if not status or status.Status != 0x0000:
                        raise RuntimeError(f"C-STORE status {getattr(status, 'Status', None)}")
            finally:
                assoc.release()
            TRACKER.study_sent(study, self.priority)
        except Exception as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="DICOM",
            name=f"C-STORE study ({len(datasets)} images)",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=len(datasets),
            exception=error,
        )


class RoutinePacs(_Pacs):
    fixed_count = int(os.environ.get("BENCH_ROUTINE_USERS", "3"))
    priority = "ROUTINE"
    wait_time = constant_pacing(float(os.environ.get("BENCH_ROUTINE_PACING_S", PACING_S)))


class StatPacs(_Pacs):
    fixed_count = int(os.environ.get("BENCH_STAT_USERS", "1"))
    priority = "STAT"


TRITON_USERS = int(os.environ.get("BENCH_TRITON_USERS", "0"))
if TRITON_USERS:
    # gRPC's own threads would block Locust's gevent loop; this makes them cooperate (before any channel exists).
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()


class TritonUser(User):
    """One 16-slice request to the head CT ensemble over Triton's gRPC endpoint, reported as ``gRPC / ...``."""

    fixed_count = TRITON_USERS
    wait_time = between(0.5, 1.0)

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.triton = grpcclient.InferenceServerClient(os.environ.get("BENCH_TRITON_GRPC", "127.0.0.1:8001"))
        rng = np.random.default_rng(0)
        self.body = rng.normal(30.0, 10.0, (16, 256, 256)).astype(np.float32)

    def on_stop(self) -> None:
        self.triton.close()

    @task
    def infer(self) -> None:
        tensor = self.grpc.InferInput("HU", list(self.body.shape), "FP32")
        tensor.set_data_from_numpy(self.body)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.triton.infer("ct_head_hyperdensity", [tensor], client_timeout=60.0)
        except Exception as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="gRPC",
            name="ct_head ensemble (16 slices)",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=int(self.body.nbytes),
            exception=error,
        )


# -- SLO gate ------------------------------------------------------------------------------------------------


def load_targets(path: Path) -> dict[str, dict[str, float]]:
    raw = tomllib.loads(path.read_text())
    targets = raw.get("targets", {})
    return {str(k).upper(): {m: float(v) for m, v in t.items()} for k, t in targets.items()}


def evaluate_slo(
    latency_ms: dict[str, list[float]], targets: dict[str, dict[str, float]], missing: int
) -> dict[str, Any]:
    rows = []
    passed = missing == 0
    for priority, target in sorted(targets.items()):
        values = latency_ms.get(priority, [])
        row: dict[str, Any] = {"priority": priority, "studies": len(values)}
        for p in PERCENTILES:
            key = f"p{p}_ms"
            measured = float(np.percentile(values, p)) if values else None
            row[key] = None if measured is None else round(measured, 1)
            if key in target:
                row[f"{key}_target"] = target[key]
                ok = measured is not None and measured <= target[key]
                row[f"{key}_ok"] = ok
                passed = passed and ok
        rows.append(row)
    return {"passed": passed, "missing_results": missing, "rows": rows}


def slo_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| priority | studies | p50 ms (target) | p95 ms (target) |",
        "|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = []
        for p in PERCENTILES:
            key = f"p{p}_ms"
            target = r.get(f"{key}_target")
            verdict = "" if target is None else (" ok" if r.get(f"{key}_ok") else " MISSED")
            cells.append(f"{r[key]} ({target if target is not None else '-'}){verdict}")
        lines.append(f"| {r['priority']} | {r['studies']} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append(
        f"SLO {'PASSED' if report['passed'] else 'FAILED'}; studies without a result: {report['missing_results']}"
    )
    return "\n".join(lines) + "\n"


def latency_svg(latency_ms: dict[str, list[float]], width: int = 480, height: int = 300) -> str:
    """Sorted per-study latencies per priority (a quantile plot)."""
    colours = {"STAT": "#c00", "URGENT": "#e80", "ROUTINE": "#06c"}
    top = max([v for values in latency_ms.values() for v in values] + [1.0])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<line x1="50" y1="{height - 30}" x2="{width - 10}" y2="{height - 30}" stroke="black"/>',
        f'<line x1="50" y1="10" x2="50" y2="{height - 30}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">study quantile</text>',
        f'<text x="5" y="20" font-size="11">{top:.0f} ms</text>',
    ]
    for row, (priority, values) in enumerate(sorted(latency_ms.items())):
        ordered = sorted(values)
        n = len(ordered)
        pts = " ".join(
            f"{50 + (i + 0.5) / n * (width - 60):.1f},{height - 30 - v / top * (height - 50):.1f}"
            for i, v in enumerate(ordered)
        )
        colour = colours.get(priority, "#333")
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(
            f'<text x="{width - 90}" y="{25 + 15 * row}" font-size="12" fill="{colour}">{priority}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


@events.test_stop.add_listener
def _slo_gate(environment: Any, **_: Any) -> None:
    """When the run time is up: wait for outstanding results, then judge the targets (before Locust closes its
    reports, so its CSV writer is still alive during the wait)."""
    deadline = time.time() + DRAIN_S
    while TRACKER.outstanding() and time.time() < deadline:
        gevent.sleep(0.2)
    if _SCP is not None:
        _SCP.terminate()
        _SCP.wait(timeout=10)  # reaped: its CPU time counts in the load generator's (run_bench's CPU line)
    with TRACKER.lock:
        latency = {k: list(v) for k, v in TRACKER.latency_ms.items()}
        missing = len(TRACKER.sent) - len(TRACKER.done)
    sending = {"ROUTINE": RoutinePacs.fixed_count, "STAT": StatPacs.fixed_count}
    # A class no simulated PACS sends (a routine-only or STAT-only run) has no target to meet.
    targets = {k: v for k, v in load_targets(SLO_FILE).items() if sending.get(k, 1) > 0}
    report = evaluate_slo(latency, targets, missing)
    report["slo_file"] = str(SLO_FILE)
    with TRACKER.lock:
        span = TRACKER.last_result_at - TRACKER.first_sent_at
        report["studies_per_min"] = round(len(TRACKER.done) / span * 60.0, 2) if span > 0 else None
    report["study"] = {"kind": STUDY, "slices": SLICES}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "slo_report.json").write_text(json.dumps({**report, "latency_ms": latency}, indent=2))
    (OUT / "slo_report.md").write_text(slo_markdown(report))
    (OUT / "latency.svg").write_text(latency_svg(latency))
    print(slo_markdown(report), flush=True)
    if not report["passed"]:
        environment.process_exit_code = 1
    summary = {k: round(statistics.median(v), 1) for k, v in latency.items() if v}
    print(f"median end-to-end ms by priority: {summary}", flush=True)
