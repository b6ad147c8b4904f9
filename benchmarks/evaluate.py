"""Detection quality of the reference pipelines as the gateway serves them (FROC), on phantoms with ground truth
and on real images that hold none of these lesions.

What is measured is the served path: each study is written as real DICOM, decoded and prepared by the gateway's
own code, sent to the model repository's ensembles through a real Triton server (started here from the wheel,
or ``--triton-url``), and read back with each pipeline's configured ``report_threshold`` and plausibility rules
(``gateway.orchestration.analysis``), exactly as a worker of the running gateway does. Fixed seeds:

* ``ct_head``  - head CT, hyperdense lesions of 2.5-9 mm radius, 3 contrasts, 3 noise levels. A lesion is found
  by a finding on a slice it crosses whose box centre lies within its radius + 3 mm; several slices of one
  lesion count once (the pipeline reports per slice).
* ``ct_chest`` - chest CT with lungs, mediastinum, spine and vessels running through the slices; nodules of
  4-16 mm diameter; two detectors fused, linked in 3D. A nodule is found by a finding whose key slice lies within
  its radius + one slice and whose centre lies within radius + 3 mm; a second finding of the same nodule is a
  false positive (the pipeline must report each nodule once). Diameter and volume errors of found nodules too.
* ``cxr``      - chest radiographs (half MONOCHROME1) with ribs, heart and spine; Gaussian opacities of 8-25 mm
  in the lung fields; found when the box centre lies within radius + 5 mm; duplicates are false positives.

Findings are matched in descending confidence, so a lesion's best finding is the one that finds it. The FROC
table gives per-lesion sensitivity at 0.5, 1 and 2 false positives per study, overall and by size, over
everything the served ensemble answers (its own detection thresholds apply), and the operating point: what the
pipeline reports at its configured ``report_threshold``, which is what reaches a radiologist.

Real negatives: every real CT, MR and radiograph series of the shared data (and of ``pydicom-data`` when
installed) goes to every pipeline that accepts its modality, whatever its body part (so a misrouted series is
measured too), and whether the router would have sent it there is recorded; every finding there is a false
positive.

    python -m benchmarks.evaluate                   # all -> benchmarks/froc/froc_<name>.{json,md,svg}, real_negatives.*
    python -m benchmarks.evaluate --pipeline cxr --triton-url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pydicom

from clients.triton import TritonClient
from gateway.config.settings import PipelineSettings, Settings, default_model_repository, load_settings
from gateway.core.domain import Finding
from gateway.demo.phantoms import Lesion, Nodule, Opacity, write_chest_ct, write_cxr, write_head_ct
from gateway.ingest.assembler import assemble_study
from gateway.ingest.spool import record_from_header
from gateway.orchestration.analysis import Reading, analyse
from gateway.orchestration.routing import Router
from preprocessing.series import LoadedSeries, load_series

FP_RATES = (0.5, 1.0, 2.0)


# -- matching findings to ground truth ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Target:
    """One lesion of a phantom, where the matching looks for it."""

    x_mm: float  # centre from the image centre, column direction
    y_mm: float  # centre from the image centre, row direction
    z_mm: float = 0.0  # centre along the series from the first slice (0 for radiographs)
    radius_mm: float
    size: float  # the size bin the table reports (radius or diameter, see Evaluation.size_label)
    volume_mm3: float | None = None
    diameter_mm: float | None = None


@dataclass(frozen=True, kw_only=True)
class Detection:
    """One reported finding, in the coordinates of :class:`Target`."""

    score: float
    x_mm: float
    y_mm: float
    z_mm: float = 0.0
    long_axis_mm: float | None = None
    volume_mm3: float | None = None


@dataclass(frozen=True, kw_only=True)
class MatchRule:
    xy_margin_mm: float  # a finding's centre lies within radius + this of the lesion's centre
    z_margin_mm: float  # ... and its slice within radius + this of the lesion's centre (strictly)
    duplicates_are_false_positives: bool  # False: several findings of one lesion count once, no penalty


@dataclass
class CaseResult:
    truths: list[Target]
    # (score, index of the lesion it found or -1); a duplicate of a found lesion is given -1 where duplicates
    # are false positives, and its lesion's index where they are not
    detections: list[tuple[float, int]] = field(default_factory=list)
    # (lesion index, reported long axis mm, reported volume mm3) of the finding that found each lesion
    measured: list[tuple[int, float, float]] = field(default_factory=list)


def match(detections: Sequence[Detection], targets: Sequence[Target], rule: MatchRule) -> CaseResult:
    """Assign findings to lesions, best finding first: a finding finds the first lesion within reach."""
    result = CaseResult(truths=list(targets))
    found: set[int] = set()
    for d in sorted(detections, key=lambda d: -d.score):
        hit = -1
        for i, t in enumerate(targets):
            if abs(d.z_mm - t.z_mm) >= t.radius_mm + rule.z_margin_mm:
                continue
            if float(np.hypot(d.x_mm - t.x_mm, d.y_mm - t.y_mm)) <= t.radius_mm + rule.xy_margin_mm:
                hit = i
                break
        if hit >= 0 and hit in found:
            result.detections.append((d.score, -1 if rule.duplicates_are_false_positives else hit))
            continue
        if hit >= 0:
            found.add(hit)
            if d.long_axis_mm is not None and d.volume_mm3 is not None:
                result.measured.append((hit, d.long_axis_mm, d.volume_mm3))
        result.detections.append((d.score, hit))
    return result


def detections_of(
    findings: Iterable[Finding], loaded: LoadedSeries, *, pixel_mm: float, slice_mm: float
) -> list[Detection]:
    """Findings (boxes in source pixels on a slice) -> positions in mm from the image centre and first slice."""
    out = []
    for f in findings:
        if f.bbox is None:
            continue
        rows, cols = loaded.images[f.slice_index].shape
        x0, y0, x1, y1 = f.bbox
        out.append(
            Detection(
                score=f.confidence,
                x_mm=((x0 + x1) / 2 - cols / 2) * pixel_mm,
                y_mm=((y0 + y1) / 2 - rows / 2) * pixel_mm,
                z_mm=f.slice_index * slice_mm,
                long_axis_mm=f.long_axis_mm,
                volume_mm3=f.volume_mm3,
            )
        )
    return out


# -- the FROC table ---------------------------------------------------------------------------------------------


def froc(
    results: Sequence[CaseResult],
    *,
    sizes: Sequence[float],
    name: str = "",
    size_label: str = "size",
    operating_threshold: float | None = None,
) -> dict[str, Any]:
    """Per-lesion sensitivity against false positives per study, overall and by lesion size; the operating
    point is what is reported at ``operating_threshold`` (default: every detection)."""
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
        points.append((false_positives / max(studies, 1), found))
    lesions = [(c, i, t) for c, r in enumerate(results) for i, t in enumerate(r.truths)]

    def sensitivity_at(rate: float, size: float | None = None) -> float:
        subset = [(c, i) for c, i, t in lesions if size is None or t.size == size]
        best = 0.0
        for fp, found in points:
            if fp <= rate and subset:
                best = max(best, sum((c, i) in found for c, i in subset) / len(subset))
        return round(best, 3)

    if operating_threshold is None:
        operating_threshold = min((s for r in results for s, _ in r.detections), default=1.01)
    op_found = {
        (c, h) for c, r in enumerate(results) for s, h in r.detections if s >= operating_threshold and h >= 0
    }
    op_fp = sum(1 for r in results for s, h in r.detections if s >= operating_threshold and h < 0)
    report: dict[str, Any] = {
        "pipeline": name,
        "studies": studies,
        "lesions": len(lesions),
        "size_label": size_label,
        "curve": [(round(fp, 3), round(len(found) / max(len(lesions), 1), 3)) for fp, found in points],
        "sensitivity": {f"{rate:g}": sensitivity_at(rate) for rate in FP_RATES},
        "operating_point": {
            "threshold": round(operating_threshold, 3),
            "sensitivity": round(len(op_found) / max(len(lesions), 1), 3),
            "false_positives_per_study": round(op_fp / max(studies, 1), 3),
        },
        "by_size_mm": {
            f"{size:g}": {f"{rate:g}": sensitivity_at(rate, size) for rate in FP_RATES} for size in sizes
        },
        "lesions_by_size_mm": {
            f"{size:g}": sum(1 for _, _, t in lesions if t.size == size) for size in sizes
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
            for size in sizes
            if (rows := [m for m in measured if m[0].size == size])
        }
    return report


# -- the served path -----------------------------------------------------------------------------------------


class ServedPath:
    """A Triton server with the model repository (started here unless ``url`` is given) and the embedded
    configuration's pipelines; :meth:`analyse` runs one series as a gateway worker does."""

    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self._url = url
        self._server: Any = None
        self._work: tempfile.TemporaryDirectory[str] | None = None
        self._loop = asyncio.new_event_loop()
        self._client: TritonClient | None = None

    def pipeline(self, name: str) -> PipelineSettings:
        return next(p for p in self.settings.pipelines if p.name == name)

    def __enter__(self) -> ServedPath:
        if self._url is None:
            from gateway.inference.server import TritonServer

            self._work = tempfile.TemporaryDirectory(prefix="evaluate-triton-")
            self._server = TritonServer(
                default_model_repository(), Path(self._work.name), startup_timeout_s=180
            )
            self._server.start()
            self._url = self._server.grpc_url

        async def connect() -> TritonClient:
            return TritonClient(self._url or "")  # the gRPC client belongs to the loop it is made in

        self._client = self._loop.run_until_complete(connect())
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
        self._loop.close()
        if self._server is not None:
            self._server.stop()
        if self._work is not None:
            self._work.cleanup()

    def analyse(self, loaded: LoadedSeries, pipeline: PipelineSettings, *, modality: str) -> Reading:
        assert self._client is not None, "use ServedPath as a context manager"
        return self._loop.run_until_complete(analyse(self._client, loaded, pipeline, modality=modality))


