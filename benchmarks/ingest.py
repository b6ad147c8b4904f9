"""Ingest throughput: the gateway's C-STORE receivers (pynetdicom and native; durable spool on; with and without
the system of record) vs DCMTK storescp vs Orthanc, on one association and on 4 and 8 concurrent ones, with the
receiving side's CPU seconds per 1,000 images.

One run on the same machine: a series of 512x512 CT slices is sent with DCMTK storescu (TCP_NODELAY=1 on
every side) to each receiver in turn, with fresh UIDs each repetition; images/s = slices / wall time of the
storescu run. The gateway side is its own receiver and spool (fsync of file and folder before success), with
nothing else running.

    python -m benchmarks.ingest --slices 200 --reps 3
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.e2e_latency import fresh_copy
from gateway.config.settings import ReceiverSettings
from gateway.core.domain import InstanceRecord
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.database.recorder import Recorder
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from gateway.ingest.native import NativeReceiver
from gateway.ingest.receiver import StoreSCP
from gateway.ingest.spool import Spool
from tests.support.servers import Orthanc, require_tool, storescu, wait_for

Cpu = Callable[[], float]  # cumulative CPU seconds of the receiving side
Receiver = Callable[[Path, int], Iterator[tuple[int, str, Cpu]]]
TICK = os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """A process's CPU seconds with its reaped children's, plus its children still in /proc (storescp --fork)."""

    def fields(p: int) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    own = fields(pid)
    total = sum(int(v) for v in own[11:15])  # utime, stime, cutime, cstime
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
            if int(child[1]) == pid:
                total += int(child[11]) + int(child[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / TICK


@contextmanager
def _gateway_scp(
    spool: Spool, on_stored: Callable[[InstanceRecord], None] = lambda record: None
) -> Iterator[tuple[int, str, Cpu]]:
    port = free_port()
    scp = StoreSCP(
        ReceiverSettings(port=port, min_free_disk_mb=0),
        spool,
        on_stored,
        allowed_calling_aes=frozenset({"BENCH"}),
    )
    scp.start()
    try:
        yield port, "AI_GATEWAY", _self_cpu  # the receiver's threads are this process's
    finally:
        scp.stop()


def gateway_receiver(work: Path, associations: int) -> Any:
    return _gateway_scp(Spool(work / "spool"))


def native_receiver(work: Path, associations: int) -> Any:
    """The native receiver (``make native``) as configured by default: each instance's file fsynced, renamed,
    folder fsynced before its acknowledgement."""
    return _native(work, journal_mb=0)


def native_receiver_with_journal(work: Path, associations: int) -> Any:
    """The native receiver with ``journal_mb = 128``: each instance journalled (fdatasync, group commit) before
    its acknowledgement, its spool file copied from the journal by a writer thread just after and synced in
    batches."""
    return _native(work, journal_mb=128)


def native_profile(work: Path, paths: list[Path], *, journal_mb: int) -> dict[str, float]:
    """Where one association's acknowledgements spend their time in the native receiver (its ``--profile``):
    ms per instance to receive, check, make durable and respond."""
    with _native(work, journal_mb=journal_mb, profile=True) as (port, called, _):
        _send(paths, 1, port, called)
    line = next(
        (x for x in (work / "native-receiver.log").read_text().splitlines() if x.startswith("PROFILE")), ""
    )
    fields = dict(part.split("=", 1) for part in line.split("\t")[1:])
    return {key[:-3]: float(value) for key, value in fields.items() if key.endswith("_ms")}


@contextmanager
def _native(work: Path, *, journal_mb: int, profile: bool = False) -> Iterator[tuple[int, str, Cpu]]:
    """DCMTK networking, the same spool layout and durability rule; each stored instance's event read and its
    record made after its acknowledgement, as in the gateway (the journal is written out before timing starts,
    as it is once per installation)."""
    port = free_port()
    receiver = NativeReceiver(
        ReceiverSettings(
            port=port, min_free_disk_mb=0, engine="native", accept_notices=False, journal_mb=journal_mb
        ),
        Spool(work / "spool"),
        lambda record: None,
        allowed_calling_aes=frozenset({"BENCH"}),
    )
    receiver.profile = profile
    receiver.start()
    pid = receiver.pid
    assert pid is not None
    try:
        yield port, "AI_GATEWAY", lambda: _process_cpu(pid) + _self_cpu()  # + the read-back thread here
    finally:
        receiver.stop()


@contextmanager
def gateway_with_record_receiver(work: Path, associations: int) -> Iterator[tuple[int, str, Cpu]]:
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


def pynetdicom_only_receiver(work: Path, associations: int) -> Any:
    return _gateway_scp(_DiscardingSpool(work / "spool"))


@contextmanager
def storescp_receiver(work: Path, associations: int) -> Iterator[tuple[int, str, Cpu]]:
    """DCMTK storescp: one process, or ``--fork`` (a process per association) for concurrent associations."""
    port = free_port()
    (work / "storescp").mkdir(parents=True)
    env = dict(os.environ, TCP_NODELAY="1")
    fork = ["--fork"] if associations > 1 else []
    cmd = [require_tool("storescp"), *fork, "-aet", "STORESCP", "-od", str(work / "storescp"), str(port)]
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
        yield port, "STORESCP", lambda: _process_cpu(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def orthanc_receiver(work: Path, associations: int) -> Iterator[tuple[int, str, Cpu]]:
    orthanc = Orthanc(work / "orthanc").start()
    assert orthanc.process is not None
    pid = orthanc.process.pid
    try:
        yield orthanc.dicom_port, orthanc.aet, lambda: _process_cpu(pid)
    finally:
        orthanc.stop()


RECEIVERS: dict[str, Callable[[Path, int], Any]] = {
    "gateway (durable spool)": gateway_receiver,
    "gateway, native receiver (durable spool)": native_receiver,
    "gateway, native receiver with journal (durable spool)": native_receiver_with_journal,
    "gateway (durable spool + system of record)": gateway_with_record_receiver,
    "DCMTK storescp": storescp_receiver,
    "Orthanc": orthanc_receiver,
    "profile: gateway receiver, spool discarded": pynetdicom_only_receiver,
}
CONCURRENT = (
    "gateway (durable spool)",
    "gateway, native receiver (durable spool)",
    "gateway, native receiver with journal (durable spool)",
    "DCMTK storescp",
    "Orthanc",
)


def _send(paths: list[Path], associations: int, port: int, called: str) -> None:
    """The series over ``associations`` concurrent storescu associations (a share each)."""
    shares = [paths[i::associations] for i in range(associations)]
    outcomes: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(
            target=lambda share=share: outcomes.append(
                storescu(share, port=port, calling_ae="BENCH", called_ae=called)
            )
        )
        for share in shares
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [o for o in outcomes if o.returncode != 0]
    if failed or len(outcomes) != associations:
        raise RuntimeError(
            f"storescu failed: {failed[0].stderr[-500:] if failed else 'a sender did not finish'}"
        )


def disk_patterns(work: Path, *, kib: int, instances: int = 300) -> dict[str, float]:
    """``benchmarks/fsync_patterns.c`` on the spool's file system, instances of the series' size: ms per instance
    of each way a receiver can write (the floor under each receive path, whatever DICOM costs on top). Empty when
    no C compiler is installed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return {}
    work.mkdir(parents=True)
    binary = work / "fsync_patterns"
    source = Path(__file__).with_name("fsync_patterns.c")
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run(
        [str(binary), str(work), str(instances), str(kib)], check=True, capture_output=True, text=True
    ).stdout
    patterns: dict[str, float] = {}
    for line in out.splitlines():
        name, _, rest = line.partition("  ")
        if rest.strip().endswith("ms per instance"):
            patterns[name.strip()] = float(rest.split()[0])
    shutil.rmtree(work)
    return patterns


