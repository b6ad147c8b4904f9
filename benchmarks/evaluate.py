"""Detection quality of the reference head CT pipeline on synthetic phantoms with ground truth (FROC).

Fixed seeds: lesions of several sizes and contrasts at random positions inside the brain, two noise levels,
normal studies mixed in. Each study is written as real DICOM and goes through the gateway's own decode and
preprocessing, then through the ensemble's three steps (the same functions and ONNX file Triton serves:
preprocessing.detection + the detector ONNX + postprocess), in process so the evaluation runs anywhere.

A lesion counts as found when a detection's box centre lies within the lesion radius (+3 mm) on a slice the
lesion crosses; every other detection is a false positive. The FROC table gives per-lesion sensitivity at
0.5, 1 and 2 false positives per study, overall and by lesion size.

    python -m benchmarks.evaluate                      # writes benchmarks/froc/froc_ct_head.{json,md,svg}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.phantoms import Lesion, write_head_ct
from gateway.settings import default_model_repository
from preprocessing.detection import heatmap_to_detections, hyperdensity_channels
from preprocessing.series import load_series, model_input

SIZES_MM = (2.5, 4.0, 6.0, 9.0)
CONTRASTS_HU = (56.0, 66.0, 76.0)
NOISE_HU = (4.0, 8.0, 12.0)
FP_RATES = (0.5, 1.0, 2.0)
TOLERANCE_MM = 3.0


@dataclass(frozen=True)
class Case:
    seed: int
    lesions: tuple[Lesion, ...]
    noise_hu: float


def make_cases(studies: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(studies):
        lesions = []
        for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 lesions; about a third of studies are normal
            angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8)
            lesions.append(
                Lesion(
                    x=256 + radius * 150 * np.cos(angle),
                    y=256 + radius * 170 * np.sin(angle),
                    slice=int(rng.integers(4, 12)),
                    radius_mm=float(rng.choice(SIZES_MM)),
                    hu=float(rng.choice(CONTRASTS_HU)),
                )
            )
        cases.append(
            Case(seed=seed * 1000 + i, lesions=tuple(lesions), noise_hu=float(NOISE_HU[i % len(NOISE_HU)]))
        )
    return cases


def run_case(
    case: Case, folder: Path, session: ort.InferenceSession
) -> tuple[list[tuple[float, bool, int]], int]:
    """Detections as (score, is_true_positive, lesion index or -1) and the number of lesions."""
    series = write_head_ct(folder, slices=16, lesions=case.lesions, seed=case.seed, noise_hu=case.noise_hu)
    loaded = load_series(series.paths)
    stack = model_input(loaded, size=(256, 256), intensity="hu", hu_clip=(-1024.0, 3071.0), window=None)
    heat = session.run(None, {"INPUT": hyperdensity_channels(stack)})[0]
    detections, _, _ = heatmap_to_detections(heat, threshold=0.3)
    pixel_mm, slice_mm = 0.5, 5.0
    out = []
    for row in detections:
        k, _, score, x0, y0, x1, y1 = (float(v) for v in row)
        cx, cy = (x0 + x1) / 2 * 512, (y0 + y1) / 2 * 512
        hit = -1
        for index, lesion in enumerate(case.lesions):
            dz = abs(int(k) - lesion.slice) * slice_mm
            if dz >= lesion.radius_mm:
                continue
            distance = float(np.hypot(cx - lesion.x, cy - lesion.y)) * pixel_mm
            if distance <= lesion.radius_mm + TOLERANCE_MM:
                hit = index
                break
        out.append((score, hit >= 0, hit))
    return out, len(case.lesions)


def froc(cases: list[Case], results: list[list[tuple[float, bool, int]]]) -> dict[str, object]:
    thresholds = sorted({s for r in results for s, _, _ in r} | {1.01}, reverse=True)
    studies = len(cases)
    points = []
    for threshold in thresholds:
        found: set[tuple[int, int]] = set()
        false_positives = 0
        for c, result in enumerate(results):
            for score, tp, lesion in result:
                if score < threshold:
                    continue
                if tp:
                    found.add((c, lesion))
                else:
                    false_positives += 1
        points.append((false_positives / studies, found, threshold))
    lesions = [(c, i, lesion) for c, case in enumerate(cases) for i, lesion in enumerate(case.lesions)]

    def sensitivity_at(rate: float, size: float | None = None) -> float:
        subset = [(c, i) for c, i, lesion in lesions if size is None or lesion.radius_mm == size]
        best = 0.0
        for fp, found, _ in points:
            if fp <= rate and subset:
                best = max(best, sum((c, i) in found for c, i in subset) / len(subset))
        return round(best, 3)

    return {
        "studies": studies,
        "lesions": len(lesions),
        "curve": [
            (round(fp, 3), round(sum(1 for _ in found) / max(len(lesions), 1), 3)) for fp, found, _ in points
        ],
        "sensitivity": {f"{rate:g}": sensitivity_at(rate) for rate in FP_RATES},
        "by_size_mm": {
            f"{size:g}": {f"{rate:g}": sensitivity_at(rate, size) for rate in FP_RATES} for size in SIZES_MM
        },
    }


def evaluate(studies: int = 30, seed: int = 7) -> dict[str, object]:
    session = ort.InferenceSession(
        str(default_model_repository() / "ct_head_hyperdensity_detector/1/model.onnx")
    )
    cases = make_cases(studies, seed)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_case(case, Path(tmp) / f"s{i}", session)[0] for i, case in enumerate(cases)]
    report = froc(cases, results)
    report["seed"] = seed
    return report


def svg(curve: list[tuple[float, float]], width: int = 420, height: int = 300) -> str:
    max_fp = max([fp for fp, _ in curve] + [2.0])
    pts = " ".join(
        f"{40 + fp / max_fp * (width - 60):.1f},{height - 30 - s * (height - 50):.1f}"
        for fp, s in sorted(curve)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="40" y1="{height - 30}" x2="{width - 20}" y2="{height - 30}" stroke="black"/>'
        f'<line x1="40" y1="20" x2="40" y2="{height - 30}" stroke="black"/>'
        f'<polyline points="{pts}" fill="none" stroke="#c00" stroke-width="2"/>'
        f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">false positives per study (max {max_fp:.1f})</text>'
        f'<text x="12" y="{height / 2}" font-size="12" transform="rotate(-90 12 {height / 2})" text-anchor="middle">lesion sensitivity</text>'
        "</svg>"
    )


def markdown(report: dict[str, object]) -> str:
    sens = report["sensitivity"]
    by_size = report["by_size_mm"]
    assert isinstance(sens, dict) and isinstance(by_size, dict)
    lines = [
        f"FROC of the reference head CT pipeline: {report['studies']} phantom studies, {report['lesions']} lesions, "
        f"seed {report['seed']} (`python -m benchmarks.evaluate`).",
        "",
        "| lesions | sens @ 0.5 FP/study | sens @ 1 FP/study | sens @ 2 FP/study |",
        "|---|---|---|---|",
        f"| all | {sens['0.5']} | {sens['1']} | {sens['2']} |",
    ]
    for size, values in by_size.items():
        lines.append(f"| radius {size} mm | {values['0.5']} | {values['1']} | {values['2']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/froc"), help="committed results folder")
    args = parser.parse_args(argv)
    report = evaluate(args.studies, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "froc_ct_head.json").write_text(json.dumps(report, indent=2))
    (args.out / "froc_ct_head.md").write_text(markdown(report))
    curve = report["curve"]
    assert isinstance(curve, list)
    (args.out / "froc_ct_head.svg").write_text(svg(curve))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