# -- phantom studies ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomCase:
    paths: tuple[Path, ...]
    targets: list[Target]


@dataclass(frozen=True)
class Evaluation:
    name: str
    pipeline: str  # the pipeline of the embedded configuration that is evaluated
    title: str
    size_label: str
    sizes: tuple[float, ...]
    studies: int
    make: Callable[[int, int, Path], PhantomCase]
    rule: MatchRule
    modality: str
    pixel_mm: float
    slice_mm: float


HEAD_SIZES = (2.5, 4.0, 6.0, 9.0)
HEAD_PIXEL_MM, HEAD_SLICE_MM = 0.5, 5.0


def _head_case(index: int, seed: int, folder: Path) -> PhantomCase:
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
    targets = [
        Target(
            x_mm=(lesion.x - 256) * HEAD_PIXEL_MM,
            y_mm=(lesion.y - 256) * HEAD_PIXEL_MM,
            z_mm=lesion.slice * HEAD_SLICE_MM,
            radius_mm=lesion.radius_mm,
            size=lesion.radius_mm,
        )
        for lesion in lesions
    ]
    return PhantomCase(series.paths, targets)


CHEST_SIZES = (4.0, 6.0, 10.0, 16.0)
CHEST_SLICES, CHEST_SLICE_MM, CHEST_PIXEL_MM = 24, 2.5, 0.7


