"""Coded concepts used in the gateway's results, in one table.

Standard codes (DCM, SCT, UCUM) come from pydicom's code dictionary (PS3.16) where DICOM defines a concept; a private coding scheme ``99AIGW`` (the "99"
prefix marks a local scheme, PS3.16 section 8) for the few AI-specific concepts without a standard code.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gateway.core.domain import CodedConcept as DomainCode


def _std(code: Code) -> CodedConcept:
    """A standard code from pydicom's tables (PS3.16), never typed by hand."""
    return CodedConcept.from_code(code)


PRIVATE_SCHEME = "99AIGW"

PROCEDURE_IMAGING = _std(codes.SCT.ImagingProcedure)
CAD_SUMMARY = _std(codes.DCM.CADProcessingAndFindingsSummary)
ALL_SUCCEEDED_WITH_FINDINGS = _std(codes.DCM.AllAlgorithmsSucceededWithFindings)
ALL_SUCCEEDED_WITHOUT_FINDINGS = _std(codes.DCM.AllAlgorithmsSucceededWithoutFindings)
NO_ALGORITHMS_SUCCEEDED = _std(codes.DCM.NoAlgorithmsSucceededWithoutFindings)
COMMENT = _std(codes.DCM.Comment)
INCIDENTAL = CodedConcept("INCIDENTAL", PRIVATE_SCHEME, "Incidental finding (outside the examined body part)")
YES = _std(codes.SCT.Yes)
NO = _std(codes.SCT.No)
NO_UNITS = _std(codes.UCUM.NoUnits)
LONG_AXIS = _std(codes.SCT.LongAxis)
AREA = _std(codes.SCT.Area)
MEAN = _std(codes.SCT.Mean)
# pydicom's table gives "mm" as the meaning of UCUM mm; viewers show the meaning, so it is spelt out here.
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = _std(codes.UCUM.SquareMillimeter)
VOLUME = _std(codes.SCT.Volume)
CUBIC_MILLIMETER = _std(codes.UCUM.CubicMillimeter)
HOUNSFIELD_UNIT = _std(codes.UCUM.HounsfieldUnit)

AI_CONFIDENCE = CodedConcept("CONFIDENCE", PRIVATE_SCHEME, "AI confidence")
AI_TRIAGE_SCORE = CodedConcept("TRIAGESCORE", PRIVATE_SCHEME, "AI triage score")
STAT_FLAG = CodedConcept("STAT", PRIVATE_SCHEME, "Critical finding - STAT read requested")
AI_STUDY_ASSESSMENT = CodedConcept("STUDYASSESS", PRIVATE_SCHEME, "AI study assessment")


def to_highdicom(code: DomainCode) -> CodedConcept:
    return CodedConcept(code.value, code.scheme, code.meaning)


def c(code: CodedConcept) -> DomainCode:
    """highdicom code -> the gateway's domain code."""
    return DomainCode(value=str(code.value), scheme=str(code.scheme_designator), meaning=str(code.meaning))
