"""HL7 v2.5.1 messages for the RIS / EHR, built and validated with hl7apy.

* ``build_oru``: ORU^R01 with one OBX per finding (finding type, confidence, UCUM unit, abnormal flag), the
  measurements as further OBX rows of the same sub-ID, and the Study Instance UID and SR UID for the viewer.
* ``build_priority_update``: OMI^O23 imaging change order (ORC-1 "XO") raising the order's priority to STAT
  (TQ1-9 "S"), sent for a STAT study so the reading worklist moves it up.

Results are preliminary (OBR-25 / OBX-11 "P") until a radiologist signs them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from hl7apy.core import Message

from gateway.core.domain import CodedConcept
from gateway.results.content import SeriesReport

VERSION = "2.5.1"
CODING_SYSTEMS = {"SCT": "SCT", "DCM": "DCM", "UCUM": "UCUM", "LN": "LN"}


@dataclass(frozen=True, kw_only=True)
class Hl7Parties:
    sending_application: str = "AI_GATEWAY"
    sending_facility: str = "AI_GATEWAY"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    """Escape a header-derived value for one HL7 field component (HL7 v2.5.1 section 2.7).

    The delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; CR, LF and every other control character
    become the hexadecimal escape ``\\Xhh\\``, so a CR in a Patient's Name can never start a new segment and
    MLLP's framing bytes (0x0B, 0x1C) can never end a message early.
    """
    escaped = (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )
    return _CONTROL.sub(lambda m: f"\\X{ord(m.group()):02X}\\", escaped)


def _ce(code: CodedConcept) -> str:
    return (
        f"{_escape(code.value)}^{_escape(code.meaning)}^{CODING_SYSTEMS.get(code.scheme, '99' + code.scheme)}"
    )


def _msh(message: Message, kind: str, parties: Hl7Parties, control_id: str, when: str) -> None:
    msh = message.msh
    msh.msh_3 = parties.sending_application
    msh.msh_4 = parties.sending_facility
    msh.msh_5 = parties.receiving_application
    msh.msh_6 = parties.receiving_facility
    msh.msh_7 = when
    msh.msh_9 = kind
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_12 = VERSION


def _pid(pid: object, header: object) -> None:
    patient_id = str(getattr(header, "PatientID", "") or "")
    name = str(getattr(header, "PatientName", "") or "")
    birth = str(getattr(header, "PatientBirthDate", "") or "")
    sex = str(getattr(header, "PatientSex", "") or "")
    pid.pid_1 = "1"  # type: ignore[attr-defined]
    if patient_id:
        pid.pid_3 = f"{_escape(patient_id)}^^^^PI"  # type: ignore[attr-defined]
    if name:
        pid.pid_5 = "^".join(_escape(part) for part in name.split("^"))  # type: ignore[attr-defined]
    if re.fullmatch(r"\d{8}", birth):  # a DA value; anything else is not a date and is left out
        pid.pid_7 = birth  # type: ignore[attr-defined]
    if sex in ("M", "F", "O", "U"):
        pid.pid_8 = sex  # type: ignore[attr-defined]


_Row = tuple[
    str, str, str, str, str, str
]  # OBX-2 value type, -3 observation, -5 value, -6 unit, -8 flag, -4 sub-id


def _observation_rows(reports: Sequence[SeriesReport], study_uid: str) -> list[_Row]:
    """The OBX rows of the result: the study, then per series its algorithm, its SR and every finding's
    measurements (the first, the confidence, under the finding type; grouped by sub-id)."""
    rows: list[_Row] = [("ST", "113014^DICOM Study^DCM", _escape(study_uid), "", "", "")]
    for report in reports:
        a = report.analysis
        summary = f"{a.algorithm_name} {a.algorithm_version}: {len(report.findings)} finding(s)"
        rows.append(("ST", "121071^Finding^DCM", _escape(summary), "", "", ""))
        rows.append(
            ("ST", "113012^Key Object Selection^DCM", _escape(report.sr_sop_instance_uid), "", "", "")
        )
        for number, finding in enumerate(report.findings, start=1):
            critical = any(v.value == "373066001" for _, v in finding.evaluations)
            flag = "AA" if critical else "A"
            sub = f"{len(rows)}.{number}"
            for m in finding.measurements:
                observation = _ce(finding.finding_type) if m is finding.measurements[0] else _ce(m.name)
                unit = f"{_escape(m.unit.value)}^{_escape(m.unit.meaning)}^UCUM"
                rows.append(("NM", observation, f"{m.value:g}", unit, flag, sub))
    return rows


def build_oru(
    reports: Sequence[SeriesReport],
    *,
    stat: bool,
    parties: Hl7Parties = Hl7Parties(),
    control_id: str | None = None,
    now: datetime | None = None,
) -> Message:
    if not reports:
        raise ValueError("build_oru needs at least one analysed series")
    when = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    header = reports[0].header
    message = Message("ORU_R01", version=VERSION)
    _msh(message, "ORU^R01^ORU_R01", parties, control_id or uuid.uuid4().hex[:20], when)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").pid, header)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = _escape(str(header.get("AccessionNumber", "") or ""))
    order.orc.orc_1 = "RE"
    order.orc.orc_3 = accession
    order.obr.obr_1 = "1"
    order.obr.obr_3 = accession
    order.obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    order.obr.obr_7 = when
    order.obr.obr_25 = "P"
    if stat:
        order.obr.obr_27 = "^^^^^S"
    for index, (kind, observation, value, unit, flag, sub) in enumerate(
        _observation_rows(reports, str(header.StudyInstanceUID)), start=1
    ):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        obx.obx_2 = kind
        obx.obx_3 = observation
        if sub:
            obx.obx_4 = sub
        obx.obx_5 = value
        if unit:
            obx.obx_6 = unit
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = "P"
    return message


def build_priority_update(
    reports: Sequence[SeriesReport],
    *,
    parties: Hl7Parties = Hl7Parties(),
    control_id: str | None = None,
    now: datetime | None = None,
) -> Message:
    """OMI^O23 change order (ORC-1 "XO") raising the imaging order's priority to STAT (TQ1-9 "S")."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    header = reports[0].header
    message = Message("OMI_O23", version=VERSION)
    _msh(message, "OMI^O23^OMI_O23", parties, control_id or uuid.uuid4().hex[:20], when)
    _pid(message.add_group("OMI_O23_PATIENT").pid, header)
    order = message.add_group("OMI_O23_ORDER")
    accession = _escape(str(header.get("AccessionNumber", "") or "")) or "UNKNOWN"
    order.orc.orc_1 = "XO"
    order.orc.orc_2 = accession
    order.orc.orc_5 = "IP"
    order.add_group("OMI_O23_TIMING").tq1.tq1_9 = "S"
    order.obr.obr_2 = accession
    order.obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    order.obr.obr_13 = _escape("AI critical finding: STAT read requested")
    ipc = order.add_segment("IPC")
    ipc.ipc_1 = accession
    ipc.ipc_2 = accession
    ipc.ipc_3 = _escape(str(header.StudyInstanceUID))
    ipc.ipc_4 = "1"
    return message


