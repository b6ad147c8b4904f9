"""The final-report classifier against the labelled sentences, and how whole reports read."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.review.report_text import ReportLabel, classify_sentence, load_rules, read_report, sentences

SENTENCES = Path(__file__).resolve().parents[1] / "data" / "report_sentences.tsv"


def _labelled() -> list[tuple[str, ReportLabel, str, bool]]:
    """(finding, label, sentence, held out): the held-out sentences were written after the rules were set."""
    rows, held_out = [], False
    for line in SENTENCES.read_text().splitlines():
        if line.startswith("# Held out"):
            held_out = True
        elif line.strip() and not line.startswith("#"):
            finding, label, sentence = line.split("\t")
            rows.append((finding, ReportLabel(label), sentence, held_out))
    return rows


def test_accuracy_on_the_labelled_sentences_is_at_least_95_percent() -> None:
    rows = _labelled()
    assert len(rows) >= 100
    labels = {label for _, label, _, _ in rows}
    assert labels == set(ReportLabel), "the set covers positive, negative and uncertain sentences"
    errors, held_out_errors = [], 0
    for finding, expected, sentence, held_out in rows:
        got = classify_sentence(sentence, finding) or ReportLabel.NEGATIVE
        if got is not expected:
            errors.append(f"{finding}: expected {expected.value}, got {got.value}: {sentence}")
            held_out_errors += held_out
    accuracy = 1 - len(errors) / len(rows)
    held_out = sum(row[3] for row in rows)
    print(
        f"\nreport classifier: {accuracy:.1%} of {len(rows)} labelled sentences "
        f"({1 - held_out_errors / held_out:.1%} of the {held_out} held out)"
    )
    for error in errors:
        print("  MISREAD", error)
    assert accuracy >= 0.95, "\n".join(errors)


@pytest.mark.parametrize(
    ("sentence", "label"),
    [
        ("No evidence of hemorrhage.", ReportLabel.NEGATIVE),
        ("A hemorrhage cannot be excluded.", ReportLabel.UNCERTAIN),  # not the negation "excluded"
        ("Hemorrhage has been excluded.", ReportLabel.NEGATIVE),
        ("No fracture; there is an acute subdural hematoma.", ReportLabel.POSITIVE),  # the terminator
        (
            "No skull fracture, soft tissue swelling, mass effect, midline shift or hemorrhage.",
            ReportLabel.NEGATIVE,
        ),
    ],
)
def test_triggers_terminators_and_precedence(sentence: str, label: ReportLabel) -> None:
    assert classify_sentence(sentence, "hemorrhage") is label


def test_a_sentence_without_the_term_is_not_a_reading() -> None:
    assert classify_sentence("The ventricles are normal.", "hemorrhage") is None


def test_the_indication_is_not_read_and_the_strongest_sentence_decides() -> None:
    report = (
        "INDICATION: Fall, rule out hemorrhage.\n"
        "FINDINGS: No skull fracture. Possible small subdural hematoma along the falx.\n"
        "IMPRESSION: Acute subdural hematoma, 4 mm."
    )
    reading = read_report(report, "hemorrhage")
    assert reading.label is ReportLabel.POSITIVE
    assert reading.evidence == "Acute subdural hematoma, 4 mm"  # decimals and sentence ends kept apart
    assert "rule out" not in " ".join(sentences(report, load_rules()))
    negative = read_report(
        "INDICATION: headache, r/o bleed.\nIMPRESSION: No intracranial hemorrhage.", "hemorrhage"
    )
    assert negative.label is ReportLabel.NEGATIVE and negative.mentioned
    silent = read_report("IMPRESSION: Normal study.", "hemorrhage")
    assert silent.label is ReportLabel.NEGATIVE and not silent.mentioned


def test_unknown_finding_types_and_bad_rule_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"known: .*hemorrhage"):
        classify_sentence("No fracture.", "fracture")
    bad = tmp_path / "rules.toml"
    bad.write_text("window_words = 3\n")
    with pytest.raises(ConfigError, match="not a report rule set"):
        load_rules(bad)
