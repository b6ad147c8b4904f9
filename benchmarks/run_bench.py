"""The standard load benchmark: Triton + the gateway + Locust's simulated PACS, with the SLO gate.

Starts Triton (from the nvidia-pytriton wheel, through the gateway) and the gateway on loopback with a 1 s
completion quiet period, sends its results to the receiving SCP that the Locust file runs, and runs Locust
headless. Writes Locust's CSV and HTML reports, the SLO table (slo_report.md / .json) and a latency plot into
--out; the exit code is Locust's: non-zero when a latency target in --slo is missed, a study got no result,
or a request failed.

    python -m benchmarks.run_bench                         # = make bench
    python -m benchmarks.run_bench --pacs 4 --duration 120 --study ct_chest --slices 64
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.engine import Gateway
from gateway.logs import configure_logging
from gateway.settings import load_settings
from gateway.triton_server import free_port

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pacs", type=int, default=4, help="simulated PACS (Locust users)")
    parser.add_argument(
        "--stat-pacs",
        type=int,
        default=None,
        help="how many of them send STAT studies (default: one in four)",
    )
    parser.add_argument("--duration", default="60s", help="Locust run time (e.g. 60s, 5m)")
    parser.add_argument("--study", choices=["ct_head", "ct_chest", "cxr"], default="ct_head")
    parser.add_argument("--slices", type=int, default=24, help="slices per CT study")
    parser.add_argument("--pacing", type=float, default=6.0, help="seconds between studies of one PACS")
    parser.add_argument(
        "--routine-pacing",
        type=float,
        default=None,
        help="seconds between studies of a routine PACS (default: --pacing)",
    )
    parser.add_argument("--slo", type=Path, default=HERE / "slo.toml", help="latency targets (TOML)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load"), help="report folder")
    parser.add_argument("--quiet-period", type=float, default=1.0, help="study completion quiet period, s")
    parser.add_argument("--drain", type=float, default=90.0, help="seconds to wait for results after the run")
    parser.add_argument("--triton-url", default="", help="use a running Triton (gRPC host:port) instead")
    parser.add_argument("--workers", type=int, default=2, help="the gateway's concurrent series (workers)")
    parser.add_argument(
        "--no-cross-study-batching",
        action="store_true",
        help="send each study's slices in requests of their own ([triton] cross_study_batching = false)",
    )
    parser.add_argument(
        "--triton-users",
        type=int,
        default=0,
        help="also send ensemble requests straight to Triton (own Triton only)",
    )
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    gateway_port, scp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(
            f'data_dir = "{Path(tmp) / "data"}"\nquiet_period_s = {args.quiet_period}\nworkers = {args.workers}\n'
            f"[receiver]\nport = {gateway_port}\n[http]\nport = 0\n"
            f'[delivery]\ndestination = "BENCH_SCP@127.0.0.1:{scp_port}"\n'
            f'[triton]\nurl = "{args.triton_url}"\n'
            f"cross_study_batching = {'false' if args.no_cross_study_batching else 'true'}\n"
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            stat = args.pacs // 4 if args.stat_pacs is None else min(args.stat_pacs, args.pacs)
            routine = args.pacs - stat
            classes = [name for name, n in (("RoutinePacs", routine), ("StatPacs", stat)) if n > 0]
            triton_http = ""
            if args.triton_users:
                if gateway.triton_server is None:
                    parser.error("--triton-users needs the gateway's own Triton (no --triton-url)")
                triton_http = f"127.0.0.1:{gateway.triton_server.http_port}"
                classes.append("TritonUser")
            users = args.pacs + args.triton_users
            env = dict(
                os.environ,
                BENCH_GATEWAY=f"127.0.0.1:{gateway_port}",
                BENCH_SCP_PORT=str(scp_port),
                BENCH_STUDY=args.study,
                BENCH_SLICES=str(args.slices),
                BENCH_PACING_S=str(args.pacing),
                BENCH_ROUTINE_PACING_S=str(args.routine_pacing or args.pacing),
                BENCH_ROUTINE_USERS=str(routine),
                BENCH_STAT_USERS=str(stat),
                BENCH_SLO=str(args.slo.resolve()),
                BENCH_OUT=str(args.out.resolve()),
                BENCH_DRAIN_S=str(args.drain),
                BENCH_TRITON_USERS=str(args.triton_users),
                BENCH_TRITON_HTTP=triton_http,
            )
            locust = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless"]
            reports = [
                "--csv",
                str(args.out / "locust"),
                "--html",
                str(args.out / "locust.html"),
                "--only-summary",
            ]
            command = [*locust, "-u", str(users), "-r", str(users), "-t", args.duration, *reports, *classes]
            print(
                f"locust: {routine} routine + {stat} STAT PACS for {args.duration}, {args.study}; "
                f"reports in {args.out}",
                flush=True,
            )
            code = subprocess.run(command, env=env, check=False).returncode
            (args.out / "gateway_metrics.txt").write_bytes(gateway.render_metrics())
            return code
        finally:
            gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
