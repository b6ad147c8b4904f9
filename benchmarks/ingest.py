"""Ingest throughput: the gateway's C-STORE receiver (durable spool on; with and without the system of record)
vs DCMTK storescp vs Orthanc.

One run on the same machine: a series of 512x512 CT slices is sent with DCMTK storescu (TCP_NODELAY=1 on
every side) to each receiver in turn, with fresh UIDs each repetition; images/s = slices / wall time of the
storescu run. The gateway side is its own receiver and spool (fsync of file and folder before success), with
nothing else running.

    python -m benchmarks.ingest --slices 200 --reps 3
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.e2e_latency import fresh_copy
from benchmarks.phantoms import write_head_ct
from gateway.config.settings import ReceiverSettings
from gateway.core.domain import InstanceRecord
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.database.recorder import Recorder
from gateway.inference.server import free_port
from gateway.ingest.native import NativeReceiver
from gateway.ingest.receiver import StoreSCP
from gateway.ingest.spool import Spool
from tests.support.servers import Orthanc, require_tool, storescu, wait_for

Receiver = Callable[[Path], Iterator[tuple[int, str]]]


@contextmanager
def _gateway_scp(
    spool: Spool, on_stored: Callable[[InstanceRecord], None] = lambda record: None
) -> Iterator[tuple[int, str]]:
    port = free_port()
    scp = StoreSCP(
        ReceiverSettings(port=port, min_free_disk_mb=0),
        spool,
        on_stored,
        allowed_calling_aes=frozenset({"BENCH"}),
    )
    scp.start()
    try:
        yield port, "AI_GATEWAY"
    finally:
        scp.stop()


def gateway_receiver(work: Path) -> Any:
    return _gateway_scp(Spool(work / "spool"))


@contextmanager
def native_receiver(work: Path) -> Iterator[tuple[int, str]]:
    """The native receiver (``make native``): DCMTK networking, the same spool layout and fsync-before-ack rule;
    each stored instance read back and handed on after its acknowledgement, as in the gateway."""
    port = free_port()
    receiver = NativeReceiver(
        ReceiverSettings(port=port, min_free_disk_mb=0, engine="native", accept_notices=False),
        Spool(work / "spool"),
        lambda record: None,
        allowed_calling_aes=frozenset({"BENCH"}),
    )
    receiver.start()
    try:
        yield port, "AI_GATEWAY"
    finally:
        receiver.stop()


@contextmanager
def gateway_with_record_receiver(work: Path) -> Iterator[tuple[int, str]]:
    """The same receiver with the system of record on (SQLite, WAL, full sync): each instance is handed to
    the recorder, whose writer thread indexes it in the database while the next ones arrive."""
    engine = engine_for(f"sqlite:///{work / 'gateway.db'}")
    migrate.upgrade(engine)
    recorder = Recorder(engine, "bench").start()
    try:
        with _gateway_scp(Spool(work / "spool"), recorder.instance_stored) as address:
            yield address
        if not recorder.flush(timeout_s=60):
            raise RuntimeError("the system of record did not catch up within 60 s")
    finally:
        recorder.close()
        engine.dispose()


class _DiscardingSpool(Spool):
    """Acknowledges without parsing or writing: the pynetdicom receiver's own ceiling (a profile, not a mode)."""

    def store(self, file_meta: Any, body: bytes, *, calling_ae: str) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid="1.2.3",
            sop_class_uid="1.2.3",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3",
            path=Path(),
            calling_ae=calling_ae,
            received_at=0.0,
        )


def pynetdicom_only_receiver(work: Path) -> Any:
    return _gateway_scp(_DiscardingSpool(work / "spool"))


@contextmanager
def storescp_receiver(work: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    (work / "storescp").mkdir(parents=True)
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [require_tool("storescp"), "-aet", "STORESCP", "-od", str(work / "storescp"), str(port)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [require_tool("echoscu"), "-aec", "STORESCP", "127.0.0.1", str(port)], capture_output=True
                ).returncode
                == 0
            ),
            timeout_s=20,
            what="storescp",
        )
        yield port, "STORESCP"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def orthanc_receiver(work: Path) -> Iterator[tuple[int, str]]:
    orthanc = Orthanc(work / "orthanc").start()
    try:
        yield orthanc.dicom_port, orthanc.aet
    finally:
        orthanc.stop()


RECEIVERS: dict[str, Callable[[Path], Any]] = {
    "gateway (durable spool)": gateway_receiver,
    "gateway, native receiver (durable spool)": native_receiver,
    "gateway (durable spool + system of record)": gateway_with_record_receiver,
    "DCMTK storescp": storescp_receiver,
    "Orthanc": orthanc_receiver,
    "profile: gateway receiver, spool discarded": pynetdicom_only_receiver,
}


def measure(slices: int, reps: int) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series = write_head_ct(root / "series", slices=slices, seed=1)
        copies = [fresh_copy(list(series.paths), root / f"copy{r}")[0] for r in range(reps)]
        # Receivers take turns within each repetition, so a machine whose speed drifts during the run (a shared
        # VM) affects every receiver alike and the ratios stay fair.
        rates: dict[str, list[float]] = {name: [] for name in RECEIVERS}
        for rep, paths in enumerate(copies):
            for index, (name, receiver) in enumerate(RECEIVERS.items()):
                with receiver(root / f"r{index}-{rep}") as (port, called):
                    started = time.perf_counter()
                    done = storescu(paths, port=port, calling_ae="BENCH", called_ae=called)
                    elapsed = time.perf_counter() - started
                if done.returncode != 0:
                    raise RuntimeError(f"storescu to {name} failed: {done.stderr[-500:]}")
                rates[name].append(slices / elapsed)
        for name, measured in rates.items():
            results.append(
                {
                    "receiver": name,
                    "images_per_s_median": round(statistics.median(measured), 1),
                    "images_per_s_min": round(min(measured), 1),
                    "images_per_s_max": round(max(measured), 1),
                }
            )
    by_name = {r["receiver"]: r["images_per_s_median"] for r in results}
    ratio = by_name["gateway (durable spool)"] / by_name["DCMTK storescp"]
    native = by_name["gateway, native receiver (durable spool)"] / by_name["DCMTK storescp"]
    with_record = by_name["gateway (durable spool + system of record)"] / by_name["gateway (durable spool)"]
    return {
        "machine": cli.machine(),
        "slices": slices,
        "reps": reps,
        "results": results,
        "gateway_vs_storescp": round(ratio, 2),  # the pynetdicom receiver
        "native_vs_storescp": round(native, 2),
        "with_record_vs_without": round(with_record, 2),  # target >= 0.95
        "target_met": max(ratio, native) >= 0.8,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Ingest, {report['slices']} x 512x512 CT slices per run, storescu with TCP_NODELAY=1, "
        f"{report['reps']} runs ({report['machine']}):",
        "",
        "| receiver | images/s median (min-max) |",
        "|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['receiver']} | {r['images_per_s_median']} ({r['images_per_s_min']}-{r['images_per_s_max']}) |"
        )
    verdict = "met" if report["target_met"] else "MISSED"
    record = report["with_record_vs_without"]
    lines += [
        "",
        f"Gateway / storescp = {report['gateway_vs_storescp']} with the pynetdicom receiver, "
        f"{report.get('native_vs_storescp', '-')} with the native one (target >= 0.8: {verdict}).",
        f"With the system of record / without = {record} (target >= 0.95: {'met' if record >= 0.95 else 'MISSED'}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=200, reps=3)


if __name__ == "__main__":
    sys.exit(main())
