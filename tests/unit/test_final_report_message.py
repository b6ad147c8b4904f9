"""Reading an ORU^R01 final report, and what a comparison with the AI concludes."""

from __future__ import annotations

import pytest

from gateway.review.report_text import ReportLabel
from gateway.review.reports import outcome_of
from gateway.workflow.final_reports import ReportError, hl7_time, report_from_message
from gateway.workflow.hl7v2 import Er7Message


def obr(**fields: str) -> str:
    """An OBR segment with the given fields by number: obr(f3="X", f18="ACC")."""
    values = {int(k[1:]): v for k, v in fields.items()}
    return "|".join(["OBR", "1"] + [values.get(i, "") for i in range(2, max(values, default=1) + 1)])


def _message(obr: str, obx: str, extra: str = "") -> Er7Message:
    return Er7Message(
        "MSH|^~\\&|RIS|H|GW|H|20261207101500+0100||ORU^R01|C-1|P|2.5\r"
        "PID|1||MRN-9^^^H||DOE^JANE\r"
        f"{obr}\r{obx}{extra}"
    )


def test_the_report_is_read_from_obr_and_the_text_observations() -> None:
    message = _message(
        obr(f3="FILLER-1", f4="70450^CT head", f18="ACC-77", f22="20261207094500+0100", f24="CT", f25="C"),
        "OBX|1|FT|18782-3^Findings^LN||FINDINGS: Ventricles normal.\\.br\\IMPRESSION: No hemorrhage.||||||F\r"
        "OBX|2|NM|8867-4^Heart rate^LN||72||||||F\r"
        "OBX|3|TX|19005-8^Impression^LN||Line one~Line two \\T\\ more||||||F",
        "\rZDS|1.2.840.99.1^^Application^DICOM",
    )
    report = report_from_message(message)
    assert report.accession_number == "ACC-77"  # OBR-18 before OBR-3
    assert report.study_uid == "1.2.840.99.1"
    assert report.status == "C" and report.compared
    assert report.signed_at == hl7_time("20261207084500")  # +0100 -> UTC
    assert report.text.splitlines() == [
        "FINDINGS: Ventricles normal.",
        "IMPRESSION: No hemorrhage.",
        "Line one",
        "Line two & more",
    ]
    assert "72" not in report.text  # a numeric observation is not report text
    assert report.control_id == "C-1"


@pytest.mark.parametrize(
    ("obr", "obx", "reason"),
    [
        (obr(), "OBX|1|TX|x||Normal.", "no accession number"),
        (obr(f3="ACC-1"), "OBX|1|NM|x||5", "no report text"),
        (obr(f3="ACC-1"), "OBX|1|TX|x||Normal.\rZDS|not-a-uid", "ZDS-1 is not a Study Instance UID"),
    ],
)
def test_what_a_report_needs(obr: str, obx: str, reason: str) -> None:
    with pytest.raises(ReportError, match=reason):
        report_from_message(_message(obr, obx))


def test_preliminary_reports_are_kept_but_not_compared() -> None:
    report = report_from_message(_message(obr(f3="ACC-1", f25="P"), "OBX|1|TX|x||Normal."))
    assert report.status == "P" and not report.compared


@pytest.mark.parametrize(
    ("ai", "label", "outcome"),
    [
        (True, ReportLabel.POSITIVE, "concordant"),
        (False, ReportLabel.NEGATIVE, "concordant"),
        (True, ReportLabel.NEGATIVE, "ai_only"),
        (False, ReportLabel.POSITIVE, "report_only"),
        (True, ReportLabel.UNCERTAIN, "uncertain"),
    ],
)
def test_comparison_outcomes(ai: bool, label: ReportLabel, outcome: str) -> None:
    assert outcome_of(ai, label) == outcome


def test_hl7_times() -> None:
    assert hl7_time("2026") == hl7_time("20260101000000")
    assert hl7_time("20261207101500.1234-0500") == hl7_time("20261207151500")
    assert hl7_time("not a time") is None and hl7_time("20261340") is None
