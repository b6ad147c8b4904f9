"""One batch through the gateway's Triton path vs the same ONNX model in-process.

The head CT detector (``model_repository/ct_head_hyperdensity_detector/1/model.onnx``) gets the same batch of
slices three ways: onnxruntime in this process (the floor: no transport at all), and through the gateway's Triton
client to a local tritonserver with the tensors in system shared memory and in the gRPC message. Reports the
median and range per batch over repetitions, each path's ratio to in-process (target: the Triton path within
1.25x), and the largest difference between the outputs (they must agree).

    python -m benchmarks.transport --slices 32 --reps 20 [--out results.json]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cli
from clients.triton import TritonClient
from gateway.config.settings import default_model_repository
from gateway.core.domain import Priority
from gateway.inference.server import TritonServer

MODEL = "ct_head_hyperdensity_detector"
TARGET_RATIO = 1.25


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "ms_median": round(statistics.median(ms), 1),
        "ms_min": round(min(ms), 1),
        "ms_max": round(max(ms), 1),
    }


def measure(slices: int, reps: int) -> dict[str, Any]:
    import onnxruntime as ort

    repository = default_model_repository()
    onnx_file = repository / MODEL / "1" / "model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # as the Triton model's intra_op_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    batch = rng.uniform(0.0, 1.0, size=(slices, 2, 256, 256)).astype(np.float32)

    reference = session.run(None, {input_name: batch})[0]
    out_bytes = int(reference.nbytes)  # the heat map comes back in shared memory too
    in_process = []
    for _ in range(reps):
        started = time.perf_counter()
        session.run(None, {input_name: batch})
        in_process.append(time.perf_counter() - started)

    report: dict[str, Any] = {
        "machine": cli.machine(),
        "model": MODEL,
        "slices": slices,
        "batch_mib": round(batch.nbytes / 2**20, 1),
        "reps": reps,
        "target_ratio": TARGET_RATIO,
        "results": [
            {"path": "in-process onnxruntime", **_summary(in_process), "ratio": 1.0, "max_abs_diff": 0.0}
        ],
    }
    base = statistics.median(in_process)
    with tempfile.TemporaryDirectory() as tmp, TritonServer(repository, Path(tmp) / "triton") as server:

        async def through(transport: str) -> tuple[list[float], float, str]:
            client = TritonClient(server.grpc_url, transport=transport)
            try:
                times = []
                out = None
                for i in range(reps + 2):  # two warm-ups: region registration, model first run
                    started = time.perf_counter()
                    result = await client.infer(
                        MODEL,
                        {"INPUT": batch},
                        ["HEATMAP"],
                        Priority.ROUTINE,
                        output_bytes={"HEATMAP": out_bytes},
                    )
                    if i >= 2:
                        times.append(time.perf_counter() - started)
                    out = result.as_numpy("HEATMAP")
                diff = float(np.max(np.abs(out - reference))) if out is not None else float("inf")
                return times, diff, client.endpoints[0]["transport"]
            finally:
                await client.close()

        for transport in ("shared_memory", "grpc"):
            times, diff, used = asyncio.run(through(transport))
            report["results"].append(
                {
                    "path": f"Triton, {used.replace('_', ' ')}",
                    **_summary(times),
                    "ratio": round(statistics.median(times) / base, 2),
                    "max_abs_diff": diff,
                }
            )
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"One batch of {report['slices']} slices ({report['batch_mib']} MiB FP32) through `{report['model']}`, "
        f"{report['reps']} repetitions ({report['machine']}); target: the Triton path within "
        f"{report['target_ratio']}x of in-process:",
        "",
        "| path | ms per batch, median (min-max) | x in-process | target | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        verdict = "" if r["ratio"] == 1.0 else ("met" if r["ratio"] <= report["target_ratio"] else "MISSED")
        lines.append(
            f"| {r['path']} | {r['ms_median']} ({r['ms_min']}-{r['ms_max']}) | {r['ratio']} | {verdict} "
            f"| {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=32, reps=20)


if __name__ == "__main__":
    sys.exit(main())
