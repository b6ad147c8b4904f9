"""The whole flow on real components: Orthanc / DCMTK storescu -> gateway (pynetdicom) -> Triton (from the
nvidia-pytriton wheel) -> SR + GSPS -> Orthanc, STAT webhook, validated by dciodvfy."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient

from gateway.app import Gateway
from gateway.config.settings import default_model_repository, load_settings
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.registry import model_fingerprint
from gateway.inference.server import free_port
from gateway.results.content import read_measurement_report
from tests.integration.conftest import Env
from tests.support.servers import dciodvfy_errors, storescu, wait_for

pytestmark = pytest.mark.integration


def _content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _scoords(sr: pydicom.Dataset) -> list[tuple[str, np.ndarray]]:
    out = []
    for item in _content_items(sr):
        if item.ValueType == "SCOORD":
            ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            out.append((str(ref), np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)))
    return out


def _stat_flag(sr: pydicom.Dataset) -> str:
    study_level = [  # the report's Qualitative Evaluations
        i
        for i in sr.ContentSequence
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    values = [
        i.ConceptCodeSequence[0].CodeMeaning
        for group in study_level
        for i in _content_items(group)
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "STAT"
    ]
    return values[0]


def test_real_ct_sent_by_orthanc_comes_back_as_sr_and_gsps_in_the_same_study(
    env: Env, real_data: Path
) -> None:
    files = sorted((real_data / "ct-3slice").glob("0*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    env.orthanc.upload(files)
    [orthanc_study] = env.orthanc.post(
        "/tools/find", f'{{"Level": "Study", "Query": {{"StudyInstanceUID": "{study_uid}"}}}}'
    )
    started = time.monotonic()
    env.orthanc.post(
        "/modalities/gateway/store", f'{{"Resources": ["{orthanc_study}"], "Synchronous": true}}'
    )
    sent = time.monotonic()

    def result_series() -> list[dict]:
        series = env.orthanc.series_of_study(study_uid)
        return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]

    wait_for(result_series, timeout_s=120, what="the SR in Orthanc")
    elapsed = time.monotonic() - sent
    done = env.wait_study_done(study_uid)
    # One delivery job carries SR, GSPS and SEG over one association: wait until all of it is stored.
    wait_for(lambda: env.events("results_delivered", study_uid), timeout_s=60, what="the delivery to finish")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in env.orthanc.series_of_study(study_uid))
    [sr] = env.results(study_uid, "SR")
    [analysed] = env.events("series_analysed", study_uid)
    assert analysed["slices"] == 3 and analysed["slice_order"] == "geometry"
    # Traceability: the result names the model's content hash, also inside the SR's algorithm parameters.
    fingerprint = model_fingerprint(default_model_repository(), "ct_head_hyperdensity")
    assert analysed["model_sha256"] == fingerprint
    parameters = [
        i.TextValue for i in _content_items(sr) if i.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert f"model_sha256={fingerprint}" in parameters
    assert analysed["model_version"] == "1" and analysed["destination"].startswith("ORTHANC@")
    # The original CT series plus the results, all under the same study.
    assert modalities.count("CT") == 1 and "SR" in modalities
    if analysed["findings"]:
        assert "PR" in modalities
        for path in (env.data_dir / "results" / study_uid).glob("PR_*.dcm"):
            assert dciodvfy_errors(path) == []
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    for path in (env.data_dir / "results" / study_uid).glob("SR_*.dcm"):
        assert dciodvfy_errors(path) == []
    print(
        f"\n3-slice real CT: store-to-gateway {sent - started:.2f}s, last instance -> SR in Orthanc {elapsed:.2f}s;"
        f" stages { ({k: v for k, v in done.items() if k.endswith('_ms')}) }"
    )


def test_synthetic_lesion_is_found_where_it_is_and_flagged_stat(env: Env, tmp_path: Path) -> None:
    lesion = Lesion(x=300.0, y=220.0, slice=12, radius_mm=8.0, hu=70.0)
    series = write_head_ct(tmp_path / "lesion", slices=24, lesions=(lesion,), seed=3)
    result = storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU")
    assert result.returncode == 0, result.stderr
    done = env.wait_study_done(series.study_uid)
    assert done["stat"] is True and done["findings"] >= 1
    [sr] = env.results(series.study_uid, "SR")
    findings = read_measurement_report(sr)
    assert findings
    lesion_slices = {series.sop_uids[k] for k in (lesion.slice - 1, lesion.slice, lesion.slice + 1)}
    tolerance_px = 6.0  # 3 mm at 0.5 mm pixels
    for finding in findings:
        assert finding.source_sop_instance_uid in lesion_slices, (
            "every finding must be on a slice the lesion crosses"
        )
        # an outline on the image it is on (image-referenced SCOORD, what viewers draw)
        assert finding.region is not None and not finding.region.is_3d
        assert finding.region.sop_instance_uid == finding.source_sop_instance_uid
        corners = [p[:2] for p in finding.region.points[:4]]
        center = np.mean(corners, axis=0)
        assert abs(center[0] - lesion.x) <= tolerance_px and abs(center[1] - lesion.y) <= tolerance_px, center
        assert finding.finding_type.value == "50960005" and finding.finding_site is not None
        assert finding.finding_site.meaning == "Head"
        assert 60.0 <= (finding.measurement("373098007") or 0.0) <= 80.0  # mean HU of the lesion
    assert series.sop_uids[lesion.slice] in {f.source_sop_instance_uid for f in findings}
    assert _stat_flag(sr) == "Yes"
    [gsps] = env.results(series.study_uid, "PR")
    assert gsps.GraphicLayerSequence[0].GraphicLayer == "AI_FINDINGS"
    wait_for(
        lambda: [e for e in env.webhook.events if e["study_instance_uid"] == series.study_uid],
        timeout_s=10,
        what="STAT webhook",
    )
    [event] = [e for e in env.webhook.events if e["study_instance_uid"] == series.study_uid]
    assert (
        event["event"] == "stat"
        and event["model_version"] == "1"
        and event["sr_sop_instance_uid"] == sr.SOPInstanceUID
    )
    assert "PatientName" not in event and "PHANTOM" not in str(event)
    wait_for(
        lambda: (
            {"SR", "PR"}
            <= {s["MainDicomTags"].get("Modality") for s in env.orthanc.series_of_study(series.study_uid)}
        ),
        timeout_s=30,
        what="SR and GSPS in Orthanc",
    )
    print(f"\n24-slice synthetic lesion: stages { ({k: v for k, v in done.items() if k.endswith('_ms')}) }")


def test_normal_series_comes_back_negative(env: Env, tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "normal", slices=16, seed=11)
    assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done = env.wait_study_done(series.study_uid)
    assert done["findings"] == 0 and done["stat"] is False
    [sr] = env.results(series.study_uid, "SR")
    assert _scoords(sr) == [] and read_measurement_report(sr) == []
    assert _stat_flag(sr) == "No"
    summary = [
        i.ConceptCodeSequence[0].CodeValue
        for i in _content_items(sr)
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111017"
    ]
    assert summary == ["111241"]
    assert env.results(series.study_uid, "PR") == []
    assert not [e for e in env.webhook.events if e["study_instance_uid"] == series.study_uid]


def _inference_count(triton_url: str) -> int:
    client = grpcclient.InferenceServerClient(triton_url)
    try:
        stats = client.get_inference_statistics(model_name="ct_head_hyperdensity")
        return int(stats.model_stats[0].inference_count)
    finally:
        client.close()


def test_unsupported_and_undecodable_studies_are_kept_but_not_inferred(
    env: Env, tmp_path: Path, real_data: Path
) -> None:
    before = _inference_count(env.triton_url)
    mr = real_data / "transfer-syntaxes" / "mr_1.dcm"
    broken = write_head_ct(tmp_path / "broken", slices=2, rows=64, cols=64)
    for path in broken.paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]
        ds.save_as(path)
    good = write_head_ct(tmp_path / "good", slices=8, seed=5)
    result = storescu([mr, *broken.paths, *good.paths], port=env.gateway.port, calling_ae="STORESCU")
    assert result.returncode == 0, result.stderr  # the PACS is never blocked by the AI
    mr_study = str(pydicom.dcmread(mr, stop_before_pixels=True).StudyInstanceUID)
    env.wait_study_done(mr_study)
    env.wait_study_done(broken.study_uid)
    [skipped] = env.events("series_skipped", mr_study)
    assert "no pipeline for modality MR" in skipped["reason"]
    [failed] = env.events("series_failed", broken.study_uid)
    assert "could not be decoded" in failed["reason"]
    # Skipped (no pipeline) and failed are different states: a skipped series gets nothing, a routed series that
    # cannot be analysed gets a failure SR (issue 10: "the AI failed" must not read as "nothing found").
    assert env.results(mr_study, "SR") == []
    [failure_sr] = env.results(broken.study_uid, "SR")
    assert "FAILED" in failure_sr.SeriesDescription and failed["results"] == [failure_sr.SOPInstanceUID]
    assert len(list((env.data_dir / "spool" / broken.study_uid).glob("*/*.dcm"))) == 2  # kept
    # The good study sent in the same association is unaffected, and is the only one that reached Triton.
    env.wait_study_done(good.study_uid)
    assert len(env.results(good.study_uid, "SR")) == 1
    assert _inference_count(env.triton_url) == before + 1


def test_unknown_calling_ae_is_rejected_at_association(env: Env, tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "x", slices=1, rows=32, cols=32)
    result = storescu(list(series.paths), port=env.gateway.port, calling_ae="INTRUDER")
    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()
    assert not (env.data_dir / "spool" / series.study_uid).exists()


def test_cli_echo_and_send_talk_to_the_running_gateway(env: Env, tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "cli", slices=3, rows=64, cols=64)
    target = f"AI_GATEWAY@127.0.0.1:{env.gateway.port}"
    cli = [sys.executable, "-m", "gateway"]
    echo = subprocess.run(
        [*cli, "echo", target, "--calling-ae", "ORTHANC"], capture_output=True, text=True, timeout=60
    )
    assert echo.returncode == 0 and "success" in echo.stdout
    send = subprocess.run(
        [*cli, "send", str(tmp_path / "cli"), "--to", target, "--calling-ae", "ORTHANC"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert send.returncode == 0, send.stderr
    assert "sent 3 of 3" in send.stdout
    assert "3/3" in send.stderr  # the progress bar
    env.wait_study_done(series.study_uid)
    refused = subprocess.run(
        [*cli, "echo", target, "--calling-ae", "NOBODY"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "FAILED" in refused.stdout


def test_gateway_starts_its_own_triton_and_stops_it(tmp_path: Path, model_repository: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\n[http]\nport = 0\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        server = gateway.triton_server
        assert server is not None and server.process is not None
        assert gateway.triton_url.startswith("127.0.0.1:")
        client = grpcclient.InferenceServerClient(gateway.triton_url)
        assert client.is_model_ready("ct_head_hyperdensity")
        client.close()
        process = server.process
    finally:
        gateway.stop()
    assert process.poll() is not None, "tritonserver must exit when the gateway stops"
    assert gateway.triton_server is None
