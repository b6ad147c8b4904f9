"""Header hygiene: values that break their VR are repaired by a documented rule or dropped, never invented, so a
messy header never costs a result; the result objects built from cleaned headers pass dciodvfy for any body
part, standard, non-standard, lower case or absent."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.delivery.store import encode
from gateway.demo.phantoms import write_head_ct
from gateway.results.content import reported_findings
from gateway.results.encode import encode_results
from gateway.results.hygiene import clean_header, clean_headers
from preprocessing.series import LoadedSeries, load_series
from tests.support.analysis import make_analysis, make_finding
from tests.support.servers import dciodvfy_errors

HASH = hashlib.sha256(b"de-identified").hexdigest()[:56]
# What de-identification tools and PACS migrations write (seen in public collections).
DEIDENTIFIED = {
    "PatientBirthDate": HASH,
    "StudyDate": HASH,
    "AccessionNumber": HASH,
    "StudyID": "STUDY-ID-TOO-LONG-FOR-SH",
    "StudyTime": "25:99:99",
    "ReferringPhysicianName": "Dr\x1b[2J^Who\r\n",
    "SeriesDate": "2020-01-31",
    "BodyPartExamined": "partialbody",
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    return load_series(write_head_ct(tmp_path_factory.mktemp("ct"), slices=3, rows=128, cols=128).paths)


def _with(loaded: LoadedSeries, changes: dict[str, str | None]) -> tuple[Dataset, ...]:
    headers = []
    for ds in loaded.headers:
        clone = copy.deepcopy(ds)
        for keyword, value in changes.items():
            if value is None:
                if keyword in clone:
                    delattr(clone, keyword)
            else:
                setattr(clone, keyword, value)
        headers.append(clone)
    return tuple(headers)


def _encode(loaded: LoadedSeries, headers: tuple[Dataset, ...]):
    series = dataclasses.replace(loaded, headers=headers)
    analysis = make_analysis(series, (make_finding(series, 1, 0.95),), stat=True)
    mask = np.zeros((len(series.images), 64, 64), dtype=bool)
    mask[1, 20:30, 20:30] = True
    return encode_results(analysis, reported_findings(analysis), mask, [])


def test_deidentified_header_breaks_every_result_object_without_hygiene(loaded: LoadedSeries) -> None:
    result = _encode(loaded, _with(loaded, DEIDENTIFIED))
    assert result.datasets == [] and set(result.failures) == {"SR", "GSPS", "SEG"}


def test_deidentified_header_gets_every_result_object_after_hygiene(
    loaded: LoadedSeries, tmp_path: Path
) -> None:
    headers, repairs = clean_headers(_with(loaded, DEIDENTIFIED))
    assert repairs.as_list() == [
        "AccessionNumber: dropped",
        "BodyPartExamined: repaired",
        "PatientBirthDate: dropped",
        "ReferringPhysicianName: control characters removed",
        "SeriesDate: repaired",
        "StudyDate: dropped",
        "StudyID: dropped",
        "StudyTime: dropped",
    ]
    assert HASH not in " ".join(repairs.as_list()), "repairs name attributes, never values"
    first = headers[0]
    assert (
        first.AccessionNumber == "" and first.PatientBirthDate == "" and first.StudyDate == ""
    )  # Type 2: empty
    assert first.SeriesDate == "20200131" and first.BodyPartExamined == "PARTIALBODY"
    assert first.ReferringPhysicianName == "Dr[2J^Who"
    result = _encode(loaded, headers)
    assert result.failures == {}
    assert [ds.Modality for ds in result.datasets] == ["SR", "PR", "SEG"]
    for ds in result.datasets:
        path = tmp_path / f"{ds.Modality}.dcm"
        path.write_bytes(encode(ds))
        assert dciodvfy_errors(path) == [], ds.Modality


@pytest.mark.parametrize(
    ("keyword", "vr_value", "expected", "action"),
    [
        ("StudyDate", "2021.03.04", "20210304", "repaired"),
        ("StudyDate", "2021-13-45", "", "dropped"),
        ("StudyTime", "08:15:30.25", "081530.25", "repaired"),
        ("Modality", "ct", "CT", "repaired"),
        ("FrameOfReferenceUID", "1.2.840.10008.1. ", "1.2.840.10008.1", "repaired"),
        ("FrameOfReferenceUID", "not.a.uid", None, "dropped"),
        ("AccessionNumber", "A" * 17, "", "dropped"),
        ("StudyDescription", "D" * 70, "D" * 64, "truncated"),
        ("PatientName", "Doe^Jane\nX", "Doe^JaneX", "control characters removed"),
        ("InstitutionName", "General\x00 Hospital", "General Hospital", "control characters removed"),
    ],
)
def test_each_rule(keyword: str, vr_value: str, expected: str | None, action: str) -> None:
    ds = Dataset()
    setattr(ds, keyword, vr_value)
    before = str(getattr(ds, keyword))
    from gateway.results.hygiene import HeaderRepairs

    repairs = HeaderRepairs()
    clean = clean_header(ds, repairs)
    assert (keyword, action) in repairs.actions
    if expected is None:
        assert keyword not in clean
    else:
        assert str(clean.data_element(keyword).value) == expected
    assert str(getattr(ds, keyword)) == before, "the source header is never changed"


def test_valid_values_and_permitted_characters_are_left_alone() -> None:
    ds = Dataset()
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240101", "101010", "CT"
    ds.ImageComments = "line one\r\nline two"  # LT keeps CR LF
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"  # ISO 2022 escapes are character sets
    headers, repairs = clean_headers([ds])
    assert not repairs and headers[0] == ds


@pytest.mark.parametrize("body_part", ["PARTIALBODY", "body", "BREAST", "ABDOMEN PELVIS", "", None, "CHEST"])
def test_gsps_and_every_output_pass_dciodvfy_for_any_body_part(
    loaded: LoadedSeries, tmp_path: Path, body_part: str | None
) -> None:
    headers, _ = clean_headers(_with(loaded, {"BodyPartExamined": body_part}))
    result = _encode(loaded, headers)
    assert result.failures == {}
    for ds in result.datasets:
        path = tmp_path / f"{ds.Modality}.dcm"
        path.write_bytes(encode(ds))
        assert dciodvfy_errors(path) == [], f"{ds.Modality} with BodyPartExamined {body_part!r}"
        assert pydicom.dcmread(path).StudyInstanceUID == loaded.headers[0].StudyInstanceUID
