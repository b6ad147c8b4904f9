"""Result identity: the same analysis of the same study gives the same result UIDs (exactly-once delivery),
and two studies or two patients never share one, even when their source SOP Instance UIDs are the same."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from gateway.demo.phantoms import write_head_ct
from preprocessing.series import LoadedSeries, load_series
from tests.support.analysis import make_analysis

ROLES = ("sr", "sr-series", "gsps", "gsps-series", "seg", "seg-series")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    return load_series(write_head_ct(tmp_path_factory.mktemp("ct"), slices=3, rows=64, cols=64).paths)


def _with_headers(loaded: LoadedSeries, **changes: str) -> LoadedSeries:
    headers = []
    for ds in loaded.headers:
        clone = copy.deepcopy(ds)
        for keyword, value in changes.items():
            setattr(clone, keyword, value)
        headers.append(clone)
    return dataclasses.replace(loaded, headers=tuple(headers))


def test_same_study_same_instances_give_the_same_uids(loaded: LoadedSeries) -> None:
    first = make_analysis(loaded, (), stat=False)
    again = make_analysis(_with_headers(loaded), (), stat=False)
    assert [first.result_uid(r) for r in ROLES] == [again.result_uid(r) for r in ROLES]
    assert len({first.result_uid(r) for r in ROLES}) == len(ROLES)


@pytest.mark.parametrize(
    "changes",
    [
        {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1"},
        {"SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.2"},
        {"PatientID": "OTHER-PATIENT"},
        {"IssuerOfPatientID": "OTHER-HOSPITAL"},
        {"PatientName": "Other^Patient"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_shared_sop_instance_uids_in_another_study_or_patient_never_share_a_result_uid(
    loaded: LoadedSeries, changes: dict[str, str]
) -> None:
    original = make_analysis(loaded, (), stat=False)
    other = make_analysis(_with_headers(loaded, **changes), (), stat=False)
    assert [s.SOPInstanceUID for s in other.sources] == [s.SOPInstanceUID for s in original.sources]
    for role in ROLES:
        assert other.result_uid(role) != original.result_uid(role), role
