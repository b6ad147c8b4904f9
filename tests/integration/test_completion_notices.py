"""Deterministic completion (issue 13, item 3) over real associations to a running gateway: an MPPS in progress
holds a study open across gaps longer than the quiet period (0 premature analyses); its N-SET COMPLETED, listing
the instances, closes the study as soon as every one is in the spool; an IAN does the same; the quiet period
still applies without a notice; a bad notice gets a DIMSE error status, not a crash."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
)

from gateway.demo.phantoms import write_head_ct
from tests.integration.conftest import Env
from tests.support.notices import series_items
from tests.support.servers import storescu, wait_for

pytestmark = pytest.mark.integration


def _association(env: Env) -> object:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(InstanceAvailabilityNotification)
    assoc = ae.associate("127.0.0.1", env.gateway.port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    return assoc


def _routed(env: Env, study_uid: str) -> list[dict]:
    return [e for e in env.audit.read() if e.get("study") == study_uid and e["event"] == "series_analysed"]


def test_an_mpps_in_progress_holds_the_study_and_its_completion_closes_it(env: Env, tmp_path: Path) -> None:
    study_uid = generate_uid()
    first = write_head_ct(tmp_path / "s1", slices=6, seed=301, study_uid=study_uid)
    second = write_head_ct(tmp_path / "s2", slices=6, seed=302, study_uid=study_uid)
    step_uid = generate_uid()
    assoc = _association(env)
    try:
        created = Dataset()
        created.PerformedProcedureStepStatus = "IN PROGRESS"
        scheduled = Dataset()
        scheduled.StudyInstanceUID = study_uid
        created.ScheduledStepAttributesSequence = [scheduled]
        status, _ = assoc.send_n_create(created, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000

        assert storescu(list(first.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        time.sleep(3.0)  # three quiet periods: without the MPPS the study would be analysed by now
        assert not env.events("study_done", study_uid) and not _routed(env, study_uid)
        assert storescu(list(second.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
        last_sent = time.time()
        time.sleep(2.5)
        assert not env.events("study_done", study_uid) and not _routed(env, study_uid), "premature analysis"

        completed = Dataset()
        completed.PerformedProcedureStepStatus = "COMPLETED"
        completed.PerformedSeriesSequence = series_items(list(first.paths) + list(second.paths))
        status, _ = assoc.send_n_set(completed, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000
        closed_at = time.time()
        # A second N-SET of a completed step is refused (PS3.4 F.7.2.2), and an unknown step is not found.
        status, _ = assoc.send_n_set(completed, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0xC310
        status, _ = assoc.send_n_set(completed, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0112
    finally:
        assoc.release()
    done = env.wait_study_done(study_uid, timeout_s=120)
    assert done["series"] == 2 and done["instances"] == 12  # analysed once, whole
    assert len(env.events("study_done", study_uid)) == 1
    after_n_set_s = float(done["wait_complete_ms"]) / 1000.0 - (closed_at - last_sent)
    print(
        f"\nMPPS: study closed {after_n_set_s:.2f} s after its N-SET COMPLETED (held {closed_at - last_sent:.1f} s)"
    )


def test_an_instance_availability_notification_closes_the_study_without_the_quiet_period(
    env: Env, tmp_path: Path
) -> None:
    env.gateway.assembler.quiet_period_s = 30.0  # only the notice can close it within this test
    env.gateway.assembler.incomplete_guard_s = 30.0
    study_uid = generate_uid()
    series = write_head_ct(tmp_path / "s1", slices=6, seed=303, study_uid=study_uid)
    notice = Dataset()
    notice.StudyInstanceUID = study_uid
    notice.ReferencedSeriesSequence = series_items(list(series.paths))
    assoc = _association(env)
    try:
        status, _ = assoc.send_n_create(notice, InstanceAvailabilityNotification, generate_uid())
        assert status.Status == 0x0000  # before the images: kept until they come
        bad = Dataset()
        bad.StudyInstanceUID = study_uid
        status, _ = assoc.send_n_create(bad, InstanceAvailabilityNotification, generate_uid())
        assert status.Status == 0x0120  # nothing listed: a clear refusal
    finally:
        assoc.release()
    sent = time.time()
    assert storescu(list(series.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done = env.wait_study_done(study_uid, timeout_s=25)  # well inside the 30 s quiet period
    assert done["instances"] == 6
    print(f"\nIAN: study done {time.time() - sent:.1f} s after the first instance was sent")


def test_an_mpps_in_progress_survives_a_restart_and_its_completion_is_accepted_after_it(
    tmp_path: Path,
) -> None:
    """The modality's step is kept in the system of record before it is answered: a gateway restarted while the
    step is in progress still holds the recovered study past the quiet period, and accepts the step's N-SET
    COMPLETED (a step created before the restart), which closes the study."""
    from gateway.app import Gateway
    from gateway.config.settings import load_settings
    from gateway.database.queries import was_complete
    from gateway.inference.server import free_port

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\n[receiver]\nport = {port}\n'
        '[http]\nenabled = false\n[triton]\nurl = "127.0.0.1:1"\n'
    )
    study_uid, step_uid = generate_uid(), generate_uid()
    series = write_head_ct(tmp_path / "s", slices=4, rows=64, cols=64, seed=304, study_uid=study_uid)

    def association() -> object:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
        assert assoc.is_established
        return assoc

    gateway = Gateway(load_settings(config)).start()
    try:
        assoc = association()
        created = Dataset()
        created.PerformedProcedureStepStatus = "IN PROGRESS"
        scheduled = Dataset()
        scheduled.StudyInstanceUID = study_uid
        created.ScheduledStepAttributesSequence = [scheduled]
        assert assoc.send_n_create(created, ModalityPerformedProcedureStep, step_uid)[0].Status == 0  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
    finally:
        gateway.stop()  # the study is spooled, not analysed; its step in progress

    gateway = Gateway(load_settings(config)).start()
    try:
        time.sleep(2.0)  # four quiet periods after the recovery
        assert not was_complete(gateway.database, study_uid), "the restart forgot the MPPS in progress"
        assoc = association()
        completed = Dataset()
        completed.PerformedProcedureStepStatus = "COMPLETED"
        completed.PerformedSeriesSequence = series_items(list(series.paths))
        status, _ = assoc.send_n_set(completed, ModalityPerformedProcedureStep, step_uid)  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert status.Status == 0x0000, "a step created before the restart is known after it"
        wait_for(lambda: was_complete(gateway.database, study_uid), timeout_s=10, what="the study to close")
    finally:
        gateway.stop()
