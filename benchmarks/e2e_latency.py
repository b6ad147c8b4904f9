"""End-to-end latency: last instance sent -> SR stored in the receiving PACS (Orthanc), per stage.

Starts everything for real on loopback: Triton from the nvidia-pytriton wheel (through the gateway), the
gateway, and Orthanc as the PACS that receives the results. Each case is sent with DCMTK storescu with fresh
UIDs per repetition, then Orthanc's REST API is polled until the SR of that study is there.

    python -m benchmarks.e2e_latency --reps 5 --slices 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from benchmarks import cli
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.core.logs import configure_logging
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.support.servers import Orthanc, storescu, wait_for

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ct-3slice"
STAGES = (
    "receive",
    "wait_complete",
    "queue",
    "decode",
    "preprocess",
    "infer",
    "encode",
    "store",
    "deliver",
    "notify",
)


def fresh_copy(paths: list[Path], out: Path) -> tuple[list[Path], str]:
    """Copy a series with new study / series / SOP UIDs so every repetition is a new study."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / path.name
        ds.save_as(target)
        copies.append(target)
    return copies, study


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions per case")
    parser.add_argument("--slices", type=int, default=100, help="slices of the synthetic CT case")
    parser.add_argument(
        "--quiet-period", type=float, default=1.0, help="study completion quiet period, seconds"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="where to write the JSON"
    )
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    port = free_port()
    orthanc = Orthanc(work / "orthanc").start()
    config = work / "gateway.toml"
    config.write_text(
        f'data_dir = "{work / "data"}"\nquiet_period_s = {args.quiet_period}\n'
        f'[[peers]]\nae_title = "BENCH"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f"[receiver]\nport = {port}\n[http]\nport = 0\n"
        # Route every CT (the real 3-slice CT has no body part) to the reference pipeline.
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\nmode = "triage"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels.0]\nvalue = "50960005"\nscheme = "SCT"\n'
        'meaning = "Hemorrhage"\n'
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    synthetic = write_head_ct(
        work / "synthetic", slices=args.slices, lesions=(Lesion(x=300, y=220, slice=args.slices // 2),)
    )
    cases = {
        "real CT 3 slices (ct-3slice)": sorted(REAL_CT.glob("0*.dcm")),
        f"synthetic CT {args.slices} slices": list(synthetic.paths),
    }
    results: dict[str, dict[str, list[float]]] = {}
    gateway = Gateway(settings).start()
    try:
        for name, paths in cases.items():
            results[name] = {"to_sr_in_orthanc_ms": [], "gateway_last_instance_to_done_ms": []}
            for rep in range(args.reps):
                copies, study_uid = fresh_copy(paths, work / f"{len(results)}-{rep}")
                sent = storescu(copies, port=port, calling_ae="BENCH")
                if sent.returncode != 0:
                    raise SystemExit(f"storescu failed: {sent.stderr}")
                last_sent = time.monotonic()
                wait_for(
                    lambda uid=study_uid: [
                        s for s in orthanc.series_of_study(uid) if s["MainDicomTags"].get("Modality") == "SR"
                    ],
                    timeout_s=300,
                    interval_s=0.05,
                    what="SR in Orthanc",
                )
                results[name]["to_sr_in_orthanc_ms"].append((time.monotonic() - last_sent) * 1000.0)
                done = wait_for(
                    lambda uid=study_uid: [
                        e for e in audit.read() if e["event"] == "study_done" and e["study"] == uid
                    ],
                    timeout_s=60,
                )[0]
                results[name]["gateway_last_instance_to_done_ms"].append(done["last_instance_to_done_ms"])
                delivered = wait_for(
                    lambda uid=study_uid: [
                        e for e in audit.read() if e["event"] == "results_delivered" and e["study"] == uid
                    ],
                    timeout_s=60,
                )[0]
                for stage in STAGES:
                    value = delivered["deliver_ms"] if stage == "deliver" else done.get(f"{stage}_ms", 0.0)
                    results[name].setdefault(f"{stage}_ms", []).append(value)
    finally:
        gateway.stop()
        orthanc.stop()
    machine = cli.machine()
    print(
        f"\nEnd-to-end latency, median (min-max) over {args.reps} runs, ms; quiet period {args.quiet_period}s; {machine}\n"
    )
    header = ["case", "last sent -> SR in Orthanc", "gateway last received -> done", *STAGES]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, values in results.items():
        row = [
            name,
            summarise(values["to_sr_in_orthanc_ms"]),
            summarise(values["gateway_last_instance_to_done_ms"]),
        ]
        row += [summarise(values[f"{s}_ms"]) for s in STAGES]
        print("| " + " | ".join(row) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e_latency.json").write_text(
        json.dumps({"machine": machine, "quiet_period_s": args.quiet_period, "results": results}, indent=2)
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
