"""Preprocessing throughput and parity of every available array backend against the numpy reference.

A head CT phantom series (real DICOM files, decoded by the gateway's decoder) is prepared for the model
(rescale to HU, clip, resize 512 -> 256, window or percentile normalisation) by each backend: numpy always,
the NVIDIA DALI pipeline on the CPU when DALI is installed, CuPy and DALI on the GPU where a CUDA device works. Reports slices/s (median and range over repetitions, host arrays in and out,
so transfers are included) and the largest absolute difference from numpy.

    python -m benchmarks.preprocess_throughput --slices 64 --reps 10 [--out results.json]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cli
from gateway.demo.phantoms import write_head_ct
from preprocessing.backend import NUMPY, select_backend
from preprocessing.dali_pipeline import DaliPreprocessor, supports
from preprocessing.dali_pipeline import available as dali_available
from preprocessing.decode import decode_file
from preprocessing.normalize import prepare_stack

CASES = {
    "hu": {"intensity": "hu", "window": None},
    "window": {"intensity": "window", "window": (40.0, 80.0)},
    "percentile": {"intensity": "percentile", "window": None},
}


def measure(slices: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        images = [decode_file(p) for p in write_head_ct(Path(tmp), slices=slices, seed=1).paths]
    gpu = select_backend()
    runners: list[tuple[str, Callable[..., np.ndarray]]] = [
        ("numpy", lambda **kw: prepare_stack(images, backend=NUMPY, **kw))
    ]
    if gpu.name != "numpy":
        runners.append((gpu.name, lambda **kw: prepare_stack(images, backend=gpu, **kw)))
    if dali_available()[0]:
        devices = [None] + ([0] if gpu.name == "cupy" else [])
        for device in devices:
            dali = DaliPreprocessor(device_id=device)
            runners.append((dali.name, lambda dali=dali, **kw: dali.prepare_stack(images, **kw)))
    report: dict[str, Any] = {
        "machine": cli.machine(),
        "gpu_backend": gpu.name,
        "gpu_reason": gpu.reason,
        "slices": slices,
        "reps": reps,
        "results": [],
    }
    for case, options in CASES.items():
        kwargs: dict[str, Any] = dict(size=(256, 256), hu_clip=(-1024.0, 3071.0), **options)
        reference = prepare_stack(images, backend=NUMPY, **kwargs)
        for name, run in runners:
            if name.startswith("dali") and not supports(images, kwargs["size"], kwargs["intensity"]):
                continue
            run(**kwargs)  # warm-up (kernels, pipeline build, caches)
            rates = []
            out = reference
            for _ in range(reps):
                started = time.perf_counter()
                out = run(**kwargs)
                rates.append(slices / (time.perf_counter() - started))
            report["results"].append(
                {
                    "case": case,
                    "backend": name,
                    "slices_per_s_median": round(statistics.median(rates), 1),
                    "slices_per_s_min": round(min(rates), 1),
                    "slices_per_s_max": round(max(rates), 1),
                    "max_abs_diff_vs_numpy": float(np.max(np.abs(out - reference))),
                }
            )
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Preprocessing, {report['slices']} x 512x512 CT slices -> 256x256, {report['reps']} repetitions "
        f"({report['machine']}; GPU backend: {report['gpu_backend']} - {report['gpu_reason']}):",
        "",
        "| normalisation | backend | slices/s median (min-max) | max abs diff vs numpy |",
        "|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['slices_per_s_median']} "
            f"({r['slices_per_s_min']}-{r['slices_per_s_max']}) | {r['max_abs_diff_vs_numpy']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli.run(argv, __doc__, measure, markdown, slices=64, reps=10)


if __name__ == "__main__":
    sys.exit(main())
