"""Detection quality of the reference pipelines on synthetic phantoms with ground truth (FROC).

Fixed seeds. Each study is written as real DICOM and goes through the gateway's own decode and preprocessing,
then through its ensemble's steps (the same functions and ONNX files Triton serves), in process so the
evaluation runs anywhere:

* ``ct_head``  - head CT, hyperdense lesions of 2.5-9 mm radius, 3 contrasts, 3 noise levels; a lesion is found
  by a detection on a slice it crosses whose box centre lies within its radius + 3 mm (several slices of one
  lesion count once, as the pipeline reports per slice).
* ``ct_chest`` - chest CT with lungs, mediastinum, spine and vessels running through the slices; nodules of
  4-16 mm diameter; two detectors fused, linked in 3D. A nodule is found by a detection whose key slice lies
  within its radius + one slice and whose centre lies within radius + 3 mm; a second detection of the same
  nodule counts as a false positive (the pipeline must report each nodule once). Diameter and volume errors
  of the found nodules are reported too.
* ``cxr``      - chest radiographs (half MONOCHROME1) with ribs, heart and spine; Gaussian opacities of 8-25 mm
  in the lung fields; found when the box centre lies within radius + 5 mm; duplicates are false positives.

The FROC table gives per-lesion sensitivity at 0.5, 1 and 2 false positives per study, overall and by size.

    python -m benchmarks.evaluate                   # all pipelines -> benchmarks/froc/froc_<name>.{json,md,svg}
    python -m benchmarks.evaluate --pipeline cxr
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.phantoms import Lesion, Nodule, Opacity, write_chest_ct, write_cxr, write_head_ct
from gateway.settings import default_model_repository
from preprocessing.detection import heatmap_to_detections, hyperdensity_channels
from preprocessing.lung import lung_channels, nodules
from preprocessing.radiograph import opacities, radiograph_channels
from preprocessing.series import load_series, model_input

FP_RATES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Truth:
    size: float  # the size bin the table reports (radius or diameter, see Evaluation.size_label)
    volume_mm3: float | None = None
    diameter_mm: float | None = None


@dataclass
class CaseResult:
    truths: list[Truth]
    # (score, index of the lesion it found or -1); a duplicate of a found lesion is given -1 where duplicates
    # are false positives for this pipeline
    detections: list[tuple[float, int]] = field(default_factory=list)
    # (lesion index, reported diameter mm, reported volume mm3) of the detections that found a lesion
    measured: list[tuple[int, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Evaluation:
    name: str
    title: str
    size_label: str
    sizes: tuple[float, ...]
    studies: int
    run: Callable[[int, int, Path, dict[str, ort.InferenceSession]], CaseResult]
    models: tuple[str, ...]


def _session(model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(default_model_repository() / model / "1" / "model.onnx"))


# -- head CT --------------------------------------------------------------------------------------------------

HEAD_SIZES = (2.5, 4.0, 6.0, 9.0)


def _head_case(index: int, seed: int, folder: Path, sessions: dict[str, ort.InferenceSession]) -> CaseResult:
    rng = np.random.default_rng(seed * 1000 + index)
    lesions = []
    for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 lesions; about a third of studies are normal
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8)
        lesions.append(
            Lesion(
                x=256 + radius * 150 * np.cos(angle),
                y=256 + radius * 170 * np.sin(angle),
                slice=int(rng.integers(4, 12)),
                radius_mm=float(rng.choice(HEAD_SIZES)),
                hu=float(rng.choice((56.0, 66.0, 76.0))),
            )
        )
    noise = (4.0, 8.0, 12.0)[index % 3]
    series = write_head_ct(
        folder, slices=16, lesions=tuple(lesions), seed=seed * 1000 + index, noise_hu=noise
    )
    stack = model_input(
        load_series(series.paths), size=(256, 256), intensity="hu", hu_clip=(-1024.0, 3071.0), window=None
    )
    heat = sessions["ct_head_hyperdensity_detector"].run(None, {"INPUT": hyperdensity_channels(stack)})[0]
    detections, _, _ = heatmap_to_detections(heat, threshold=0.3)
    result = CaseResult(truths=[Truth(size=lesion.radius_mm) for lesion in lesions])
    for k, _, score, x0, y0, x1, y1 in detections.tolist():
        cx, cy = (x0 + x1) / 2 * 512, (y0 + y1) / 2 * 512
        hit = -1
        for i, lesion in enumerate(lesions):
            if abs(int(k) - lesion.slice) * 5.0 >= lesion.radius_mm:
                continue
            if float(np.hypot(cx - lesion.x, cy - lesion.y)) * 0.5 <= lesion.radius_mm + 3.0:
                hit = i
                break
        result.detections.append((score, hit))
    return result


# -- chest CT -------------------------------------------------------------------------------------------------

CHEST_SIZES = (4.0, 6.0, 10.0, 16.0)
CHEST_SLICES, CHEST_SLICE_MM, CHEST_PIXEL_MM = 24, 2.5, 0.7


def _chest_case(index: int, seed: int, folder: Path, sessions: dict[str, ort.InferenceSession]) -> CaseResult:
    rng = np.random.default_rng(seed * 1000 + index)
    found_nodules: list[Nodule] = []
    for _ in range(int(rng.integers(0, 3))):
        diameter = float(rng.choice(CHEST_SIZES))
        side = 1 if rng.random() < 0.5 else -1
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.6)
        margin = diameter / 2 + CHEST_SLICE_MM
        found_nodules.append(
            Nodule(
                x_mm=side * 70.0 + radius * 35.0 * float(np.cos(angle)),
                y_mm=-5.0 + radius * 55.0 * float(np.sin(angle)),
                z_mm=float(rng.uniform(margin, (CHEST_SLICES - 1) * CHEST_SLICE_MM - margin)),
                diameter_mm=diameter,
                hu=float(rng.choice((0.0, 30.0))),
            )
        )
    noise = (15.0, 25.0, 35.0)[index % 3]
    series = write_chest_ct(
        folder,
        slices=CHEST_SLICES,
        slice_mm=CHEST_SLICE_MM,
        pixel_mm=CHEST_PIXEL_MM,
        nodules=tuple(found_nodules),
        seed=seed * 1000 + index,
        noise_hu=noise,
    )
    loaded = load_series(series.paths)
    stack = model_input(loaded, size=(256, 256), intensity="hu", hu_clip=(-1024.0, 3071.0), window=None)
    channels = lung_channels(stack)
    small = sessions["ct_chest_nodule_detector_small"].run(None, {"INPUT": channels})[0]
    large = sessions["ct_chest_nodule_detector_large"].run(None, {"INPUT": channels})[0]
    spacing = np.asarray(loaded.grid_spacing_mm((256, 256)), dtype=np.float32)
    detections, _, _ = nodules(small, large, channels, spacing)
    voxel_mm3 = float(np.prod(spacing))
    truths = [
        Truth(size=n.diameter_mm, volume_mm3=n.volume_mm3, diameter_mm=n.diameter_mm) for n in found_nodules
    ]
    result = CaseResult(truths=truths)
    fov = 512 * CHEST_PIXEL_MM
    for k, _, score, x0, y0, x1, y1, _, _, voxels in detections.tolist():
        cx, cy = ((x0 + x1) / 2 - 0.5) * fov, ((y0 + y1) / 2 - 0.5) * fov
        hit = -1
        for i, n in enumerate(found_nodules):
            if abs(k * CHEST_SLICE_MM - n.z_mm) > n.diameter_mm / 2 + CHEST_SLICE_MM:
                continue
            if float(np.hypot(cx - n.x_mm, cy - n.y_mm)) <= n.diameter_mm / 2 + 3.0:
                hit = i
                break
        if hit >= 0 and any(h == hit for _, h in result.detections):
            hit = -1  # reported twice: the second report is a false positive
        elif hit >= 0:
            diameter = max(x1 - x0, y1 - y0) * fov
            result.measured.append((hit, diameter, voxels * voxel_mm3))
        result.detections.append((score, hit))
    return result


# -- chest radiograph ---------------------------------------------------------------------------------------

CXR_SIZES = (8.0, 15.0, 25.0)
CXR_SIZE, CXR_PIXEL_MM = 1536, 0.25


def _in_heart(x: float, y: float, margin: float) -> bool:
    return ((x + 15.0) / (60.0 + margin)) ** 2 + ((y - 45.0) / (55.0 + margin)) ** 2 <= 1.0


def _cxr_case(index: int, seed: int, folder: Path, sessions: dict[str, ort.InferenceSession]) -> CaseResult:
    rng = np.random.default_rng(seed * 1000 + index)
    found: list[Opacity] = []
    target = int(rng.integers(0, 3))
    while len(found) < target:
        diameter = float(rng.choice(CXR_SIZES))
        side = 1 if rng.random() < 0.5 else -1
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.7)
        x, y = (
            side * 75.0 + radius * 38.0 * float(np.cos(angle)),
            -15.0 + radius * 85.0 * float(np.sin(angle)),
        )
        if _in_heart(x, y, diameter / 2):
            continue
        found.append(
            Opacity(x_mm=x, y_mm=y, diameter_mm=diameter, density=float(rng.choice((0.08, 0.12, 0.16))))
        )
    series = write_cxr(
        folder,
        size=CXR_SIZE,
        pixel_mm=CXR_PIXEL_MM,
        opacities=tuple(found),
        seed=seed * 1000 + index,
        noise=(0.01, 0.02, 0.03)[index % 3],
        monochrome1=index % 2 == 1,
    )
    image = model_input(
        load_series(series.paths), size=(256, 256), intensity="percentile", hu_clip=(0.0, 0.0), window=None
    )
    channels = radiograph_channels(image)
    small = sessions["cxr_opacity_detector_small"].run(None, {"INPUT": channels})[0]
    large = sessions["cxr_opacity_detector_large"].run(None, {"INPUT": channels})[0]
    detections, _, _ = opacities(small, large)
    result = CaseResult(truths=[Truth(size=o.diameter_mm) for o in found])
    fov = CXR_SIZE * CXR_PIXEL_MM
    for _, _, score, x0, y0, x1, y1 in detections.tolist():
        cx, cy = ((x0 + x1) / 2 - 0.5) * fov, ((y0 + y1) / 2 - 0.5) * fov
        hit = next(
            (i for i, o in enumerate(found) if np.hypot(cx - o.x_mm, cy - o.y_mm) <= o.diameter_mm / 2 + 5.0),
            -1,
        )
        if hit >= 0 and any(h == hit for _, h in result.detections):
            hit = -1
        result.detections.append((score, hit))
    return result


EVALUATIONS = {
    "ct_head": Evaluation(
        name="ct_head",
        title="reference head CT hyperdensity pipeline (ct_head_hyperdensity)",
        size_label="radius",
        sizes=HEAD_SIZES,
        studies=30,
        run=_head_case,
        models=("ct_head_hyperdensity_detector",),
    ),
    "ct_chest": Evaluation(
        name="ct_chest",
        title="reference chest CT lung nodule pipeline (ct_chest_nodule: two detectors fused, 3D)",
        size_label="diameter",
        sizes=CHEST_SIZES,
        studies=24,
        run=_chest_case,
        models=("ct_chest_nodule_detector_small", "ct_chest_nodule_detector_large"),
    ),
    "cxr": Evaluation(
        name="cxr",
        title="reference chest radiograph opacity pipeline (cxr_opacity: two detectors fused)",
        size_label="diameter",
        sizes=CXR_SIZES,
        studies=30,
        run=_cxr_case,
        models=("cxr_opacity_detector_small", "cxr_opacity_detector_large"),
    ),
}


def froc(evaluation: Evaluation, results: list[CaseResult]) -> dict[str, Any]:
    thresholds = sorted({s for r in results for s, _ in r.detections} | {1.01}, reverse=True)
    studies = len(results)
    points = []
    for threshold in thresholds:
        found: set[tuple[int, int]] = set()
        false_positives = 0
        for c, result in enumerate(results):
            for score, lesion in result.detections:
                if score < threshold:
                    continue
                if lesion >= 0:
                    found.add((c, lesion))
                else:
                    false_positives += 1
        points.append((false_positives / studies, found))
    lesions = [(c, i, t) for c, r in enumerate(results) for i, t in enumerate(r.truths)]

    def sensitivity_at(rate: float, size: float | None = None) -> float:
        subset = [(c, i) for c, i, t in lesions if size is None or t.size == size]
        best = 0.0
        for fp, found in points:
            if fp <= rate and subset:
                best = max(best, sum((c, i) in found for c, i in subset) / len(subset))
        return round(best, 3)

    report: dict[str, Any] = {
        "pipeline": evaluation.name,
        "studies": studies,
        "lesions": len(lesions),
        "size_label": evaluation.size_label,
        "curve": [(round(fp, 3), round(len(found) / max(len(lesions), 1), 3)) for fp, found in points],
        "sensitivity": {f"{rate:g}": sensitivity_at(rate) for rate in FP_RATES},
        "by_size_mm": {
            f"{size:g}": {f"{rate:g}": sensitivity_at(rate, size) for rate in FP_RATES}
            for size in evaluation.sizes
        },
        "lesions_by_size_mm": {
            f"{size:g}": sum(1 for _, _, t in lesions if t.size == size) for size in evaluation.sizes
        },
    }
    measured = [(results[c].truths[i], d, v) for c, r in enumerate(results) for i, d, v in r.measured]
    if measured:
        report["measurement_error"] = {
            f"{size:g}": {
                "diameter_mm_median_abs": round(
                    float(np.median([abs(d - t.diameter_mm) for t, d, _ in rows if t.diameter_mm])), 2
                ),
                "volume_median_abs_relative": round(
                    float(
                        np.median([abs(v - t.volume_mm3) / t.volume_mm3 for t, _, v in rows if t.volume_mm3])
                    ),
                    3,
                ),
                "found": len(rows),
            }
            for size in evaluation.sizes
            if (rows := [m for m in measured if m[0].size == size])
        }
    return report


def evaluate(pipeline: str = "ct_head", studies: int | None = None, seed: int = 7) -> dict[str, Any]:
    evaluation = EVALUATIONS[pipeline]
    sessions = {name: _session(name) for name in evaluation.models}
    count = studies if studies is not None else evaluation.studies
    with tempfile.TemporaryDirectory() as tmp:
        results = [evaluation.run(i, seed, Path(tmp) / f"s{i}", sessions) for i in range(count)]
    report = froc(evaluation, results)
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


def markdown(report: dict[str, Any]) -> str:
    evaluation = EVALUATIONS[report["pipeline"]]
    sens, by_size, counts = report["sensitivity"], report["by_size_mm"], report["lesions_by_size_mm"]
    lines = [
        f"FROC of the {evaluation.title}: {report['studies']} phantom studies, {report['lesions']} lesions, "
        f"seed {report['seed']} (`python -m benchmarks.evaluate --pipeline {evaluation.name}`).",
        "",
        "| lesions | n | sens @ 0.5 FP/study | sens @ 1 FP/study | sens @ 2 FP/study |",
        "|---|---|---|---|---|",
        f"| all | {report['lesions']} | {sens['0.5']} | {sens['1']} | {sens['2']} |",
    ]
    for size, values in by_size.items():
        lines.append(
            f"| {evaluation.size_label} {size} mm | {counts[size]} | {values['0.5']} | {values['1']} | {values['2']} |"
        )
    errors = report.get("measurement_error")
    if errors:
        lines += [
            "",
            "Measurements of the found nodules (median absolute error):",
            "",
            "| diameter | found | diameter error (mm) | volume error (relative) |",
            "|---|---|---|---|",
        ]
        for size, e in errors.items():
            lines.append(
                f"| {size} mm | {e['found']} | {e['diameter_mm_median_abs']} | {e['volume_median_abs_relative']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", choices=[*EVALUATIONS, "all"], default="all")
    parser.add_argument("--studies", type=int, default=None, help="phantom studies (default: per pipeline)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/froc"), help="committed results folder")
    args = parser.parse_args(argv)
    names = list(EVALUATIONS) if args.pipeline == "all" else [args.pipeline]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        report = evaluate(name, args.studies, args.seed)
        (args.out / f"froc_{name}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"froc_{name}.md").write_text(markdown(report))
        (args.out / f"froc_{name}.svg").write_text(svg(report["curve"]))
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
