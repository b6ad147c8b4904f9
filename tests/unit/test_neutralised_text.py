"""Header text is neutralised where it lands: control characters, terminal escapes and HL7 delimiters in every
attribute the results copy from the source never forge a log line, an HL7 segment or break a JSON document."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import re

import pytest
from hl7apy.parser import parse_message

from gateway.core.logs import CONTINUATION, handler_for, neutralise
from gateway.demo.phantoms import write_head_ct
from gateway.reporting.fhir import build_bundle
from gateway.reporting.hl7 import build_oru, build_priority_update
from gateway.results.content import SeriesReport, reported_findings
from preprocessing.series import LoadedSeries, load_series
from tests.support.analysis import make_analysis, make_finding

# Every attribute a result object, HL7 message or FHIR bundle copies from the source image.
COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "Manufacturer",
    "InstitutionName",
)
HOSTILE = (
    "A\rPID|1||FORGED",
    "A\nOBX|9|ST|FORGED",
    "A\r\n\x1b[2J\x1b]0;owned\x07",
    "A|B^C&D~E\\F",
    "A\x0bB\x1cC\x00D\x7f",
    "A\x85B\u2028C",
)
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    return load_series(write_head_ct(tmp_path_factory.mktemp("ct"), slices=3, rows=64, cols=64).paths)


def _reports(loaded: LoadedSeries, value: str | None) -> list[SeriesReport]:
    headers = []
    for ds in loaded.headers:
        clone = copy.deepcopy(ds)
        if value is not None:
            for keyword in COPIED:
                setattr(clone, keyword, value)
        headers.append(clone)
    hostile = dataclasses.replace(loaded, headers=tuple(headers))
    analysis = make_analysis(hostile, (make_finding(hostile, 1, 0.9),), stat=True, study_score=0.9)
    return [
        SeriesReport(
            analysis=analysis, findings=tuple(reported_findings(analysis)), sr_sop_instance_uid="1.2.3"
        )
    ]


def _segments(er7: str) -> list[str]:
    assert "\n" not in er7 and "\x0b" not in er7 and "\x1c" not in er7
    return [s[:3] for s in er7.split("\r") if s]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hl7_messages_keep_their_segments_and_fields(loaded: LoadedSeries, value: str) -> None:
    clean, hostile = _reports(loaded, None), _reports(loaded, value)
    for build in (
        lambda r: build_oru(r, stat=True, control_id="C1"),
        lambda r: build_priority_update(r, control_id="C2"),
    ):
        expected, text = build(clean).to_er7(), build(hostile).to_er7()
        assert _segments(text) == _segments(expected), "a header value started or removed a segment"
        fields = [len(s.split("|")) for s in text.split("\r") if s]
        baseline = [len(s.split("|")) for s in expected.split("\r") if s]
        # A value left out (a birth date that is not a date) may shorten a segment; none may gain a field.
        assert all(n <= m for n, m in zip(fields, baseline, strict=True)), "a header value added a field"
        assert parse_message(text, find_groups=True).validate()
    pid = next(s for s in build_oru(hostile, stat=True).to_er7().split("\r") if s.startswith("PID"))
    fields = pid.split("|")
    assert not re.search(r"[\x00-\x1f]", fields[3]), "raw control characters in PID-3"
    assert len(fields) <= 7 or fields[7] == "", "a birth date that is not a DA value is left out, not copied"


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_fhir_bundle_is_valid_json_with_the_values_escaped(loaded: LoadedSeries, value: str) -> None:
    text = build_bundle(_reports(loaded, value), stat=True).model_dump_json()
    assert not re.search(r"[\x00-\x1f]", text), "raw control characters in the JSON document"
    bundle = json.loads(text)
    assert bundle["resourceType"] == "Bundle" and bundle["entry"]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_every_log_record_is_one_line_and_no_terminal_escape_passes(value: str) -> None:
    buffer = io.StringIO()
    log = logging.getLogger("tests.neutralised")
    log.addHandler(handler_for(buffer))
    log.propagate = False
    log.setLevel(logging.INFO)  # whatever another test left the root logger at
    try:
        log.warning("series %s not analysed: no pipeline for body part %s", "1.2.3", value)
        try:
            raise ValueError(f"bad body part {value}")
        except ValueError:
            log.exception("unexpected error for %s", value)
    finally:
        log.handlers.clear()
        log.propagate = True
    lines = buffer.getvalue().splitlines()
    records = [line for line in lines if RECORD_START.match(line)]
    assert len(records) == 2, lines
    assert all(RECORD_START.match(line) or line.startswith(CONTINUATION) for line in lines), lines
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", buffer.getvalue())
    assert neutralise(value) in records[0]
