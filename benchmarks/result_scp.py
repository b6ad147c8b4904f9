"""The load test's result SCP: DCMTK storescp receives the gateway's results; this prints, for each SR, when it
arrived.

It runs in a process of its own (the Locust file starts it): inside Locust's gevent-patched process an SCP's
threads are greenlets that CPU-bound simulated PACS starve. It is DCMTK's storescp, not a pynetdicom SCP: under
the load test's saturation a pynetdicom SCP here now and then received a C-STORE, ran its handler and never got
its response to the gateway, which then waited out its DIMSE timeout (30 s) - a stall of the load generator that
the STAT figures carried (seen in a `make bench-report` run: STAT p95 21 s, two studies 18 and 22 s). storescp
runs a shell line per received object (``--exec-on-reception``) that prints its arrival time and file; this reads
the SRs' Study Instance UIDs from those files, prints ``<arrival, Unix s>\\t<Study Instance UID>`` (flushed at
once) and removes each file.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom

# storescp replaces #p (the folder) and #f (the file name); the shell line runs when the object is on disk.
ON_RECEPTION = 'printf "%s\\t%s\\t%s\\n" "$(date +%s.%N)" "#p" "#f"'


def _die_with_parent() -> None:
    """In storescp, before it runs: SIGTERM when this process dies, however it dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--port", type=int, required=True, help="port to listen on (only 127.0.0.1 sends to it)"
    )
    parser.add_argument("--ae-title", default="BENCH_SCP")
    args = parser.parse_args(argv)
    storescp = shutil.which("storescp")
    if storescp is None:
        sys.exit("storescp (DCMTK) is not installed: run `make setup`")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # Locust stops it so: storescp stopped and reaped
    with tempfile.TemporaryDirectory(prefix="result-scp-") as folder:
        command = [storescp, "-aet", args.ae_title, "--sort-on-study-uid", "st", "-od", folder,
                   "--exec-on-reception", ON_RECEPTION, str(args.port)]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                arrived, _, rest = line.rstrip("\n").partition("\t")
                where, _, name = rest.partition("\t")
                path = Path(where) / name
                try:
                    ds = pydicom.dcmread(
                        path, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"]
                    )
                except (OSError, ValueError):
                    continue
                finally:
                    path.unlink(missing_ok=True)
                if str(ds.get("Modality", "")) == "SR":
                    sys.stdout.write(f"{float(arrived):.6f}\t{ds.StudyInstanceUID}\n")
                    sys.stdout.flush()
        finally:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
