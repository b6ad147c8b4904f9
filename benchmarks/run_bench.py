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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.core.logs import configure_logging
from gateway.inference.server import free_port

HERE = Path(__file__).resolve().parent


def _cpu_seconds(gateway: Gateway) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the gateway (this process), its Triton server and the finished
    child processes (Locust, the simulated PACS) - where the machine's cores went during a run."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = gateway.triton_server.process if gateway.triton_server is not None else None
    running = _process_tree_cpu(
        os.getpid()
    )  # the gateway's live children: Triton + its backend stubs, encoders
    triton = _process_tree_cpu(process.pid) if process is not None else {}
    return {
        "gateway_cpu_s": own.ru_utime + own.ru_stime + sum(v for p, v in running.items() if p not in triton),
        "triton_cpu_s": sum(triton.values()),
        "locust_cpu_s": children.ru_utime + children.ru_stime,
    }


def _process_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of each live process below ``root`` (and of root itself unless it is us)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    if root == os.getpid():
        tree.discard(root)  # our own time comes from getrusage
    return {p: used.get(p, 0.0) for p in tree}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pacs", type=int, default=4, help="simulated PACS (Locust users)")
    parser.add_argument(
        "--stat-pacs",
        type=int,
        default=None,
        help="how many of them send STAT studies (default: one in four, at least one of two or more)",
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
        "--receiver",
        choices=["pynetdicom", "native"],
        default="pynetdicom",
        help="the gateway's C-STORE receiver ([receiver] engine; native needs `make native`)",
    )
    parser.add_argument(
        "--no-cross-study-batching",
        action="store_true",
        help="send each study's slices in requests of their own ([triton] cross_study_batching = false)",
    )
    parser.add_argument(
        "--triton-users",
        type=int,
        default=0,
        help="also send ensemble requests straight to Triton over gRPC (the model's own latency under the load)",
    )
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    args.out.mkdir(parents=True, exist_ok=True)
    gateway_port, scp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(
            f'data_dir = "{Path(tmp) / "data"}"\nquiet_period_s = {args.quiet_period}\nworkers = {args.workers}\n'
            f'[receiver]\nport = {gateway_port}\nengine = "{args.receiver}"\n'
            f"accept_notices = {'false' if args.receiver == 'native' else 'true'}\n[http]\nport = 0\n"
            f'[delivery]\ndestination = "BENCH_SCP@127.0.0.1:{scp_port}"\n'
            f'[triton]\nurl = "{args.triton_url}"\n'
            f"cross_study_batching = {'false' if args.no_cross_study_batching else 'true'}\n"
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            default_stat = 0 if args.pacs < 2 else max(1, round(args.pacs / 4))
            stat = default_stat if args.stat_pacs is None else min(args.stat_pacs, args.pacs)
            routine = args.pacs - stat
            classes = [name for name, n in (("RoutinePacs", routine), ("StatPacs", stat)) if n > 0]
            if args.triton_users:
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
                BENCH_TRITON_GRPC=gateway.triton_url.split(",")[0],
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
            before = _cpu_seconds(gateway)
            started = time.monotonic()
            code = subprocess.run(command, env=env, check=False).returncode
            after = _cpu_seconds(gateway)
            profile = {name: round(after[name] - before[name], 1) for name in after}
            profile["wall_s"] = round(time.monotonic() - started, 1)
            profile["cpus"] = os.cpu_count() or 1
            (args.out / "cpu_profile.json").write_text(json.dumps(profile, indent=2))
            (args.out / "gateway_metrics.txt").write_bytes(gateway.render_metrics())
            return code
        finally:
            gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