def _chest_case(index: int, seed: int, folder: Path) -> PhantomCase:
    rng = np.random.default_rng(seed * 1000 + index)
    nodules: list[Nodule] = []
    for _ in range(int(rng.integers(0, 3))):
        diameter = float(rng.choice(CHEST_SIZES))
        side = 1 if rng.random() < 0.5 else -1
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.6)
        margin = diameter / 2 + CHEST_SLICE_MM
        nodules.append(
            Nodule(
                x_mm=side * 70.0 + radius * 35.0 * float(np.cos(angle)),
                y_mm=-5.0 + radius * 55.0 * float(np.sin(angle)),
                z_mm=float(rng.uniform(margin, (CHEST_SLICES - 1) * CHEST_SLICE_MM - margin)),
                diameter_mm=diameter,
                hu=float(rng.choice((0.0, 30.0))),
            )
        )
    series = write_chest_ct(
        folder,
        slices=CHEST_SLICES,
        slice_mm=CHEST_SLICE_MM,
        pixel_mm=CHEST_PIXEL_MM,
        nodules=tuple(nodules),
        seed=seed * 1000 + index,
        noise_hu=(15.0, 25.0, 35.0)[index % 3],
    )
    targets = [
        Target(
            x_mm=n.x_mm,
            y_mm=n.y_mm,
            z_mm=n.z_mm,
            radius_mm=n.diameter_mm / 2,
            size=n.diameter_mm,
            volume_mm3=n.volume_mm3,
            diameter_mm=n.diameter_mm,
        )
        for n in nodules
    ]
    return PhantomCase(series.paths, targets)


