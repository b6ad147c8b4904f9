"""``gateway demo``: the first five minutes. One synthetic study per reference pipeline (a head CT with a bleed,
a chest CT with two nodules, a chest radiograph with an opacity) is sent to the running gateway over DICOM;
the demo waits for the analyses in the system of record, prints each study's findings, writes a PNG of each
study's key image with the AI's boxes, and says where to look next. The studies are phantoms: no patient data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from clients.dicom_scu import echo, store_files
from gateway.config.pipeline import PipelineSettings
from gateway.config.settings import Peer, Settings
from gateway.core.errors import ConfigError, DatabaseError
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.database.queries import study_timeline
from gateway.database.verdicts import AiFindingRow, findings_of
from gateway.demo.phantoms import (
    Lesion,
    Nodule,
    Opacity,
    PhantomSeries,
    write_chest_ct,
    write_cxr,
    write_head_ct,
)

FINISHED = {"results_stored", "delivered", "failed", "skipped"}

# The model each phantom shows (a pipeline's model), and how to make it.
PHANTOMS: dict[str, Callable[[Path], PhantomSeries]] = {
    "ct_head_hyperdensity": lambda out: write_head_ct(
        out, slices=12, lesions=(Lesion(x=300, y=220, slice=6, radius_mm=8.0, hu=72.0),), seed=3
    ),
    "ct_chest_nodule": lambda out: write_chest_ct(
        out,
        slices=24,
        nodules=(
            Nodule(x_mm=-70.0, y_mm=-20.0, z_mm=22.0, diameter_mm=16.0, hu=30.0),
            Nodule(x_mm=75.0, y_mm=15.0, z_mm=35.0, diameter_mm=10.0, hu=30.0),
        ),
        seed=11,
        noise_hu=15.0,
    ),
    "cxr_opacity": lambda out: write_cxr(
        out,
        opacities=(Opacity(x_mm=80.0, y_mm=-40.0, diameter_mm=20.0, density=0.16),),
        seed=5,
        monochrome1=True,
    ),
}


@dataclass(frozen=True, kw_only=True)
class DemoStudy:
    pipeline: PipelineSettings
    series: PhantomSeries
    state: str = ""
    findings: tuple[AiFindingRow, ...] = ()
    picture: Path | None = None


def render(path: Path, findings: list[AiFindingRow], window: tuple[float, float], out: Path) -> Path:
    """The image windowed like the GSPS, with each finding's box (red) and confidence, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    center, width = window
    grey = np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    image = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, image.width // 256)
    size = max(12, image.width // 40)
    font = ImageFont.load_default(size=size)
    for finding in findings:
        if finding.box is None:
            continue
        x0, y0, x1, y1 = finding.box
        draw.rectangle((x0 - line, y0 - line, x1 + line, y1 + line), outline=(255, 40, 40), width=line)
        label = f"{finding.finding_meaning} {finding.confidence:.2f}"
        draw.text((x0, max(0, y0 - size - 2 * line)), label, fill=(255, 220, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def _key_image(series: PhantomSeries, findings: list[AiFindingRow]) -> tuple[Path, list[AiFindingRow]] | None:
    """The image of the most confident finding, and every finding drawn on it."""
    located = [f for f in findings if f.box is not None]
    if not located:
        return None
    best = max(located, key=lambda f: f.confidence)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in series.paths}
    path = by_uid.get(best.image_uid)
    return (path, [f for f in located if f.image_uid == best.image_uid]) if path is not None else None


def run_demo(
    settings: Settings,
    out: Path,
    *,
    calling_ae: str = "DEMO",
    timeout_s: float = 300.0,
    say: Callable[[str], None] = print,
) -> list[DemoStudy]:
    """Send the phantoms, wait for their analyses, print and draw the results. Raises ConfigError with what to
    do when the gateway is not running or has no reference pipeline."""
    receiver = settings.receiver
    peer = Peer(ae_title=receiver.ae_title, host=receiver.host, port=receiver.port)
    if not echo(peer, calling_ae=calling_ae):
        raise ConfigError(
            f"no gateway answers C-ECHO at {peer.ae_title}@{peer.host}:{peer.port}: start it first "
            "(`make run`, or `gateway serve --config FILE`) and give the demo the same --config"
        )
    engine = engine_for(settings.database_url)
    if migrate.current(engine) is None:
        raise DatabaseError(
            "the gateway's system of record is empty: is the demo using the gateway's --config?"
        )
    pipelines = [p for p in settings.pipelines if p.model in PHANTOMS]
    if not pipelines:
        raise ConfigError(f"no pipeline uses a reference model ({', '.join(PHANTOMS)}): nothing to show")
    studies = []
    for pipeline in pipelines:
        series = PHANTOMS[pipeline.model](out / "studies" / pipeline.name)
        report = store_files(list(series.paths), peer, calling_ae=calling_ae)
        if report.failed:
            raise ConfigError(
                f"the gateway refused the {pipeline.name} demo study ({len(report.failed)} instance(s)); if "
                f"[receiver] allowed_calling_aes is set, add {calling_ae!r} or pass --calling-ae"
            )
        studies.append(DemoStudy(pipeline=pipeline, series=series))
        say(f"sent a synthetic study for {pipeline.name} ({len(series.paths)} image(s)): {series.study_uid}")
    done = _wait(engine, studies, timeout_s)
    engine.dispose()
    for study in done:
        _show(study, settings, say)
    return done


def _wait(engine: object, studies: list[DemoStudy], timeout_s: float) -> list[DemoStudy]:
    deadline = time.monotonic() + timeout_s
    finished: dict[str, str] = {}
    with tqdm(total=len(studies), desc="analysing", unit="study") as bar:
        while len(finished) < len(studies) and time.monotonic() < deadline:
            for study in studies:
                uid = study.series.study_uid
                if uid in finished:
                    continue
                timeline = study_timeline(engine, uid)  # type: ignore[arg-type]
                if timeline is not None and timeline.study.state in FINISHED:
                    finished[uid] = timeline.study.state
                    bar.update(1)
            time.sleep(0.5)
    out = []
    for study in studies:
        uid = study.series.study_uid
        findings = tuple(f for f in findings_of(engine, uid) if f.pipeline == study.pipeline.name)  # type: ignore[arg-type]
        out.append(
            DemoStudy(
                pipeline=study.pipeline,
                series=study.series,
                state=finished.get(uid, "not finished"),
                findings=findings,
            )
        )
    return out


def _show(study: DemoStudy, settings: Settings, say: Callable[[str], None]) -> None:
    uid = study.series.study_uid
    say("")
    say(f"{study.pipeline.name} (mode {study.pipeline.mode.value}) - study {uid}: {study.state}")
    if not study.findings:
        say(
            "  no findings"
            + ("" if study.state in FINISHED else " yet (the analysis did not finish in time)")
        )
        return
    say(f"  {'finding':<12} {'confidence':>10}  {'image':<20}  box (x0, y0, x1, y1 px)")
    for f in sorted(study.findings, key=lambda f: -f.confidence):
        box = "whole image" if f.box is None else ", ".join(f"{v:.0f}" for v in f.box)
        say(f"  {f.finding_meaning:<12} {f.confidence:>10.3f}  ...{f.image_uid[-17:]:<17}  {box}")
    key = _key_image(study.series, list(study.findings))
    if key is not None:
        picture = render(
            key[0],
            key[1],
            study.pipeline.output.display_window,
            settings.data_dir / "demo" / f"{study.pipeline.name}.png",
        )
        say(f"  key image with the AI's boxes: {picture}")
    say(
        f"  results (SR, GSPS{', SEG' if study.pipeline.output.segmentation else ''}): {settings.results_dir / uid}"
    )
    if settings.http.enabled:
        say(
            f"  findings: GET http://{settings.http.host}:{settings.http.port}/studies/{uid}/findings "
            "(a radiologist or qa token)"
        )
