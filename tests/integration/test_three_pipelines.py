"""The three reference pipelines run side by side on one Triton: a head CT, a chest CT and a chest radiograph
(MONOCHROME1) sent together each get their own pipeline's results; the chest CT reports each nodule once,
with its diameter and volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Lesion, Nodule, Opacity, write_chest_ct, write_cxr, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from gateway.results.content import ReportedFinding, read_measurement_report
from tests.support.geometry import pixel_to_patient
from tests.support.servers import dciodvfy_errors, storescu, wait_for

pytestmark = pytest.mark.integration

VOLUME, LONG_AXIS, NODULE, OPACITY = "118565006", "103339001", "27925004", "112001"
ENSEMBLES = ("ct_head_hyperdensity", "ct_chest_nodule", "cxr_opacity")


def _inference_counts(triton_url: str) -> dict[str, int]:
    client = grpcclient.InferenceServerClient(triton_url)
    try:
        return {
            m: int(client.get_inference_statistics(model_name=m).model_stats[0].inference_count)
            for m in ENSEMBLES
        }
    finally:
        client.close()


def _centre(points: tuple[tuple[float, ...], ...]) -> np.ndarray:
    return np.asarray(points[:-1], dtype=np.float64).mean(
        axis=0
    )  # closed polygon: last point repeats the first


def test_head_ct_chest_ct_and_radiograph_are_analysed_side_by_side(tmp_path: Path, triton: str) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 3\n[http]\nport = 0\n'
        f'[receiver]\nport = {port}\nallowed_calling_aes = ["STORESCU"]\n[triton]\nurl = "{triton}"\n'
    )
    settings = load_settings(config)  # the embedded pipelines: head CT, chest CT, chest radiograph
    assert [p.name for p in settings.pipelines] == ["ct_head_hyperdensity", "ct_chest_nodule", "cxr_opacity"]
    nodules = (
        Nodule(x_mm=-70.0, y_mm=-20.0, z_mm=22.0, diameter_mm=16.0, hu=30.0),
        Nodule(x_mm=75.0, y_mm=15.0, z_mm=35.0, diameter_mm=10.0, hu=30.0),
    )
    opacity = Opacity(x_mm=80.0, y_mm=-40.0, diameter_mm=20.0, density=0.16)
    head = write_head_ct(
        tmp_path / "head", slices=12, lesions=(Lesion(x=300, y=220, slice=6, radius_mm=8.0, hu=72.0),), seed=3
    )
    chest = write_chest_ct(tmp_path / "chest", slices=24, nodules=nodules, seed=11, noise_hu=15.0)
    cxr = write_cxr(tmp_path / "cxr", opacities=(opacity,), seed=5, monochrome1=True)
    before = _inference_counts(triton)
    gateway = Gateway(settings).start()
    try:
        paths = [*head.paths, *chest.paths, *cxr.paths]
        assert storescu(paths, port=port, calling_ae="STORESCU").returncode == 0
        audit = AuditLog(settings.audit_log)
        for study in (head, chest, cxr):
            wait_for(
                lambda uid=study.study_uid: [
                    e for e in audit.read() if e["event"] == "study_done" and e["study"] == uid
                ],
                timeout_s=180,
                what="study analysed",
            )
        after = _inference_counts(triton)
    finally:
        gateway.stop()
    assert all(after[m] > before[m] for m in ENSEMBLES), (before, after)  # one Triton served all three

    results = settings.data_dir / "results"

    def report(study_uid: str) -> tuple[Path, list]:
        [sr_path] = sorted((results / study_uid).glob("SR_*.dcm"))
        return sr_path, read_measurement_report(pydicom.dcmread(sr_path))

    sr_path, head_findings = report(head.study_uid)
    assert head_findings and {f.algorithm_name for f in head_findings} == {
        "AI Gateway Head CT Hyperdensity Reference"
    }

    sr_path, chest_findings = report(chest.study_uid)
    assert dciodvfy_errors(sr_path) == []
    assert {f.algorithm_name for f in chest_findings} == {"AI Gateway Chest CT Lung Nodule Reference"}
    assert {f.finding_type.value for f in chest_findings} == {NODULE}
    # Each nodule exactly once (in 3D, across the slices it spans), where it is, with its size.
    assert len(chest_findings) == len(nodules)
    headers = {
        uid: pydicom.dcmread(p, stop_before_pixels=True)
        for uid, p in zip(chest.sop_uids, chest.paths, strict=True)
    }

    def in_patient(f: ReportedFinding) -> np.ndarray:  # the outline's centre, in patient coordinates (mm)
        return pixel_to_patient(headers[str(f.region.sop_instance_uid)], tuple(_centre(f.region.points)))

    for nodule in nodules:
        [finding] = [
            f
            for f in chest_findings
            if np.hypot(*(in_patient(f)[:2] - (nodule.x_mm, nodule.y_mm))) <= nodule.diameter_mm / 2
        ]
        assert abs(in_patient(finding)[2] - nodule.z_mm) <= nodule.diameter_mm / 2
        assert finding.measurement(LONG_AXIS) == pytest.approx(nodule.diameter_mm, abs=3.0)
        assert finding.measurement(VOLUME) == pytest.approx(nodule.volume_mm3, rel=0.25)

    sr_path, cxr_findings = report(cxr.study_uid)
    assert dciodvfy_errors(sr_path) == []
    [finding] = cxr_findings
    assert finding.finding_type.value == OPACITY
    assert finding.algorithm_name == "AI Gateway Chest Radiograph Opacity Reference"
    # A radiograph has no frame of reference: the box is drawn on the image (SCOORD), in its pixels.
    assert finding.region.sop_instance_uid == cxr.sop_uids[0]
    assert finding.region.points[0] == finding.region.points[-1]  # a closed outline
    cx, cy = _centre(finding.region.points)[:2]
    pixel_mm, half = 0.25, 1536 / 2
    distance_mm = (
        np.hypot(cx - (half + opacity.x_mm / pixel_mm), cy - (half + opacity.y_mm / pixel_mm)) * pixel_mm
    )
    assert distance_mm <= 10.0
    [pr_path] = sorted((results / cxr.study_uid).glob("PR_*.dcm"))
    assert dciodvfy_errors(pr_path) == []