CXR_SIZES = (8.0, 15.0, 25.0)
CXR_SIZE, CXR_PIXEL_MM = 1536, 0.25


def _in_heart(x: float, y: float, margin: float) -> bool:
    return ((x + 15.0) / (60.0 + margin)) ** 2 + ((y - 45.0) / (55.0 + margin)) ** 2 <= 1.0


def _cxr_case(index: int, seed: int, folder: Path) -> PhantomCase:
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
    targets = [
        Target(x_mm=o.x_mm, y_mm=o.y_mm, radius_mm=o.diameter_mm / 2, size=o.diameter_mm) for o in found
    ]
    return PhantomCase(series.paths, targets)


EVALUATIONS = {
    "ct_head": Evaluation(
        name="ct_head",
        pipeline="ct_head_hyperdensity",
        title="reference head CT hyperdensity pipeline (ct_head_hyperdensity)",
        size_label="radius",
        sizes=HEAD_SIZES,
        studies=30,
        make=_head_case,
        rule=MatchRule(xy_margin_mm=3.0, z_margin_mm=0.0, duplicates_are_false_positives=False),
        modality="CT",
        pixel_mm=HEAD_PIXEL_MM,
        slice_mm=HEAD_SLICE_MM,
    ),
    "ct_chest": Evaluation(
        name="ct_chest",
        pipeline="ct_chest_nodule",
        title="reference chest CT lung nodule pipeline (ct_chest_nodule: two detectors fused, 3D)",
        size_label="diameter",
        sizes=CHEST_SIZES,
        studies=24,
        make=_chest_case,
        rule=MatchRule(xy_margin_mm=3.0, z_margin_mm=CHEST_SLICE_MM, duplicates_are_false_positives=True),
        modality="CT",
        pixel_mm=CHEST_PIXEL_MM,
        slice_mm=CHEST_SLICE_MM,
    ),
    "cxr": Evaluation(
        name="cxr",
        pipeline="cxr_opacity",
        title="reference chest radiograph opacity pipeline (cxr_opacity: two detectors fused)",
        size_label="diameter",
        sizes=CXR_SIZES,
        studies=30,
        make=_cxr_case,
        rule=MatchRule(xy_margin_mm=5.0, z_margin_mm=0.0, duplicates_are_false_positives=True),
        modality="CR",
        pixel_mm=CXR_PIXEL_MM,
        slice_mm=0.0,
    ),
}


def evaluate(
    name: str,
    served: ServedPath,
    studies: int | None = None,
    seed: int = 7,
    on_case: Callable[[], object] | None = None,
) -> dict[str, Any]:
    evaluation = EVALUATIONS[name]
    pipeline = served.pipeline(evaluation.pipeline)
    # The whole curve: everything the served ensemble answers (its own thresholds apply); the operating point
    # is what the pipeline reports at its configured report_threshold.
    curve_pipeline = pipeline.replace(report_threshold=0.0)
    count = studies if studies is not None else evaluation.studies
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            case = evaluation.make(i, seed, Path(tmp) / f"s{i}")
            loaded = load_series(case.paths)
            reading = served.analyse(loaded, curve_pipeline, modality=evaluation.modality)
            found = detections_of(
                reading.interpretation.findings,
                loaded,
                pixel_mm=evaluation.pixel_mm,
                slice_mm=evaluation.slice_mm,
            )
            results.append(match(found, case.targets, evaluation.rule))
            if on_case is not None:
                on_case()
    report = froc(
        results,
        sizes=evaluation.sizes,
        name=name,
        size_label=evaluation.size_label,
        operating_threshold=pipeline.output.report_threshold,
    )
    report.update(
        seed=seed,
        served_pipeline=pipeline.name,
        model=pipeline.model,
        report_threshold=pipeline.output.report_threshold,
        seconds=round(time.perf_counter() - started, 1),
    )
    return report


