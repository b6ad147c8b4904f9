"""Faults and safety on real components (gateway, Triton, DCMTK storescu, Orthanc): one output never sinks the
others, a full disk never kills a worker, and work resumes by itself."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ingest.receiver import StoreSCP
from gateway.ingest.spool import Spool
from gateway.ops.audit import AuditLog
from tests.integration.conftest import Env
from tests.support.analysis import content_items
from tests.support.servers import Orthanc, dciodvfy_errors, http_json, storescu, wait_for

pytestmark = pytest.mark.integration


def test_duplicate_slice_position_keeps_sr_gsps_seg_and_the_stat_flag(env: Env, tmp_path: Path) -> None:
    """A series with one slice sent twice under two SOP Instance UIDs gives the same STAT result as without it."""
    lesion = Lesion(x=130.0, y=120.0, slice=6, radius_mm=8.0, hu=70.0)
    series = write_head_ct(
        tmp_path / "ct", slices=12, rows=256, cols=256, pixel_mm=1.0, lesions=(lesion,), seed=5
    )
    ds = pydicom.dcmread(series.paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    duplicate = tmp_path / "duplicate.dcm"
    ds.save_as(duplicate)
    assert storescu([*series.paths, duplicate], port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done = env.wait_study_done(series.study_uid)
    assert done["stat"] is True and done["findings"] >= 1
    [analysed] = env.events("series_analysed", series.study_uid)
    assert analysed["slices"] == 12 and analysed["output_failures"] == []
    for modality in ("SR", "PR", "SEG"):
        assert len(env.results(series.study_uid, modality)) == 1, f"{modality} missing"
    wait_for(
        lambda: [e for e in env.webhook.events if e["study_instance_uid"] == series.study_uid],
        timeout_s=10,
        what="STAT webhook",
    )


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root (CI runs `make test` as root)")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 64)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write until the file system is full, as another program on the same disk would."""
    with open(path, "wb", buffering=0) as out:
        for size in (2**20, 4096):  # then the last few KiB
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_disk_filled_mid_run_loses_no_worker_reports_degraded_and_resumes(
    small_disk: Path, triton: str
) -> None:
    port = free_port()
    config = small_disk.parent / "gateway.toml"
    config.write_text(
        f'data_dir = "{small_disk / "data"}"\nquiet_period_s = 1.0\nworkers = 2\n'
        f"[receiver]\nport = {port}\nmin_free_disk_mb = 4\n[http]\nport = 0\n"
        f'[triton]\nurl = "{triton}"\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    settings = load_settings(config)
    studies = [
        write_head_ct(small_disk.parent / f"s{i}", slices=8, rows=256, cols=256, seed=80 + i)
        for i in range(4)
    ]
    gateway = Gateway(settings).start()
    try:
        assert gateway.api is not None
        base = f"http://127.0.0.1:{gateway.api.port}"
        configured = http_json(f"{base}/health")[1]["workers"]["configured"]
        for study in studies:  # acknowledged while there is space
            assert storescu(list(study.paths), port=port, calling_ae="STORESCU").returncode == 0
        filler = small_disk / "filler.bin"
        filled_at = time.monotonic()
        _fill(filler)
        status, health = wait_for(
            lambda: (r := http_json(f"{base}/health"))[0] == 503 and r, timeout_s=5, what="degraded health"
        )
        degraded_s = time.monotonic() - filled_at
        # The analyses run into the full disk: each is deferred, no worker dies.
        wait_for(
            lambda: _metric(http_json(f"{base}/metrics")[1], "gateway_resource_errors_total") >= 2,
            timeout_s=60,
            what="analyses deferred by the full disk",
        )
        status, health = http_json(f"{base}/health")
        assert status == 503
        assert health["workers"] == {"alive": configured, "configured": configured, "restarts": 0}
        assert any("No space left on device" in reason for reason in health["reasons"]), health["reasons"]
        assert not [p for p in small_disk.rglob(".*.tmp")], "a temporary file was left behind"
        filler.unlink()
        freed_at = time.monotonic()
        audit = AuditLog(settings.audit_log)
        wait_for(
            lambda: (
                {s.study_uid for s in studies}
                <= {e["study"] for e in audit.read() if e["event"] == "study_done"}
            ),
            timeout_s=90,
            what="every study to be finished once space returned",
        )
        resumed_s = time.monotonic() - freed_at
        wait_for(lambda: http_json(f"{base}/health")[0] == 200, timeout_s=15, what="health back to ok")
        for study in studies:
            assert len(list((settings.results_dir / study.study_uid).glob("SR_*.dcm"))) == 1
        assert not [p for p in small_disk.rglob(".*.tmp")]
        print(
            f"\ndisk full: degraded after {degraded_s:.2f}s, {configured} of {configured} workers alive, "
            f"{len(studies)} studies finished {resumed_s:.1f}s after space returned"
        )
    finally:
        gateway.stop()


def _send_raw_command(port: int, command: Dataset, *, with_dataset: bool) -> tuple[bool, float]:
    """Associate, send one hand-built command set (and a tiny data set), and time until the gateway ends it."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    context = assoc.accepted_contexts[0].context_id
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, command)
    pdus = [(context, b"\x03" + encoded.getvalue())]
    if with_dataset:
        pdus.append((context, b"\x02" + b"\x08\x00\x16\x00\x00\x00\x00\x00"))
    started = time.monotonic()
    for pdv in pdus:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [list(pdv)]
        assoc.dul.send_pdu(primitive)
    while assoc.is_alive() and not assoc.is_aborted and time.monotonic() - started < 90:
        time.sleep(0.02)
    ended = time.monotonic() - started
    aborted = assoc.is_aborted
    assoc.abort()
    return aborted, ended


def test_malformed_c_store_command_is_aborted_at_once(tmp_path: Path) -> None:
    """A C-STORE-RQ without its Affected SOP Instance UID ends the association at once, not after the network
    timeout; the receiver keeps serving well-formed senders."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {port}\nnetwork_timeout_s = 60\n'
    )
    settings = load_settings(config)
    stored: list[object] = []
    scp = StoreSCP(
        settings.receiver, Spool(settings.spool_dir), stored.append, allowed_calling_aes=frozenset()
    )
    scp.start()
    try:
        command = Dataset()
        command.CommandGroupLength = 0
        command.CommandField = 0x0001  # C-STORE-RQ
        command.AffectedSOPClassUID = CTImageStorage
        command.MessageID = 1
        command.Priority = 0
        command.CommandDataSetType = 0x0000
        aborted, seconds = _send_raw_command(port, command, with_dataset=True)
        assert aborted, "the gateway must abort, not release or wait"
        assert seconds < 5.0, f"association held {seconds:.1f}s (network timeout 60 s)"
        series = write_head_ct(tmp_path / "ok", slices=2, rows=64, cols=64)
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        assert len(stored) == 2
        print(f"\nmalformed C-STORE-RQ: aborted after {seconds * 1000:.0f} ms")
    finally:
        scp.stop()


