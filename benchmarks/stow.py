"""STOW-RS ingest: the gateway's ``POST /studies`` vs Orthanc's DICOMweb plugin, same machine, same run.

A series of 512x512 CT slices (fresh UIDs per repetition) is POSTed as multipart/related requests of
``--batch`` instances over plain HTTP on loopback (TLS costs both sides alike and is left out), with httpx; the
receivers take turns within each repetition. images/s = slices / wall time of all the requests. The gateway
stores each instance with its C-STORE rule (fsync of file and folder before the response), Orthanc with its own.

    python -m benchmarks.stow --slices 200 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks import cli
from benchmarks.e2e_latency import fresh_copy
from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from tests.support.servers import Orthanc

TOKEN = "stow-benchmark-token"
BOUNDARY = "stow-benchmark-boundary"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextmanager
def gateway_stow(work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    config = work / "gateway.toml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'data_dir = "{work / "data"}"\nquiet_period_s = 60\n[receiver]\nport = {free_port()}\n'
        '[triton]\nurl = "127.0.0.1:1"\n[http]\nport = 0\n'
        f'[[http.tokens]]\nname = "bench"\nrole = "sender"\nsha256 = "{hash_token(TOKEN)}"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.api is not None
        yield f"http://127.0.0.1:{gateway.api.port}/studies", {"Authorization": f"Bearer {TOKEN}"}
    finally:
        gateway.stop()


@contextmanager
def orthanc_stow(work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    orthanc = Orthanc(work, extra={"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    orthanc.start()
    try:
        yield f"{orthanc.url}/dicom-web/studies", {}
    finally:
        orthanc.stop()


RECEIVERS = {"gateway STOW-RS (durable spool)": gateway_stow, "Orthanc DICOMweb STOW-RS": orthanc_stow}


def _body(paths: list[Path]) -> bytes:
    parts = [
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
        for p in paths
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def measure(slices: int, reps: int, batch: int) -> dict[str, Any]:
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    rates: dict[str, list[float]] = {name: [] for name in RECEIVERS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series = write_head_ct(root / "series", slices=slices, seed=1)
        for rep in range(reps):
            for index, (name, receiver) in enumerate(RECEIVERS.items()):
                paths = fresh_copy(list(series.paths), root / f"copy{rep}-{index}")[0]
                bodies = [_body(paths[i : i + batch]) for i in range(0, len(paths), batch)]
                with receiver(root / f"r{index}-{rep}") as (url, headers), httpx.Client(timeout=300) as http:
                    started = time.perf_counter()
                    for body in bodies:
                        answer = http.post(
                            url, content=body, headers={**headers, "Content-Type": content_type}
                        )
                        if answer.status_code != 200:
                            raise RuntimeError(f"{name} answered {answer.status_code}: {answer.text[:300]}")
                    elapsed = time.perf_counter() - started
                rates[name].append(slices / elapsed)
    results = [
        {"receiver": name, "images_per_s_median": round(statistics.median(r), 1),
         "images_per_s_min": round(min(r), 1), "images_per_s_max": round(max(r), 1)}
        for name, r in rates.items()
    ]  # fmt: skip
    return {"machine": cli.machine(), "slices": slices, "reps": reps, "batch": batch, "results": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"STOW-RS, {report['slices']} x 512x512 CT slices per run in requests of {report['batch']}, plain HTTP on "
        f"loopback, {report['reps']} runs ({report['machine']}):",
        "",
        "| receiver | images/s median (min-max) |",
        "|---|---|",
    ]
    lines += [
        f"| {r['receiver']} | {r['images_per_s_median']} ({r['images_per_s_min']}-{r['images_per_s_max']}) |"
        for r in report["results"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="instances per request")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = measure(args.slices, args.reps, args.batch)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