# -- real negatives ---------------------------------------------------------------------------------------------

# (label, where, glob): "shared" is the shared real data folder, "pydicom-data" the installed package's files.
REAL_NEGATIVES = (
    ("GE CT, upper abdomen with lung bases (3 slices)", "shared", "ct-3slice/0*.dcm"),
    ("chest CT slice, JPEG-LS (NEMA WG04)", "shared", "compressed/CT1_JLSN.dcm"),
    ("Siemens MR slice", "shared", "transfer-syntaxes/mr_1.dcm"),
    ("MR 1024x1024, JPEG lossless", "shared", "compressed/JPEGLossless_1s_1f_u_16_12.dcm"),
    ("CR hip 2140x1760, JPEG-LS", "shared", "compressed/RG2_JLSL.dcm"),
    ("CR chest PA 1955x1841, MONOCHROME1", "pydicom-data", "RG1_UNCI.dcm"),
    ("CR tibia 1760x1760", "pydicom-data", "RG3_UNCI.dcm"),
    ("MR shoulder 1024x1024", "pydicom-data", "MR2_UNCI.dcm"),
)


def default_real_data() -> Path:
    return Path(
        os.environ.get("GATEWAY_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    )


def _pydicom_data_root() -> Path | None:
    try:
        import data_store  # type: ignore[import-untyped]  # the pydicom-data package
    except ImportError:
        return None
    return Path(data_store.__file__).parent / "data"


def real_negatives(served: ServedPath, real_data: Path) -> dict[str, Any]:
    """Every real series to every pipeline of its modality: findings there are false positives."""
    roots = {"shared": real_data, "pydicom-data": _pydicom_data_root()}
    router = Router(served.settings.pipelines)
    series_rows: list[dict[str, Any]] = []
    for label, where, pattern in REAL_NEGATIVES:
        root = roots[where]
        paths = sorted(root.glob(pattern)) if root is not None and root.is_dir() else []
        if not paths:
            series_rows.append({"series": label, "missing": f"{where}: {pattern}"})
            continue
        records = [record_from_header(pydicom.dcmread(p, defer_size=1024), p, "EVALUATE", 0.0) for p in paths]
        study = assemble_study(records, calling_ae="EVALUATE", first_received_at=0.0, last_received_at=0.0)
        modality = study.series[0].modality.upper()
        routed = {job.pipeline.name for job in router.route(study).jobs}
        loaded = load_series(paths)
        row: dict[str, Any] = {
            "series": label,
            "modality": modality,
            "slices": len(loaded.images),
            "pipelines": {},
        }
        for pipeline in served.settings.pipelines:
            if modality not in pipeline.route.modalities:
                continue
            reading = served.analyse(loaded, pipeline, modality=modality)
            row["pipelines"][pipeline.name] = {
                "routed": pipeline.name in routed,
                "false_positives": len(reading.interpretation.findings),
                "implausible_dropped": len(reading.implausible),
                "stat": reading.interpretation.stat,
            }
        series_rows.append(row)
    per_pipeline: dict[str, dict[str, Any]] = {}
    for pipeline in served.settings.pipelines:
        rows = [r["pipelines"][pipeline.name] for r in series_rows if pipeline.name in r.get("pipelines", {})]
        per_pipeline[pipeline.name] = {
            "routed": _false_positive_summary([r for r in rows if r["routed"]]),
            "any_body_part": _false_positive_summary(rows),
        }
    return {"series": series_rows, "per_pipeline": per_pipeline}


def _false_positive_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    false_positives = sum(r["false_positives"] for r in rows)
    return {
        "series": len(rows),
        "false_positives": false_positives,
        "false_positives_per_series": round(false_positives / len(rows), 3) if rows else None,
        "stat_false_alarms": sum(r["stat"] for r in rows),
        "implausible_dropped": sum(r["implausible_dropped"] for r in rows),
    }


# -- reports -----------------------------------------------------------------------------------------------------


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
    op = report["operating_point"]
    lines = [
        f"FROC of the {evaluation.title}, served path (Triton, report threshold {report['report_threshold']}): "
        f"{report['studies']} phantom studies, {report['lesions']} lesions, seed {report['seed']} "
        f"(`python -m benchmarks.evaluate --pipeline {evaluation.name}`).",
        "",
        f"Operating point (what the pipeline reports, confidence >= {op['threshold']}): "
        f"sensitivity {op['sensitivity']}, "
        f"{op['false_positives_per_study']} false positives per study.",
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


def negatives_markdown(report: dict[str, Any]) -> str:
    lines = [
        "False positives on real images without these lesions, served path "
        "(`python -m benchmarks.evaluate --pipeline real`): every real series goes to every pipeline of its "
        "modality, whatever its body part; *routed there* counts only the series the gateway's router would send to "
        "that pipeline (what a site sees), *any body part* all of them (what a misrouted series would get).",
        "",
        "| pipeline | series | false positives | per series | STAT false alarms | dropped as implausible |",
        "|---|---|---|---|---|---|",
    ]
    for name, both in report["per_pipeline"].items():
        for scope, label in (("routed", "routed there"), ("any_body_part", "any body part")):
            p = both[scope]
            lines.append(
                f"| {name} ({label}) | {p['series']} | {p['false_positives']} | {p['false_positives_per_series']} "
                f"| {p['stat_false_alarms']} | {p['implausible_dropped']} |"
            )
    lines += ["", "| series | modality | pipeline | routed | false positives |", "|---|---|---|---|---|"]
    for row in report["series"]:
        if "missing" in row:
            lines.append(f"| {row['series']} | - | - | - | not found ({row['missing']}) |")
            continue
        if not row["pipelines"]:
            lines.append(
                f"| {row['series']} | {row['modality']} | no pipeline takes {row['modality']} | - | - |"
            )
        for name, p in row["pipelines"].items():
            lines.append(
                f"| {row['series']} | {row['modality']} | {name} | {'yes' if p['routed'] else 'no'} | "
                f"{p['false_positives']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", choices=[*EVALUATIONS, "real", "all"], default="all")
    parser.add_argument("--studies", type=int, default=None, help="phantom studies (default: per pipeline)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--triton-url", default=None, help="a running Triton (default: start one here)")
    parser.add_argument(
        "--real-data", type=Path, default=default_real_data(), help="shared real DICOM folder"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/froc"), help="committed results folder")
    args = parser.parse_args(argv)
    names = list(EVALUATIONS) if args.pipeline in ("all", "real") else [args.pipeline]
    if args.pipeline == "real":
        names = []
    args.out.mkdir(parents=True, exist_ok=True)
    with ServedPath(args.triton_url) as served:
        for name in names:
            total = args.studies if args.studies is not None else EVALUATIONS[name].studies
            with tqdm(total=total, unit="study", desc=name, file=sys.stderr) as bar:
                report = evaluate(name, served, args.studies, args.seed, on_case=lambda: bar.update(1))
            (args.out / f"froc_{name}.json").write_text(json.dumps(report, indent=2))
            (args.out / f"froc_{name}.md").write_text(markdown(report))
            (args.out / f"froc_{name}.svg").write_text(svg(report["curve"]))
            print(markdown(report))
        if args.pipeline in ("all", "real"):
            negatives = real_negatives(served, args.real_data)
            (args.out / "real_negatives.json").write_text(json.dumps(negatives, indent=2))
            (args.out / "real_negatives.md").write_text(negatives_markdown(negatives))
            print(negatives_markdown(negatives))
    return 0


if __name__ == "__main__":
    sys.exit(main())
