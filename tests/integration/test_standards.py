"""Every result type on real components, checked by independent validators: dciodvfy, dcentvfy, PixelMed,
DCMTK (dsrdump, dcmpschk, dcmp2pgm), Orthanc, the FHIR model library and an HL7 parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message

from gateway.demo.phantoms import Lesion, write_head_ct
from tests.integration.conftest import Env
from tests.support.servers import (
    dciodvfy_errors,
    pixelmed_sr_validation,
    tool_output,
    wait_for,
)

pytestmark = pytest.mark.integration


def _send_through_orthanc(env: Env, paths: list[Path], study_uid: str) -> dict:
    env.orthanc.upload(paths)
    [orthanc_study] = env.orthanc.post(
        "/tools/find", json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    )
    env.orthanc.post(
        "/modalities/gateway/store", json.dumps({"Resources": [orthanc_study], "Synchronous": True})
    )
    return env.wait_study_done(study_uid)


def _result_files(env: Env, study_uid: str, prefix: str) -> list[Path]:
    return sorted((env.data_dir / "results" / study_uid).glob(f"{prefix}_*"))


def _pixelmed_ok(path: Path) -> None:
    out = pixelmed_sr_validation(path)
    assert "Found Root Template TID_1500" in out, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert errors == [], errors[:10]


def _pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    m = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert m, f"{path} is not a binary PGM"
    w, h = int(m.group(1)), int(m.group(2))
    return np.frombuffer(data[m.end() : m.end() + w * h], np.uint8).reshape(h, w)


def _wait_messages(env: Env, study_uid: str, kinds: set[str]) -> dict[str, str]:
    def found() -> dict[str, str] | None:
        by_kind = {}
        for text in env.mllp.received:
            if study_uid in text:
                by_kind[text.split("\r")[0].split("|")[8].split("^")[0]] = text
        return by_kind if kinds <= set(by_kind) else None

    return wait_for(found, timeout_s=30, what=f"HL7 {kinds} for {study_uid}")


def _wait_bundle(env: Env, study_uid: str) -> Bundle:
    def found() -> list[dict]:
        return [b for b in env.fhir.events if study_uid in json.dumps(b)]

    [raw] = wait_for(found, timeout_s=30, what=f"FHIR bundle for {study_uid}")
    return Bundle.model_validate(raw)


def test_positive_study_results_pass_every_validator(env: Env, tmp_path: Path) -> None:
    # 10 mm slices and a 6 mm lesion: the finding is on one image, so the GSPS also carries a bitmap overlay.
    lesion = Lesion(x=280.0, y=240.0, slice=6, radius_mm=6.0, hu=72.0)
    series = write_head_ct(tmp_path / "pos", slices=12, slice_mm=10.0, lesions=(lesion,), seed=21)
    done = _send_through_orthanc(env, list(series.paths), series.study_uid)
    assert done["stat"] is True
    [sr], [pr], [seg] = (_result_files(env, series.study_uid, p) for p in ("SR", "PR", "SEG"))
    sources = list(series.paths)

    # dciodvfy on every object, dcentvfy across the study (sources + results).
    for path in (sr, pr, seg):
        assert dciodvfy_errors(path) == [], path.name
    entities = tool_output("dcentvfy", *map(str, sources), str(sr), str(pr), str(seg))
    assert [
        line for line in (entities.stdout + entities.stderr).splitlines() if line.startswith("Error")
    ] == []

    # PixelMed: the TID 1500 root template is found and there are no errors.
    _pixelmed_ok(sr)

    # DCMTK: dsrdump parses the SR, dcmpschk passes the GSPS, dcmp2pgm renders with it.
    dump = tool_output("dsrdump", str(sr))
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
    assert "Hemorrhage" in dump.stdout and "Algorithm Version" in dump.stdout
    check = tool_output("dcmpschk", str(pr))
    assert check.returncode == 0 and "Test passed" in check.stdout + check.stderr
    gsps = pydicom.dcmread(pr)
    [annotated] = [
        r.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for r in s.ReferencedImageSequence
    ]
    image = series.paths[series.sop_uids.index(annotated)]
    render = tool_output(
        "dcmp2pgm", "-v", "-p", str(pr), str(image), str(tmp_path / "rendered.pgm"), cwd=tmp_path
    )
    assert render.returncode == 0, render.stderr
    log = render.stdout + render.stderr
    assert "Graphic Layer #1 [AI_FINDINGS]" in log and "Number of activated overlays: 1" in log
    assert re.search(r"graphic 1: points=5 type=polyline", log)
    overlay = _pgm(tmp_path / "ovl_0101.pgm")  # the overlay DCMTK activated on the AI layer, as rendered
    ys, xs = np.nonzero(overlay)
    [box] = [
        f
        for a in gsps.GraphicAnnotationSequence
        if a.GraphicLayer == "AI_FINDINGS"
        for f in a.GraphicObjectSequence
    ]
    corners = np.asarray(box.GraphicData, dtype=float).reshape(-1, 2)
    assert abs(xs.min() - corners[:, 0].min()) <= 1 and abs(xs.max() - corners[:, 0].max()) <= 1
    assert abs(ys.min() - corners[:, 1].min()) <= 1 and abs(ys.max() - corners[:, 1].max()) <= 1
    assert abs(xs.mean() - lesion.x) < 8 and abs(ys.mean() - lesion.y) < 8
    assert _pgm(tmp_path / "rendered.pgm").shape == overlay.shape

    # Orthanc holds SR, GSPS and SEG in the original study.
    modalities = wait_for(
        lambda: (
            (m := {s["MainDicomTags"].get("Modality") for s in env.orthanc.series_of_study(series.study_uid)})
            >= {"CT", "SR", "PR", "SEG"}
            and m
        ),
        timeout_s=30,
        what="SR, PR and SEG in Orthanc",
    )
    assert {"CT", "SR", "PR", "SEG"} <= modalities

    # SEG references the source images and marks the lesion.
    seg_ds = pydicom.dcmread(seg)
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in seg_ds.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert referenced <= set(series.sop_uids)
    assert seg_ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"

    # FHIR and HL7 reached their endpoints, validate and parse back.
    bundle = _wait_bundle(env, series.study_uid)
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert "DiagnosticReport" in kinds and kinds.count("Observation") == done["findings"]
    messages = _wait_messages(env, series.study_uid, {"ORU", "OMI"})
    oru = parse_message(messages["ORU"], find_groups=True)
    assert oru.validate()
    assert (
        parse_message(messages["OMI"], find_groups=True).omi_o23_order.omi_o23_timing.tq1.tq1_9.value == "S"
    )
    assert list((env.data_dir / "results" / series.study_uid).glob("FHIR_*.json"))


def test_negative_and_real_studies_get_valid_reports_too(env: Env, tmp_path: Path, real_data: Path) -> None:
    normal = write_head_ct(tmp_path / "neg", slices=8, seed=31)
    real = sorted((real_data / "ct-3slice").glob("0*.dcm"))
    real_uid = str(pydicom.dcmread(real[0], stop_before_pixels=True).StudyInstanceUID)
    _send_through_orthanc(env, list(normal.paths), normal.study_uid)
    _send_through_orthanc(env, real, real_uid)
    for study_uid in (normal.study_uid, real_uid):
        [sr] = _result_files(env, study_uid, "SR")
        assert dciodvfy_errors(sr) == []
        assert tool_output("dsrdump", str(sr)).returncode == 0
        for other in _result_files(env, study_uid, "PR") + _result_files(env, study_uid, "SEG"):
            assert dciodvfy_errors(other) == []
        bundle = _wait_bundle(env, study_uid)
        assert any(e.resource.get_resource_type() == "DiagnosticReport" for e in bundle.entry)
        assert (
            parse_message(_wait_messages(env, study_uid, {"ORU"})["ORU"], find_groups=True).msh.msh_9.to_er7()
            == "ORU^R01^ORU_R01"
        )
    assert (
        _result_files(env, normal.study_uid, "PR") == [] and _result_files(env, normal.study_uid, "SEG") == []
    )
    [negative_sr] = _result_files(env, normal.study_uid, "SR")
    _pixelmed_ok(negative_sr)
    assert not [t for t in env.mllp.received if normal.study_uid in t and "OMI^O23" in t]


def test_unreachable_fhir_and_hl7_endpoints_are_retried_reported_and_never_block(
    tmp_path: Path, triton: str
) -> None:
    from gateway.app import Gateway
    from gateway.config.settings import load_settings
    from gateway.inference.server import free_port
    from gateway.ops.audit import AuditLog
    from tests.support.servers import storescu

    port, dead = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n'
        f'[receiver]\nport = {port}\nallowed_calling_aes = ["STORESCU"]\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
        f'[fhir]\nurl = "http://127.0.0.1:{dead}/fhir"\ntimeout_s = 1.0\nattempts = 2\n'
        f'[hl7]\nendpoint = "127.0.0.1:{dead}"\ntimeout_s = 1.0\nattempts = 2\n'
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    series = write_head_ct(tmp_path / "study", slices=8, rows=256, cols=256, seed=41)
    gateway = Gateway(settings).start()
    try:
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        done = wait_for(
            lambda: [e for e in audit.read() if e["event"] == "study_done"], timeout_s=60, what="study done"
        )
        assert list((tmp_path / "data" / "results" / series.study_uid).glob("SR_*.dcm"))
        failures = wait_for(
            lambda: (
                (f := {e["event"] for e in audit.read() if e["event"] in ("fhir_failed", "hl7_failed")})
                == {"fhir_failed", "hl7_failed"}
                and f
            ),
            timeout_s=30,
            what="FHIR and HL7 failures in the audit trail",
        )
        assert failures == {"fhir_failed", "hl7_failed"}
        reasons = [e["reason"] for e in audit.read() if e["event"] in ("fhir_failed", "hl7_failed")]
        assert all("after 2 tries" in r for r in reasons)
        assert done[0]["study"] == series.study_uid
        # The study completed (DICOM results stored) before the report retries gave up: they never blocked it.
        events = [e["event"] for e in audit.read()]
        assert events.index("study_done") < min(events.index("fhir_failed"), events.index("hl7_failed"))
        assert list((tmp_path / "data" / "results" / series.study_uid).glob("FHIR_*.json"))
        assert list((tmp_path / "data" / "results" / series.study_uid).glob("HL7_ORU_*.hl7"))
    finally:
        gateway.stop()


def test_radiograph_srs_with_one_two_or_no_finding_pass_pixelmed_and_dciodvfy(tmp_path: Path) -> None:
    """The study-level assessment is the report's Qualitative Evaluations, not a measurement group without a
    region. As a group it made PixelMed (which checks every group of the container against TID 1410 when
    exactly one group holds a 2D Image Region) report two errors on one-finding radiograph SRs, and OHIF's SR
    viewport fail; every group now has its region."""
    from gateway.demo.phantoms import write_cxr
    from gateway.results.sr import build_sr
    from preprocessing.series import load_series
    from tests.support.analysis import make_analysis, make_finding

    loaded = load_series(write_cxr(tmp_path / "cxr", size=512, seed=1).paths)
    for count in (0, 1, 2):
        findings = tuple(make_finding(loaded, 0, long_axis_mm=10.0 + i) for i in range(count))
        path = tmp_path / f"sr_{count}.dcm"
        build_sr(make_analysis(loaded, findings, stat=False)).save_as(path)
        assert dciodvfy_errors(path) == []
        out = pixelmed_sr_validation(path)
        assert "Found Root Template TID_1500" in out
        assert [line for line in out.splitlines() if line.startswith("Error")] == [], count
