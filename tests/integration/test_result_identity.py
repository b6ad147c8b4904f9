"""Patient-safe result identity on real components: two studies of two patients whose instances carry the same
SOP Instance UIDs each get their own result in the PACS (Orthanc), in their own study."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.demo.phantoms import Lesion, write_head_ct
from tests.integration.conftest import Env
from tests.support.servers import storescu, wait_for

pytestmark = pytest.mark.integration


def _sr_uids(env: Env, study_uid: str) -> list[str]:
    uids = []
    for series in env.orthanc.series_of_study(study_uid):
        if series["MainDicomTags"].get("Modality") == "SR":
            for instance in series["Instances"]:
                uids.append(env.orthanc.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"])
    return uids


def test_two_patients_sharing_sop_instance_uids_each_get_their_own_result(env: Env, tmp_path: Path) -> None:
    first = write_head_ct(
        tmp_path / "a", slices=8, rows=256, cols=256, lesions=(Lesion(x=130, y=125, slice=4),)
    )
    # A second patient's study whose sender reused the SOP Instance UIDs (a split study, a re-identified copy).
    other_study, other_series = generate_uid(), generate_uid()
    second = []
    for index, path in enumerate(first.paths):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = other_study, other_series
        ds.PatientID, ds.PatientName = "OTHER-PATIENT-7", "Other^Patient"
        out = tmp_path / "b" / f"{index}.dcm"
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out)
        second.append(out)
    assert storescu(list(first.paths), port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    assert storescu(second, port=env.gateway.port, calling_ae="STORESCU").returncode == 0
    done_a = env.wait_study_done(first.study_uid)
    done_b = env.wait_study_done(other_study)
    assert set(done_a["results"]).isdisjoint(done_b["results"])
    in_a = wait_for(lambda: _sr_uids(env, first.study_uid), timeout_s=60, what="SR of patient A in Orthanc")
    in_b = wait_for(lambda: _sr_uids(env, other_study), timeout_s=60, what="SR of patient B in Orthanc")
    assert len(in_a) == 1 and len(in_b) == 1 and in_a != in_b
    # Each SR sits in its own patient's study, not the other's.
    for study_uid, sr_uid, patient_id in (
        (first.study_uid, in_a[0], None),
        (other_study, in_b[0], "OTHER-PATIENT-7"),
    ):
        [match] = env.orthanc.post(
            "/tools/find", f'{{"Level": "Instance", "Query": {{"SOPInstanceUID": "{sr_uid}"}}}}'
        )
        tags = env.orthanc.get(f"/instances/{match}/simplified-tags")
        assert tags["StudyInstanceUID"] == study_uid
        if patient_id:
            assert tags["PatientID"] == patient_id