def _send_then_abort(paths: list[Path], port: int) -> None:
    """A sender that stores some instances and then aborts the association (a crash, a cancelled send)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    for path in paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.abort()


def test_aborted_association_holds_the_study_and_its_late_result_says_it_may_be_incomplete(
    tmp_path: Path, triton: str
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nincomplete_guard_s = 10.0\n'
        f'[receiver]\nport = {port}\n[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    settings = load_settings(config)
    audit = AuditLog(settings.audit_log)
    resent = write_head_ct(tmp_path / "a", slices=8, rows=256, cols=256, seed=21)
    abandoned = write_head_ct(tmp_path / "b", slices=8, rows=256, cols=256, seed=22)

    def done(study_uid: str) -> list[dict]:
        return [e for e in audit.read() if e["event"] == "study_done" and e["study"] == study_uid]

    gateway = Gateway(settings).start()
    try:
        aborted_at = time.monotonic()
        _send_then_abort(list(resent.paths[:4]), port)
        _send_then_abort(list(abandoned.paths[:4]), port)
        time.sleep(4.0)  # well past the 1 s quiet period
        assert not done(resent.study_uid) and not done(abandoned.study_uid), "a partial study was analysed"
        # The sender retries in a clean association: the study is analysed whole after the normal quiet period.
        assert storescu(list(resent.paths), port=port, calling_ae="STORESCU").returncode == 0
        [whole] = wait_for(lambda: done(resent.study_uid), timeout_s=60, what="the re-sent study")
        assert whole["instances"] == 8 and whole["possibly_incomplete"] == ""
        [sr] = [pydicom.dcmread(p) for p in (settings.results_dir / resent.study_uid).glob("SR_*.dcm")]
        assert sr.CompletionFlag == "COMPLETE"
        # The abandoned study is analysed after the guard time, and says so.
        [partial] = wait_for(lambda: done(abandoned.study_uid), timeout_s=60, what="the abandoned study")
        waited = time.monotonic() - aborted_at
        assert waited >= 10.0
        assert partial["instances"] == 4 and partial["possibly_incomplete"] == "association aborted"
        [sr] = [pydicom.dcmread(p) for p in (settings.results_dir / abandoned.study_uid).glob("SR_*.dcm")]
        assert sr.CompletionFlag == "PARTIAL" and "may be incomplete" in sr.SeriesDescription
        print(
            f"\naborted association: partial study held {waited:.1f}s (guard 10 s), re-sent study analysed whole"
        )
    finally:
        gateway.stop()


def _referenced(ko: pydicom.Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in ko.ContentSequence
        if "ReferencedSOPSequence" in item
    }


def test_superseded_results_are_withdrawn_by_a_rejection_note(env: Env, tmp_path: Path) -> None:
    """Late instances give the series a new SR, GSPS and SEG; the old three are withdrawn in the PACS by an IHE
    IOCM rejection note (Key Object Selection, "Rejected for Quality Reasons") that passes dciodvfy."""
    lesion = Lesion(x=130.0, y=120.0, slice=5, radius_mm=8.0, hu=70.0)
    series = write_head_ct(
        tmp_path / "ct", slices=10, rows=256, cols=256, pixel_mm=1.0, lesions=(lesion,), seed=9
    )
    assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    env.wait_study_done(series.study_uid)
    [first] = env.events("series_analysed", series.study_uid)
    old = set(first["results"])
    assert len(old) == 3, "SR, GSPS and SEG of the first analysis"
    late = pydicom.dcmread(series.paths[-1])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.ImagePositionPatient = [*late.ImagePositionPatient[:2], float(late.ImagePositionPatient[2]) + 5.0]
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    assert storescu([late_path], port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    wait_for(lambda: len(env.events("study_done", series.study_uid)) == 2, timeout_s=60, what="re-analysis")
    second = env.events("series_analysed", series.study_uid)[1]
    assert set(second["withdrawn"]) == old and old.isdisjoint(second["results"])
    [ko] = env.results(series.study_uid, "KO")
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert _referenced(ko) == old
    [ko_path] = (env.data_dir / "results" / series.study_uid).glob("KO_*.dcm")
    assert dciodvfy_errors(ko_path) == []

    def rejection_in_pacs() -> list[str]:
        return [
            instance
            for s in env.orthanc.series_of_study(series.study_uid)
            if s["MainDicomTags"].get("Modality") == "KO"
            for instance in s["Instances"]
        ]

    [in_pacs] = wait_for(rejection_in_pacs, timeout_s=60, what="the rejection note in Orthanc")
    stored = pydicom.dcmread(BytesIO(env.orthanc.get_bytes(f"/instances/{in_pacs}/file")))
    assert _referenced(stored) == old


def test_a_series_that_cannot_be_analysed_gets_a_failure_sr_at_the_destination(
    env: Env, tmp_path: Path
) -> None:
    """Routed but not analysable (here: one series mixing two image sizes): the PACS receives an SR that says the
    AI failed and why - never silence that reads as "nothing found" - the audit and metrics say so per reason,
    and the failure alert fires."""
    big = write_head_ct(tmp_path / "big", slices=6, rows=256, cols=256, seed=31)
    small = write_head_ct(tmp_path / "small", slices=2, rows=128, cols=128, seed=32)
    mixed = list(big.paths)
    for index, path in enumerate(small.paths):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = big.study_uid, big.series_uid
        out = tmp_path / f"mixed_{index}.dcm"
        ds.save_as(out)
        mixed.append(out)
    assert storescu(mixed, port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done = env.wait_study_done(big.study_uid)
    assert done["failed"] == 1 and done["findings"] == 0 and done["stat"] is False
    [failed] = env.events("series_failed", big.study_uid)
    assert failed["reason_kind"] == "DecodeError" and "mixes image sizes" in failed["reason"]
    [sr_uid] = failed["results"]
    [sr] = env.results(big.study_uid, "SR")
    assert sr.SOPInstanceUID == sr_uid and "FAILED" in sr.SeriesDescription
    items = list(content_items(sr))
    summary = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111017"
    ]
    assert summary == ["111245"], "CAD summary: no algorithms succeeded"
    comments = [
        i.TextValue
        for i in items
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert comments and "mixes image sizes" in comments[0]
    measured = [
        i
        for i in items
        if i.ValueType in ("SCOORD", "SCOORD3D")
        or (i.ValueType == "NUM" and i.RelationshipType == "CONTAINS")
    ]
    assert not measured, "no findings, no score implied"
    [path] = (env.data_dir / "results" / big.study_uid).glob("SR_*.dcm")
    assert dciodvfy_errors(path) == []

    def sr_in_pacs() -> list[str]:
        return [
            i
            for s in env.orthanc.series_of_study(big.study_uid)
            if s["MainDicomTags"].get("Modality") == "SR"
            for i in s["Instances"]
        ]

    wait_for(sr_in_pacs, timeout_s=60, what="the failure SR in Orthanc")
    [alert] = wait_for(
        lambda: [e for e in env.alerts.events if e["study_instance_uid"] == big.study_uid],
        timeout_s=10,
        what="alert",
    )
    assert alert["event"] == "analysis_failed" and alert["sr_sop_instance_uid"] == sr_uid
    assert env.gateway.api is not None
    metrics = http_json(f"http://127.0.0.1:{env.gateway.api.port}/metrics")[1]
    assert 'gateway_analysis_failures_total{pipeline="ct_hyperdensity",reason="DecodeError"} 1.0' in metrics


def test_deidentified_headers_that_break_their_vr_still_get_every_result(env: Env, tmp_path: Path) -> None:
    """Hash strings where dates belong and an accession number longer than SH allows (what de-identification
    tools write): the study still gets SR, GSPS and SEG in the PACS, each dciodvfy-clean, the repairs counted."""
    digest = "9f2c" * 14  # 56 characters, as de-identified public collections carry
    lesion = Lesion(x=130.0, y=120.0, slice=4, radius_mm=8.0, hu=70.0)
    series = write_head_ct(
        tmp_path / "ct", slices=8, rows=256, cols=256, pixel_mm=1.0, lesions=(lesion,), seed=41
    )
    paths = []
    for index, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = ds.StudyDate = digest
        ds.AccessionNumber = digest
        ds.BodyPartExamined = "partialbody"
        out = tmp_path / f"deid_{index}.dcm"
        ds.save_as(out)
        paths.append(out)
    assert storescu(paths, port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done = env.wait_study_done(series.study_uid)
    assert done["failed"] == 0 and done["findings"] >= 1
    [analysed] = env.events("series_analysed", series.study_uid)
    assert analysed["output_failures"] == []
    assert "AccessionNumber: dropped" in analysed["header_repairs"]
    for modality in ("SR", "PR", "SEG"):
        [path] = (env.data_dir / "results" / series.study_uid).glob(f"{modality}_*.dcm")
        assert dciodvfy_errors(path) == [], modality
        assert digest not in str(pydicom.dcmread(path, stop_before_pixels=True).get("AccessionNumber", ""))
    wait_for(
        lambda: (
            len(
                [
                    s
                    for s in env.orthanc.series_of_study(series.study_uid)
                    if s["MainDicomTags"].get("Modality") in ("SR", "PR", "SEG")
                ]
            )
            == 3
        ),
        timeout_s=60,
        what="SR, GSPS and SEG in Orthanc",
    )
    assert env.gateway.api is not None
    metrics = http_json(f"http://127.0.0.1:{env.gateway.api.port}/metrics")[1]
    assert 'gateway_header_repairs_total{action="dropped",attribute="AccessionNumber"} 1.0' in metrics


def test_running_gateway_purges_delivered_studies_and_never_undelivered_ones(
    tmp_path: Path, triton: str
) -> None:
    """Retention in the running gateway: with a free-space target no disk can meet, every analysed and delivered
    study is purged at the next interval, oldest first; a study whose delivery is still pending stays."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    port, dead_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n'
        f"[receiver]\nport = {port}\n[http]\nport = 0\n"
        f'[triton]\nurl = "{triton}"\n[retention]\nmin_free_disk_mb = 100000000\ninterval_s = 2.0\n'
        "[delivery]\nretry_base_s = 30.0\n"
        f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f'[[peers]]\nae_title = "OTHER"\nhost = "127.0.0.1"\nport = {dead_port}\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    settings = load_settings(config)
    delivered = write_head_ct(tmp_path / "a", slices=4, rows=128, cols=128, seed=51)
    undelivered = write_head_ct(tmp_path / "b", slices=4, rows=128, cols=128, seed=52)
    audit = AuditLog(settings.audit_log)
    gateway = Gateway(settings).start()
    try:
        assert storescu(list(delivered.paths), port=port, calling_ae="STORESCU").returncode == 0
        assert (
            storescu(list(undelivered.paths), port=port, calling_ae="OTHER").returncode == 0
        )  # its PACS is down
        # Both studies are analysed (the second one's SR waits for its PACS) before purging is judged: the
        # second study must still be there after purge passes that ran while it was analysed and undelivered.
        wait_for(
            lambda: list((settings.results_dir / undelivered.study_uid).glob("SR_*.dcm")),
            timeout_s=90,
            what="the undelivered study's SR to be stored",
        )
        wait_for(
            lambda: (
                any(e["event"] == "purge" for e in audit.read())
                and not (settings.spool_dir / delivered.study_uid).exists()
            ),
            timeout_s=90,
            what="the delivered study to be purged",
        )
        assert not (settings.results_dir / delivered.study_uid).exists()
        time.sleep(3 * settings.retention.interval_s)  # a few more purge passes over the undelivered study
        assert (settings.spool_dir / undelivered.study_uid).is_dir(), "undelivered work is never purged"
        assert list((settings.results_dir / undelivered.study_uid).glob("SR_*.dcm"))
        assert _sr_in(orthanc, delivered.study_uid), "the purged study's results had reached the PACS"
        assert gateway.api is not None
        metrics = http_json(f"http://127.0.0.1:{gateway.api.port}/metrics")[1]
        assert 'gateway_purged_total{kind="spool"}' in metrics
        _, health = http_json(f"http://127.0.0.1:{gateway.api.port}/health")
        assert health["disk"]["free_bytes"] > 0 and "hours_until_watermark" in health["disk"]
    finally:
        gateway.stop()
        orthanc.stop()


def _sr_in(orthanc: Orthanc, study_uid: str) -> bool:
    return any(s["MainDicomTags"].get("Modality") == "SR" for s in orthanc.series_of_study(study_uid))
