"""The load test's result SCP: receives the gateway's results and prints, for each SR, when it arrived.

It runs in a process of its own (the Locust file starts it): inside Locust's gevent-patched process the SCP's
threads are greenlets that CPU-bound simulated PACS starve, so under saturation a C-STORE response could wait
until the gateway's DIMSE timeout (30 s) - a stall of the benchmark, not of the gateway, that the STAT figures
then carried. Output: one line per SR, ``<arrival, Unix s>\\t<Study Instance UID>``, flushed at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt


def _on_store(event: Any) -> int:
    arrived = time.time()
    ds = event.dataset
    if str(getattr(ds, "Modality", "")) == "SR":
        sys.stdout.write(f"{arrived:.6f}\t{ds.StudyInstanceUID}\n")
        sys.stdout.flush()
    return 0x0000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--ae-title", default="BENCH_SCP")
    args = parser.parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = 0
    ae.supported_contexts = AllStoragePresentationContexts
    ae.start_server(("127.0.0.1", args.port), block=True, evt_handlers=[(evt.EVT_C_STORE, _on_store)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
