"""Coded concepts used in the gateway's results, in one table.

Standard codes (DCM, SCT, UCUM) where DICOM defines a concept; a private coding scheme ``99AIGW`` (the "99"
prefix marks a local scheme, PS3.16 section 8) for the few AI-specific concepts without a standard code.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

from gateway.core.domain import CodedConcept as DomainCode

PRIVATE_SCHEME = "99AIGW"

PROCEDURE_IMAGING = CodedConcept("363679005", "SCT", "Imaging")
CAD_SUMMARY = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
ALL_SUCCEEDED_WITH_FINDINGS = CodedConcept("111242", "DCM", "All algorithms succeeded; with findings")
ALL_SUCCEEDED_WITHOUT_FINDINGS = CodedConcept("111241", "DCM", "All algorithms succeeded; without findings")
NO_ALGORITHMS_SUCCEEDED = CodedConcept("111245", "DCM", "No algorithms succeeded; without findings")
COMMENT = CodedConcept("121106", "DCM", "Comment")
INCIDENTAL = CodedConcept("INCIDENTAL", PRIVATE_SCHEME, "Incidental finding (outside the examined body part)")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
LONG_AXIS = CodedConcept("103339001", "SCT", "Long axis")
AREA = CodedConcept("42798000", "SCT", "Area")
MEAN = CodedConcept("373098007", "SCT", "Mean")
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = CodedConcept("mm2", "UCUM", "square millimeter")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
CUBIC_MILLIMETER = CodedConcept("mm3", "UCUM", "cubic millimeter")
HOUNSFIELD_UNIT = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")

AI_CONFIDENCE = CodedConcept("CONFIDENCE", PRIVATE_SCHEME, "AI confidence")
AI_TRIAGE_SCORE = CodedConcept("TRIAGESCORE", PRIVATE_SCHEME, "AI triage score")
STAT_FLAG = CodedConcept("STAT", PRIVATE_SCHEME, "Critical finding - STAT read requested")
AI_STUDY_ASSESSMENT = CodedConcept("STUDYASSESS", PRIVATE_SCHEME, "AI study assessment")


def to_highdicom(code: DomainCode) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def c(code: CodedConcept) -> DomainCode:
    """highdicom code -> the gateway's domain code."""
    return DomainCode(value=str(code.value), scheme=str(code.scheme_designator), meaning=str(code.meaning))
