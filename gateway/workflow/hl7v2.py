"""HL7 v2 messages in ER7 (pipe) encoding: parsing that never raises on odd input beyond ``Hl7Error``, field
access by segment and position (1-based, as the standard numbers them), and acknowledgements.

Acknowledgement rules (HL7 v2.5 section 2.9): a message whose MSH-15 (accept acknowledgment type) is empty is
in *original* mode and always gets an ACK with MSA-1 AA (accepted), AE (error: the message was understood but
could not be processed) or AR (rejected: not a message we take, or malformed). With MSH-15 set the sender asked
for *enhanced* accept acknowledgements: CA / CE / CR, sent when MSH-15 says so - AL always, NE never, ER only on
an error or reject, SU only on success. A rejection or error carries the reason in ERR-8 (user message) and an
HL7 error code in ERR-3 (table 0357).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from gateway.core.errors import GatewayError

ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


class Hl7Error(GatewayError):
    """A message that cannot be read as HL7 v2 (no MSH, bad delimiters)."""


@dataclass(frozen=True)
class Segment:
    name: str
    fields: tuple[str, ...]  # fields[n] is field n (fields[0] is the name); MSH is numbered from MSH-1 = "|"


class Er7Message:
    def __init__(self, text: str) -> None:
        text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x0b\x1c ")
        if not text.startswith("MSH") or len(text) < 8:
            raise Hl7Error("not an HL7 v2 message: it does not start with an MSH segment")
        self.field_sep = text[3]
        encoding = text[4:8]
        if self.field_sep.isalnum() or len(set(encoding + self.field_sep)) < 5:
            raise Hl7Error("MSH-1 / MSH-2 do not define five distinct delimiters")
        self.component_sep, self.repetition_sep = encoding[0], encoding[1]
        self.escape_char, self.subcomponent_sep = encoding[2], encoding[3]
        self.segments: list[Segment] = []
        for raw in text.split("\r"):
            if not raw.strip():
                continue
            parts = raw.split(self.field_sep)
            name = parts[0]
            if len(name) != 3 or not name.isalnum():
                raise Hl7Error(f"a segment name is not three letters or digits: {name[:8]!r}")
            if name == "MSH":  # MSH-1 is the separator itself; MSH-2 the encoding characters
                parts = ["MSH", self.field_sep, *parts[1:]]
            self.segments.append(Segment(name, tuple(parts)))

    def segment(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def get(self, name: str, field: int, component: int = 1, repetition: int = 1) -> str:
        """The unescaped value at NAME-field.component (1-based), of the first segment NAME; '' when absent."""
        segment = self.segment(name)
        if segment is None or field >= len(segment.fields):
            return ""
        value = segment.fields[field]
        if name == "MSH" and field <= 2:
            return value
        repetitions = value.split(self.repetition_sep)
        if repetition > len(repetitions):
            return ""
        components = repetitions[repetition - 1].split(self.component_sep)
        if component > len(components):
            return ""
        return self.unescape(components[component - 1].split(self.subcomponent_sep)[0])

    def unescape(self, value: str) -> str:
        if self.escape_char not in value:
            return value
        out, i = [], 0
        while i < len(value):
            if value[i] == self.escape_char:
                end = value.find(self.escape_char, i + 1)
                if end > i and value[i + 1 : end] in ESCAPES:
                    out.append(ESCAPES[value[i + 1 : end]])
                    i = end + 1
                    continue
            out.append(value[i])
            i += 1
        return "".join(out)

    @property
    def encoding(self) -> str:
        """MSH-2: component, repetition, escape and subcomponent characters."""
        return f"{self.component_sep}{self.repetition_sep}{self.escape_char}{self.subcomponent_sep}"

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("ORM", "O01")."""
        return self.get("MSH", 9, 1).upper(), self.get("MSH", 9, 2).upper()

    @property
    def control_id(self) -> str:
        return self.get("MSH", 10)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the receiver made of a message: accepted, an error (understood, not processed) or rejected."""

    status: str  # "accepted" | "error" | "rejected"
    reason: str = ""
    error_code: str = (
        ""  # HL7 table 0357: 100 segment sequence, 101 required field missing, 200 unsupported ...
    )


ORIGINAL = {"accepted": "AA", "error": "AE", "rejected": "AR"}
ENHANCED = {"accepted": "CA", "error": "CE", "rejected": "CR"}


def escape(value: str, field_sep: str, encoding: str) -> str:
    """``value`` escaped for a message with these delimiters (and line breaks made spaces), so a value we write
    never breaks the message's structure."""
    esc = encoding[2]
    codes = {esc: "E", field_sep: "F", encoding[0]: "S", encoding[1]: "R", encoding[3]: "T"}
    return "".join(" " if ch in "\r\n" else (f"{esc}{codes[ch]}{esc}" if ch in codes else ch) for ch in value)


def acknowledgement(
    message: Er7Message | None, outcome: Outcome, *, application: str, facility: str
) -> str | None:
    """The ACK to send for ``message`` (None: MSH-15 asked for none in this case)."""
    mode = message.get("MSH", 15).upper() if message is not None else ""
    if mode:
        wanted = {
            "AL": True,
            "NE": False,
            "ER": outcome.status != "accepted",
            "SU": outcome.status == "accepted",
        }
        if not wanted.get(mode, True):
            return None
        code = ENHANCED[outcome.status]
    else:
        code = ORIGINAL[outcome.status]
    sep, encoding = (message.field_sep, message.encoding) if message is not None else ("|", "^~\\&")

    def clean(value: str) -> str:
        return escape(value, sep, encoding)

    sender = (message.get("MSH", 5), message.get("MSH", 6)) if message is not None else ("", "")
    receiver = (message.get("MSH", 3), message.get("MSH", 4)) if message is not None else ("", "")
    version = (message.get("MSH", 12) if message is not None else "") or "2.5"
    trigger = message.message_type[1] if message is not None else ""
    msh = sep.join(
        [
            "MSH",
            encoding,
            clean(sender[0] or application),
            clean(sender[1] or facility),
            clean(receiver[0]),
            clean(receiver[1]),
            time.strftime("%Y%m%d%H%M%S"),
            "",
            f"ACK{encoding[0]}{clean(trigger)}{encoding[0]}ACK",
            uuid.uuid4().hex[:20],
            "P",
            clean(version),
        ]
    )
    msa = sep.join(["MSA", code, clean(message.control_id if message is not None else "")])
    segments = [msh, msa]
    if outcome.status != "accepted":
        severity = "E"
        segments.append(
            sep.join(
                [
                    "ERR",
                    "",
                    "",
                    f"{outcome.error_code or '207'}",
                    severity,
                    "",
                    "",
                    "",
                    clean(outcome.reason)[:200],
                ]
            )
        )
    return "\r".join(segments) + "\r"