LARGE = {  # receivers for the large-instance comparison: the native receiver's two paths, and storescp
    "gateway, native receiver (durable spool)": native_receiver,
    "gateway, native receiver with journal (durable spool)": lambda work, n: _native(work, journal_mb=256),
    "DCMTK storescp": storescp_receiver,
}


def _large_instances(work: Path, reps: int, slices: int = 30) -> dict[str, Any]:
    """One association of 2048 x 2048 CT slices (8 MB each, as large radiographs and mammograms are): where the
    journal's streaming (most of the instance on disk by its last PDV) could pay. Images/s per receiver and the
    native receiver's phases on each path."""
    series = write_head_ct(work / "series", slices=slices, rows=2048, cols=2048, seed=7)
    megabytes = sum(p.stat().st_size for p in series.paths) / 1e6
    rates: dict[str, list[float]] = {name: [] for name in LARGE}
    for rep in range(reps):
        paths = fresh_copy(list(series.paths), work / f"copy{rep}")[0]
        for index, (name, receiver) in enumerate(LARGE.items()):
            with receiver(work / f"r{index}-{rep}", 1) as (port, called, _):
                started = time.perf_counter()
                _send(paths, 1, port, called)
                rates[name].append(slices / (time.perf_counter() - started))
        shutil.rmtree(work / f"copy{rep}")
        for index in range(len(LARGE)):
            shutil.rmtree(work / f"r{index}-{rep}", ignore_errors=True)
    return {
        "slices": slices,
        "mb_per_image": round(megabytes / slices, 1),
        "results": [
            {
                "receiver": name,
                "images_per_s_median": round(statistics.median(measured), 1),
                "images_per_s_min": round(min(measured), 1),
                "images_per_s_max": round(max(measured), 1),
                "mb_per_s_median": round(statistics.median(measured) * megabytes / slices, 1),
            }
            for name, measured in rates.items()
        ],
        "profile_ms": {
            "direct": native_profile(work / "profile-direct", list(series.paths), journal_mb=0),
            "journal": native_profile(work / "profile-journal", list(series.paths), journal_mb=256),
        },
    }