def build_critical_alert(
    *,
    study_uid: str,
    accession_number: str,
    text: str,
    acknowledge_url: str,
    parties: Hl7Parties = Hl7Parties(),
    control_id: str | None = None,
    now: datetime | None = None,
) -> Message:
    """ORU^R01 for a paging or messaging system: a critical AI finding to acknowledge (OBX-8 "AA", preliminary),
    the study and the acknowledgement link. No patient demographics: the case is named by its accession number."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    message = Message("ORU_R01", version=VERSION)
    _msh(message, "ORU^R01^ORU_R01", parties, control_id or uuid.uuid4().hex[:20], when)
    group = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = group.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = f"{_escape(accession_number) or 'UNKNOWN'}^^^^AN"  # the case by its accession (table 0203 AN)
    pid.pid_5 = '""'  # HL7's explicit null: the name is required and deliberately not sent
    order = group.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = _escape(accession_number) or "UNKNOWN"
    order.obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    order.obr.obr_7 = when
    order.obr.obr_25 = "P"
    rows = [
        ("TX", "CRITICAL^Critical AI finding^99AIG", _escape(text)),
        ("ST", "113014^DICOM Study^DCM", _escape(study_uid)),
        ("ST", "ACKURL^Acknowledge at^99AIG", _escape(acknowledge_url)),
    ]
    for number, (kind, observation, value) in enumerate(rows, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(number)
        obx.obx_2 = kind
        obx.obx_3 = observation
        obx.obx_5 = value
        obx.obx_8 = "AA"
        obx.obx_11 = "P"
    return message
