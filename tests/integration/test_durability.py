"""Durability: an acknowledged instance is never lost, a crash (SIGKILL) mid-flight is recovered, every study
finishes exactly once, and re-sends / late instances follow the documented policy."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.integration.conftest import Env
from tests.support.servers import Orthanc, storescu, triton_paused, wait_for

pytestmark = pytest.mark.integration


def _sr_instances_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    uids = []
    for series in orthanc.series_of_study(study_uid):
        if series["MainDicomTags"].get("Modality") == "SR":
            for instance in series["Instances"]:
                uids.append(orthanc.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"])
    return uids


def _done_count(env: Env, study_uid: str) -> int:
    return len(env.events("study_done", study_uid))


def test_resend_is_idempotent_and_late_instances_supersede_the_sr(env: Env, tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "s", slices=10, lesions=(Lesion(x=260, y=250, slice=5),), seed=51)
    assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    wait_for(lambda: _done_count(env, series.study_uid) == 1, timeout_s=60, what="first analysis")
    [first] = env.events("series_analysed", series.study_uid)

    # Policy 1: the same study sent again is analysed again and gives the same result objects (same UIDs),
    # so the PACS keeps one copy - never a silent duplicate.
    assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    wait_for(lambda: _done_count(env, series.study_uid) == 2, timeout_s=60, what="re-send analysis")
    second = env.events("series_analysed", series.study_uid)[1]
    assert second["results"] == first["results"] and second["supersedes"] == []
    wait_for(
        lambda: len(_sr_instances_in_orthanc(env.orthanc, series.study_uid)) >= 1,
        timeout_s=30,
        what="SR in Orthanc",
    )
    assert _sr_instances_in_orthanc(env.orthanc, series.study_uid) == [first["results"][0]]

    # Policy 2: a late instance re-opens the study; the whole series is analysed again and the new SR
    # supersedes the old one (Predecessor Documents Sequence).
    late = pydicom.dcmread(series.paths[-1])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.ImagePositionPatient = [*late.ImagePositionPatient[:2], float(late.ImagePositionPatient[2]) + 5.0]
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    assert storescu([late_path], port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    wait_for(lambda: _done_count(env, series.study_uid) == 3, timeout_s=60, what="late-instance analysis")
    third = env.events("series_analysed", series.study_uid)[2]
    assert third["slices"] == 11
    assert third["results"][0] != first["results"][0]
    assert third["supersedes"] == [first["results"][0]]
    new_sr = next(
        ds for ds in env.results(series.study_uid, "SR") if ds.SOPInstanceUID == third["results"][0]
    )
    predecessors = [
        r.ReferencedSOPInstanceUID
        for s in new_sr.PredecessorDocumentsSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    ]
    assert predecessors == [first["results"][0]]


def test_the_late_part_of_a_study_still_being_analysed_is_analysed_with_the_whole_study(
    env: Env, tmp_path: Path
) -> None:
    """The rest of a study that arrives (and closes again) while its first part is still being analysed: the
    first analysis finishes as it was, then the whole study as the spool holds it is analysed - never the late
    part on its own, nor a first analysis counted into the second's bookkeeping (the defect: ``as_it_stands``
    re-read the spool only once a processed marker existed, and ``open`` replaced the study's progress in
    flight)."""
    series = write_head_ct(tmp_path / "s", slices=10, lesions=(Lesion(x=260, y=250, slice=5),), seed=52)
    paths = list(series.paths)
    with triton_paused(env.triton_url):  # the first part's analysis waits on Triton while the rest arrives
        assert storescu(paths[:7], port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        wait_for(
            lambda: env.gateway.tracker.get(series.study_uid), timeout_s=30, what="first part in analysis"
        )
        assert storescu(paths[7:], port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        time.sleep(1.5)  # the quiet period (1 s): the late part closes again while the first is in flight
        wait_for(lambda: env.gateway.assembler.pending_studies() == 0, timeout_s=10, what="late part closed")
    wait_for(lambda: _done_count(env, series.study_uid) == 2, timeout_s=90, what="both analyses done")
    first, second = env.events("study_done", series.study_uid)
    assert (first["instances"], second["instances"]) == (7, 10)
    analysed = env.events("series_analysed", series.study_uid)
    assert [a["slices"] for a in analysed] == [7, 10]
    assert analysed[1]["supersedes"] == [analysed[0]["results"][0]]
    assert second["results"] == analysed[1]["results"]


def test_the_same_instances_closing_again_during_their_analysis_are_not_analysed_twice(
    env: Env, tmp_path: Path
) -> None:
    """A re-send (or a cluster node adopting a study the database had not recorded yet) that closes the study again
    while it is analysed brings nothing the analysis does not cover: one analysis, one completion."""
    series = write_head_ct(tmp_path / "s", slices=5, rows=128, cols=128, seed=53)
    with triton_paused(env.triton_url):
        assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        wait_for(
            lambda: env.gateway.tracker.get(series.study_uid), timeout_s=30, what="the analysis in flight"
        )
        assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        time.sleep(1.5)  # the quiet period: the re-send closes the study again while it is analysed
        wait_for(
            lambda: env.gateway.assembler.pending_studies() == 0, timeout_s=10, what="the re-send closed"
        )
    wait_for(lambda: _done_count(env, series.study_uid) == 1, timeout_s=90, what="the analysis")
    time.sleep(3.0)  # a second analysis, if one were started, would be done by now (5 slices)
    assert _done_count(env, series.study_uid) == 1
    assert len(env.events("series_analysed", series.study_uid)) == 1


def _start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=out, stderr=out
    )


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert process.poll() is None, "gateway exited during start-up"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout_s=120, what="gateway to listen")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


RECEIVERS = {
    "pynetdicom": "",
    "native": 'engine = "native"\naccept_notices = false\n',
    "native with journal": 'engine = "native"\naccept_notices = false\njournal_mb = 16\n',
}


@pytest.mark.parametrize("receiver", list(RECEIVERS))
def test_sigkill_mid_flight_loses_nothing_and_finishes_every_study_once(
    tmp_path: Path, triton: str, receiver: str
) -> None:
    """The gateway SIGKILLed while studies are queued and analysed, with each receiver: every acknowledged
    instance is in the spool (with the native receiver's journal, once the restarted receiver has replayed it),
    and every study finishes exactly once after the restart."""
    port = free_port()
    journalled = "journal" in receiver
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 1\n'
            f'[receiver]\nport = {port}\n{RECEIVERS[receiver]}[http]\nport = 0\n[triton]\nurl = "{triton}"\n'
            f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
            'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
        )
        audit = AuditLog(tmp_path / "data" / "audit.jsonl")
        studies = [write_head_ct(tmp_path / f"st{i}", slices=12, seed=60 + i) for i in range(6)]
        gateway = _start_gateway(config, tmp_path / "gateway.log")
        try:
            _wait_listening(port, gateway)
            for study in studies:
                assert storescu(list(study.paths), port=port, calling_ae="STORESCU").returncode == 0
            # Kill once the first series is analysed: its results were encoded in a worker process, and the
            # other studies are queued or being analysed.
            deadline = time.time() + 60
            while not any(e["event"] == "series_analysed" for e in audit.read()) and time.time() < deadline:
                time.sleep(0.1)
            helpers = _children(gateway.pid)
            encoders = [p for p in helpers if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            assert encoders, "no result encoder process to watch"
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(timeout=10)
        finally:
            if gateway.poll() is None:
                gateway.kill()
        # Nothing the killed gateway started lives on (the encoders watch their parent; Triton is external here).
        deadline = time.time() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
        done_before = {e["study"] for e in audit.read() if e["event"] == "study_done"}
        in_flight = [s.study_uid for s in studies if s.study_uid not in done_before]

        def every_instance_is_in_the_spool() -> bool:
            for study in studies:
                stored = sorted((tmp_path / "data" / "spool" / study.study_uid).glob("*/*.dcm"))
                if len(stored) != 12:
                    return False
                for path in stored:
                    assert pydicom.dcmread(path).pixel_array.shape == (512, 512)
            return not list((tmp_path / "data" / "spool").glob("*/*/.*.tmp"))

        if not journalled:  # acknowledged = in the spool, fsynced: before any recovery
            assert every_instance_is_in_the_spool()
        restarted = _start_gateway(config, tmp_path / "gateway.log")
        try:
            _wait_listening(port, restarted)
            if journalled:  # acknowledged = in the journal: in the spool once the receiver has replayed it
                wait_for(every_instance_is_in_the_spool, timeout_s=30, what="the journal's replay")
            wait_for(
                lambda: (
                    {s.study_uid for s in studies}
                    <= {e["study"] for e in audit.read() if e["event"] == "study_done"}
                ),
                timeout_s=180,
                what="every study to be finished after the restart",
            )
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=60)
        assert restarted.returncode == 0
        for study in studies:
            srs = sorted((tmp_path / "data" / "results" / study.study_uid).glob("SR_*.dcm"))
            assert len(srs) == 1, f"{study.study_uid}: {len(srs)} SR files"
            in_pacs = wait_for(
                lambda uid=study.study_uid: _sr_instances_in_orthanc(orthanc, uid), timeout_s=30
            )
            assert len(in_pacs) == 1, "exactly one SR per study in the PACS"
        finished_after = [
            e["study"] for e in audit.read() if e["event"] == "study_done" and e["study"] in in_flight
        ]
        print(
            f"\nSIGKILL: {len(studies)} studies acknowledged, {len(in_flight)} in flight at the kill, "
            f"{len(set(finished_after))} of them finished after the restart; instances lost: 0"
        )
    finally:
        orthanc.stop()
