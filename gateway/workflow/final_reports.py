"""A radiologist's signed report as the RIS sends it (HL7 v2 ORU^R01), read for the AI-vs-report comparison.

Where each value is read (the first that is present wins):

    accession number   OBR-18 (placer field 1), OBR-3.1 (filler order number), OBR-2.1 (placer order number)
    study              ZDS-1.1 (Study Instance UID, IHE RAD), when the message names it
    result status      OBR-25: F final, C corrected (both compared), P preliminary and the rest kept only
    signed at          OBR-22 (results report / status change), else MSH-7
    text               OBX-5 of every OBX whose value type (OBX-2) is TX, FT or ST, in order, one line each;
                       repetitions are lines too, and FT's \\.br\\ escape is a line break

The reading radiologist (OBR-32) is a name: it is not read. A report without an accession number or text is an
error (AE) - there is nothing to compare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from gateway.workflow.hl7v2 import Er7Message

REPORT_MESSAGES = {("ORU", "R01")}
TEXT_TYPES = {"TX", "FT", "ST"}
COMPARED_STATUSES = {"F", "C"}
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?$")


class ReportError(ValueError):
    """An ORU that lacks what a report needs (said to the sender in ERR)."""


@dataclass(frozen=True, kw_only=True)
class FinalReport:
    accession_number: str
    study_uid: str  # "" when the message does not name it (the accession number then links it)
    status: str  # OBR-25
    signed_at: float  # Unix seconds
    text: str  # clinical text: stored for the QA evidence, never logged
    control_id: str

    @property
    def compared(self) -> bool:
        return self.status in COMPARED_STATUSES


def hl7_time(value: str) -> float | None:
    """An HL7 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as Unix seconds; local times are read as UTC."""
    match = _TS.match(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, _, zone = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=timezone.utc,
        )
    except ValueError:
        return None
    offset = 0
    if zone:
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60)
    return moment.timestamp() - offset


def _text(message: Er7Message) -> str:
    lines: list[str] = []
    for segment in message.segments:
        if segment.name != "OBX" or len(segment.fields) <= 5:
            continue
        if segment.fields[2].strip().upper() not in TEXT_TYPES:
            continue
        for repetition in segment.fields[5].split(message.repetition_sep):
            value = repetition.replace(f"{message.escape_char}.br{message.escape_char}", "\n")
            lines.append(message.unescape(value.replace(message.component_sep, " ")).rstrip())
    return "\n".join(line for line in lines if line.strip())


def report_from_message(message: Er7Message) -> FinalReport:
    accession = next(
        (v for v in (message.get("OBR", 18), message.get("OBR", 3), message.get("OBR", 2)) if v.strip()), ""
    ).strip()
    if not accession:
        raise ReportError("no accession number (OBR-18, OBR-3 or OBR-2)")
    if len(accession) > 64:
        raise ReportError("the accession number is longer than 64 characters")
    study_uid = message.get("ZDS", 1).strip()
    if study_uid and (len(study_uid) > 64 or not all(c.isdigit() or c == "." for c in study_uid)):
        raise ReportError("ZDS-1 is not a Study Instance UID")
    text = _text(message)
    if not text:
        raise ReportError("no report text (OBX of value type TX, FT or ST)")
    signed = hl7_time(message.get("OBR", 22)) or hl7_time(message.get("MSH", 7))
    if signed is None:
        raise ReportError("no report time (OBR-22 or MSH-7)")
    return FinalReport(
        accession_number=accession,
        study_uid=study_uid,
        status=(message.get("OBR", 25).strip().upper() or "F")[:1],
        signed_at=signed,
        text=text[:200_000],
        control_id=message.control_id[:64],
    )