def measure(slices: int, reps: int, associations: tuple[int, ...] = (1, 4, 8)) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series = write_head_ct(root / "series", slices=slices, seed=1)
        megabytes = sum(p.stat().st_size for p in series.paths) / 1e6
        copies = [fresh_copy(list(series.paths), root / f"copy{r}")[0] for r in range(reps)]
        # Receivers take turns within each repetition, so a machine whose speed drifts during the run (a shared
        # VM) affects every receiver alike and the ratios stay fair.
        runs = [(name, n) for n in associations for name in RECEIVERS if n == 1 or name in CONCURRENT]
        rates: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
        cpu: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
        for rep, paths in enumerate(copies):
            for index, (name, n) in enumerate(runs):
                with RECEIVERS[name](root / f"r{index}-{rep}", n) as (port, called, cpu_of):
                    gc.collect()  # the harness's own garbage (the copies made above) is not the receiver's CPU
                    cpu_before = cpu_of()
                    started = time.perf_counter()
                    _send(paths, n, port, called)
                    elapsed = time.perf_counter() - started
                    cpu[(name, n)].append((cpu_of() - cpu_before) / slices * 1000.0)
                rates[(name, n)].append(slices / elapsed)
        profiles = {
            "direct": native_profile(root / "profile-direct", copies[0], journal_mb=0),
            "journal": native_profile(root / "profile-journal", copies[-1], journal_mb=128),
        }
        large = _large_instances(root / "large", reps, slices=max(5, slices * 3 // 20))
        disk = disk_patterns(root / "disk", kib=round(megabytes * 1e6 / slices / 1024))
        for (name, n), measured in rates.items():
            median = statistics.median(measured)
            results.append(
                {
                    "receiver": name,
                    "associations": n,
                    "images_per_s_median": round(median, 1),
                    "images_per_s_min": round(min(measured), 1),
                    "images_per_s_max": round(max(measured), 1),
                    "mb_per_s_median": round(median * megabytes / slices, 1),
                    "cpu_s_per_1000_median": round(statistics.median(cpu[(name, n)]), 2),
                }
            )
    by_name = {(r["receiver"], r["associations"]): r for r in results}

    def rate(name: str, n: int = 1) -> float:
        return float(by_name[(name, n)]["images_per_s_median"])

    storescp = rate("DCMTK storescp")
    ratio = rate("gateway (durable spool)") / storescp
    native = rate("gateway, native receiver (durable spool)") / storescp
    with_record = rate("gateway (durable spool + system of record)") / rate("gateway (durable spool)")
    concurrent = {
        n: round(rate("gateway, native receiver (durable spool)", n) / rate("DCMTK storescp", n), 2)
        for n in associations
        if n > 1
    }
    cpu_ratio = float(
        by_name[("gateway, native receiver (durable spool)", 1)]["cpu_s_per_1000_median"]
    ) / max(1e-9, float(by_name[("DCMTK storescp", 1)]["cpu_s_per_1000_median"]))
    return {
        "machine": cli.machine(),
        "slices": slices,
        "reps": reps,
        "results": results,
        "gateway_vs_storescp": round(ratio, 2),  # the pynetdicom receiver
        "native_vs_storescp": round(native, 2),
        "native_vs_storescp_concurrent": concurrent,  # vs storescp --fork
        "native_cpu_vs_storescp": round(cpu_ratio, 2),  # target <= 1.5
        "native_profile_ms": profiles,  # one association, ms per instance by phase
        "storescp_ms_per_instance": round(1000.0 / storescp, 3),
        "journal_vs_direct": {
            n: round(
                rate("gateway, native receiver with journal (durable spool)", n)
                / rate("gateway, native receiver (durable spool)", n),
                2,
            )
            for n in associations
        },
        "disk_patterns_ms": disk,  # the raw write patterns' cost per instance on this disk (the floor)
        "large_instances": large,  # one association, 8 MB images: direct vs journal vs storescp
        "with_record_vs_without": round(with_record, 2),  # target >= 0.95
        "target_met": max(ratio, native) >= 0.8,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Ingest, {report['slices']} x 512x512 CT slices per run, storescu with TCP_NODELAY=1 (one association, or "
        f"the series shared over concurrent ones), {report['reps']} runs ({report['machine']}):",
        "",
        "| receiver | associations | images/s median (min-max) | MB/s | CPU s per 1,000 images |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['receiver']} | {r.get('associations', 1)} | {r['images_per_s_median']} "
            f"({r['images_per_s_min']}-{r['images_per_s_max']}) | {r.get('mb_per_s_median', '-')} | "
            f"{r.get('cpu_s_per_1000_median', '-')} |"
        )
    verdict = "met" if report["target_met"] else "MISSED"
    record = report["with_record_vs_without"]
    lines += [
        "",
        f"Gateway / storescp = {report['gateway_vs_storescp']} with the pynetdicom receiver, "
        f"{report.get('native_vs_storescp', '-')} with the native one (target >= 0.8: {verdict}).",
    ]
    for n, value in report.get("native_vs_storescp_concurrent", {}).items():
        lines.append(
            f"Native / storescp --fork at {n} associations = {value} (target >= 0.8: "
            f"{'met' if value >= 0.8 else 'MISSED'})."
        )
    if "native_cpu_vs_storescp" in report:
        value = report["native_cpu_vs_storescp"]
        lines.append(
            f"Native CPU per 1,000 images / storescp's = {value} (target <= 1.5: {'met' if value <= 1.5 else 'MISSED'})."
        )
    for variant, phases in report.get("native_profile_ms", {}).items():
        if phases:
            lines.append(
                f"Native receiver ({variant}{' path' if variant == 'direct' else ''}), one association, ms per "
                f"instance: {_phases(phases)} - against storescp's {report.get('storescp_ms_per_instance')} ms "
                "per instance in all (its run's fixed costs included: storescu's start, the association)."
            )
    for n, value in report.get("journal_vs_direct", {}).items():
        lines.append(f"Native receiver with its journal / without, {n} association(s) = {value}.")
    lines.append(
        f"With the system of record / without = {record} (target >= 0.95: {'met' if record >= 0.95 else 'MISSED'})."
    )
    disk = report.get("disk_patterns_ms")
    if disk:
        lines += [
            "",
            "This disk's floor under each path (`benchmarks/fsync_patterns.c`, ms per instance of the series' size):",
        ]
        lines += [f"- {name}: {value}" for name, value in disk.items()]
    large = report.get("large_instances")
    if large:
        lines += [
            "",
            f"Large instances: {large['slices']} x 2048x2048 CT slices ({large['mb_per_image']} MB each), one "
            f"association, {report['reps']} runs:",
            "",
            "| receiver | images/s median (min-max) | MB/s |",
            "|---|---|---|",
        ]
        for r in large["results"]:
            lines.append(
                f"| {r['receiver']} | {r['images_per_s_median']} ({r['images_per_s_min']}-"
                f"{r['images_per_s_max']}) | {r['mb_per_s_median']} |"
            )
        lines.append("")
        for variant, phases in large["profile_ms"].items():
            lines.append(f"Native receiver ({variant}), ms per 8 MB instance: {_phases(phases)}.")
    return "\n".join(lines) + "\n"


def _phases(phases: dict[str, float]) -> str:
    """The native receiver's profile as text: the time between an association's instances (the sender reading
    its next file and sending it), then the phases."""
    wait = f"between instances {phases['wait']}, " if "wait" in phases else ""
    return (
        f"{wait}receive {phases['receive']}, check {phases['check']}, make durable {phases['durable']}, "
        f"respond {phases['respond']}"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=200, reps=3)


if __name__ == "__main__":
    sys.exit(main())
