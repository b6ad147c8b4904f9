"""The command line shared by the measurement benchmarks: --slices, --reps, --out; prints the markdown table."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run(
    argv: list[str] | None,
    doc: str | None,
    measure: Callable[[int, int], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    *,
    slices: int,
    reps: int,
) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=slices)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = measure(args.slices, args.reps)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


def machine() -> str:
    """The machine a figure was measured on, for the report."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
