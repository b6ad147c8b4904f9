"""Header hygiene: the one step every attribute a result copies from a source image passes.

De-identification tools, old modalities and PACS migrations write values that break their VR: a hash where a
date belongs, a 56-character accession number, a newline in a name, a UID with a trailing dot. highdicom (rightly)
refuses such values, so one bad attribute would cost the patient every result object. ``clean_headers`` applies
these rules to the top-level data elements of the analysed images' headers, before SR, GSPS, SEG, FHIR and HL7 are
built from them; a value is repaired only where the rule recovers what the sender meant, otherwise it is dropped -
never invented:

==========================  ==============================================================================
what                        rule
==========================  ==============================================================================
control characters          removed (CR, LF, TAB, FF kept in ST / LT / UT; ESC kept with ISO 2022 character
                            sets, where it introduces a character set)
DA ``YYYY-MM-DD`` / ``.``   the ACR-NEMA form: separators removed; any other invalid date dropped
TM ``HH:MM:SS``             the ACR-NEMA form: colons removed; any other invalid time dropped
CS in lower case            upper-cased (CS allows upper case only); any other invalid code string dropped
UI with spaces, trailing    spaces, NULs and trailing dots removed; still invalid: dropped
dots or NULs
too long (SH, LO, PN, ...)  identifiers (``IDENTIFIERS``: accession, patient / study IDs ...) dropped - a cut
                            identifier would name another record; free text (descriptions, names of places
                            and devices) cut to the VR's maximum length
anything else invalid       dropped (pydicom's VR validation decides)
Patient Identity Removed    dropped when YES without the De-identification Method it requires (Type 1C)
==========================  ==============================================================================

A dropped Type 2 attribute of the result objects stays present and empty. ``HeaderRepairs`` lists what was done
as (attribute keyword, action) pairs - never the values, which may be patient data.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.config import RAISE
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from preprocessing.series import TYPE2_RESULT_ATTRIBUTES

# Attributes the result objects must carry even when empty (Type 2 in SR / GSPS / SEG).
TYPE2 = frozenset(TYPE2_RESULT_ATTRIBUTES)
# Values that name a record: cutting one would point at another patient, order or device.
IDENTIFIERS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "StudyID",
        "DeviceSerialNumber",
        "StationName",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
    }
)
# The UIDs the gateway itself identifies studies and series by are validated at receive time.
KEEP = frozenset({"SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"})
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
)
MAX_LENGTH = {
    "AE": 16,
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "ST": 1024,
    "LT": 10240,
    "UC": 2**32 - 2,
    "UT": 2**32 - 2,
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # keeps TAB, LF, FF, CR
_ACR_NEMA_DATE = re.compile(r"^(\d{4})[-.](\d{2})[-.](\d{2})$")
_ACR_NEMA_TIME = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")


@dataclass
class HeaderRepairs:
    """What hygiene changed in one series' headers: (keyword, action) with action "dropped", "repaired"
    or "truncated", once per attribute however many images carried it."""

    actions: set[tuple[str, str]] = field(default_factory=set)

    def add(self, keyword: str, action: str) -> None:
        self.actions.add((keyword, action))

    def as_list(self) -> list[str]:
        return [f"{keyword}: {action}" for keyword, action in sorted(self.actions)]

    def __bool__(self) -> bool:
        return bool(self.actions)


@functools.lru_cache(maxsize=8192)
def _valid(vr: str, value: str) -> bool:
    """Whether ``value`` passes ``vr`` (cached: the slices of a series repeat the same patient and study values)."""
    try:
        validate_value(vr, value, RAISE)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def _iso2022(ds: Dataset) -> bool:
    charsets = ds.get("SpecificCharacterSet", "")
    values = [charsets] if isinstance(charsets, str) else list(charsets)
    return any("2022" in str(v) for v in values)


def _strip_controls(vr: str, text: str, *, keep_escape: bool) -> str:
    pattern = _CONTROL_TEXT if vr in ("ST", "LT", "UT") else _CONTROL
    if keep_escape:
        return pattern.sub(lambda m: m.group() if m.group() == "\x1b" else "", text)
    return pattern.sub("", text)


def _repair_one(keyword: str, vr: str, text: str) -> tuple[str | None, str]:
    """(clean value or None to drop, action) for one invalid value of a single-valued text attribute."""
    if vr == "DA" and (m := _ACR_NEMA_DATE.match(text.strip())):
        candidate = "".join(m.groups())
        return (candidate, "repaired") if _valid("DA", candidate) else (None, "dropped")
    if vr == "TM" and (m := _ACR_NEMA_TIME.match(text.strip())):
        candidate = "".join(part or "" for part in m.groups())
        return (candidate, "repaired") if _valid("TM", candidate) else (None, "dropped")
    if vr == "CS" and _valid("CS", text.upper()):
        return text.upper(), "repaired"
    if vr == "UI":
        candidate = text.replace(" ", "").replace("\0", "").rstrip(".")
        return (candidate, "repaired") if candidate and _valid("UI", candidate) else (None, "dropped")
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(text) > limit and keyword not in IDENTIFIERS:
        candidate = text[:limit].rstrip()
        return (candidate, "truncated") if _valid(vr, candidate) else (None, "dropped")
    if vr == "PN":
        groups = text.split("=")
        if any(len(g) > 64 for g in groups) and keyword not in IDENTIFIERS:
            candidate = "=".join(g[:64] for g in groups)
            return (candidate, "truncated") if _valid("PN", candidate) else (None, "dropped")
    return None, "dropped"


def clean_header(ds: Dataset, repairs: HeaderRepairs) -> Dataset:
    """``ds`` itself when every top-level text value passes its VR, else a corrected copy (the module's rules);
    a clean header - the common case - is not copied."""
    clean = ds
    keep_escape = _iso2022(ds)
    for element in list(ds):
        keyword = element.keyword
        vr = element.VR
        if not keyword or keyword in KEEP or vr not in TEXT_VRS or element.value in (None, ""):
            continue
        multi = element.VM > 1 and vr not in ("LT", "ST", "UT")
        values = list(element.value) if multi else [element.value]
        cleaned: list[object] = []
        changed = False
        for value in values:
            text = str(value)
            stripped = _strip_controls(vr, text, keep_escape=keep_escape)
            if stripped != text:
                repairs.add(keyword, "control characters removed")
                changed = True
            if _valid(vr, stripped):
                cleaned.append(stripped)
                continue
            fixed, action = _repair_one(keyword, vr, stripped)
            repairs.add(keyword, action)
            changed = True
            if fixed is not None:
                cleaned.append(fixed)
        if not changed:
            continue
        if clean is ds:
            clean = copy.deepcopy(ds)
        if not cleaned:
            if keyword in TYPE2:
                clean[element.tag].value = ""
            else:
                del clean[element.tag]
        else:
            clean[element.tag].value = cleaned if multi else cleaned[0]
    if str(clean.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        clean.get("DeidentificationMethod") or clean.get("DeidentificationMethodCodeSequence")
    ):
        # YES requires the de-identification method (Type 1C), which the sender did not record: drop the YES.
        if clean is ds:
            clean = copy.deepcopy(ds)
        del clean.PatientIdentityRemoved
        repairs.add("PatientIdentityRemoved", "dropped (no de-identification method)")
    return clean


def clean_headers(headers: Sequence[Dataset]) -> tuple[tuple[Dataset, ...], HeaderRepairs]:
    """Clean every header of one series; the repairs are listed once per attribute and action."""
    repairs = HeaderRepairs()
    return tuple(clean_header(ds, repairs) for ds in headers), repairs
