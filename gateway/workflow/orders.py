"""An order as the RIS sends it (ORM^O01, OMI^O23) and its durable store in the system of record.

Where each value is read (the first that is present wins):

    accession number   IPC-1 (OMI), OBR-18 (placer field 1, where most RIS put it), OBR-3.1 (filler order number)
    priority           TQ1-9 (v2.5), ORC-7.6, OBR-27.6 (quantity/timing, v2.3): S = STAT, A = ASAP (URGENT),
                       R = ROUTINE; also the words STAT / ASAP / URGENT / ROUTINE
    reason for exam    OBR-31 (text, else its code)
    procedure          OBR-4 (code, text); OMI: also IPC-... (the requested procedure is OBR-4 there as well)
    study              IPC-3 (Study Instance UID), when the order names it
    status             ORC-1: CA / OC / DC (cancelled or discontinued) -> cancelled; NW / XO / SC / anything else ->
                       active
    patient            PID-3.1 with its assigning authority PID-3.4, kept only as a SHA-256 (never the ID itself)
    expected images    HL7 v2 has no standard field for it: the field ``[orders] expected_images_field`` names
                       (OBR-37 by default, where several RIS put it); a positive whole number, else none

An order without an accession number is an error (AE): there is nothing to key it by.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from sqlalchemy import Engine, select

from gateway.database.connect import upsert
from gateway.database.schema import orders as orders_table
from gateway.workflow.hl7v2 import Er7Message

PRIORITY_CODES = {"S": "STAT", "STAT": "STAT", "A": "URGENT", "ASAP": "URGENT", "URGENT": "URGENT"}
PRIORITY_CODES |= {"R": "ROUTINE", "ROUTINE": "ROUTINE", "T": "URGENT"}  # T: timing critical
CANCELLED = {"CA", "OC", "DC", "CR", "OD"}
ORDER_MESSAGES = {("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19")}


class OrderError(ValueError):
    """An order message that lacks what an order needs (the reason is said to the sender in ERR)."""


@dataclass(frozen=True, kw_only=True)
class Order:
    accession_number: str
    patient_key: str
    study_uid: str
    priority: str
    reason: str
    procedure_code: str
    procedure_text: str
    status: str
    message_type: str  # ORM^O01 | OMI^O23 | MWL (found by a worklist query)
    control_id: str
    expected_images: int | None = None  # the study closes once this many images are in the spool


def field_spec(text: str) -> tuple[str, int, int] | None:
    """``"OBR-37"`` or ``"ZDS-2.1"`` (checked by the settings) -> (segment, field, component); None for ``""``."""
    if not text:
        return None
    segment, _, rest = text.upper().partition("-")
    field, _, component = rest.partition(".")
    return segment, int(field), int(component or "1")


def _expected_images(message: Er7Message, spec: tuple[str, int, int] | None) -> int | None:
    if spec is None:
        return None
    text = message.get(*spec).strip()
    return int(text) if text.isdigit() and 0 < int(text) <= 1_000_000 else None


def patient_key(patient_id: str, authority: str) -> str:
    if not patient_id:
        return ""
    return hashlib.sha256(f"{authority}|{patient_id}".encode()).hexdigest()


def _priority(message: Er7Message) -> str:
    for value in (message.get("TQ1", 9), message.get("ORC", 7, 6), message.get("OBR", 27, 6)):
        code = value.strip().upper()
        if code:
            return PRIORITY_CODES.get(code, "ROUTINE")
    return "ROUTINE"


def order_from_message(message: Er7Message, expected_images_field: str = "OBR-37") -> Order:
    kind = message.message_type
    accession = next(
        (v for v in (message.get("IPC", 1), message.get("OBR", 18), message.get("OBR", 3)) if v.strip()), ""
    ).strip()
    if not accession:
        raise OrderError("no accession number (IPC-1, OBR-18 or OBR-3)")
    if len(accession) > 64:
        raise OrderError("the accession number is longer than 64 characters")
    study_uid = message.get("IPC", 3).strip()
    if study_uid and (len(study_uid) > 64 or not all(c.isdigit() or c == "." for c in study_uid)):
        raise OrderError("IPC-3 is not a Study Instance UID")
    return Order(
        accession_number=accession,
        patient_key=patient_key(message.get("PID", 3, 1).strip(), message.get("PID", 3, 4).strip()),
        study_uid=study_uid,
        priority=_priority(message),
        reason=(message.get("OBR", 31, 2) or message.get("OBR", 31, 1)).strip()[:1000],
        procedure_code=message.get("OBR", 4, 1).strip()[:64],
        procedure_text=message.get("OBR", 4, 2).strip()[:1000],
        status="cancelled" if message.get("ORC", 1).strip().upper() in CANCELLED else "active",
        message_type=f"{kind[0]}^{kind[1]}",
        control_id=message.control_id[:64],
        expected_images=_expected_images(message, field_spec(expected_images_field)),
    )


class OrderStore:
    """Orders in the system of record. Blocking: call from an executor, never from the event loop."""

    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node

    def save(self, order: Order) -> None:
        """Insert or update the order of this accession number; committed (durable) before it returns."""
        now = time.time()
        values = {**order.__dict__, "received_at": now, "updated_at": now, "node": self.node}
        with self.engine.begin() as connection:
            insert = upsert(connection, orders_table).values(**values)
            changed = {k: insert.excluded[k] for k in values if k not in ("accession_number", "received_at")}
            connection.execute(
                insert.on_conflict_do_update(index_elements=["accession_number"], set_=changed)
            )

    def for_study(self, accession_number: str, study_uid: str) -> Order | None:
        """The active order of a study: by its accession number, else one that names its Study Instance UID."""
        order = self.find(accession_number)
        if order is None and study_uid:
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(orders_table.c.accession_number).where(orders_table.c.study_uid == study_uid)
                ).first()
            order = self.find(row[0]) if row is not None else None
        return order if order is not None and order.status == "active" else None

    def find(self, accession_number: str) -> Order | None:
        if not accession_number:
            return None
        with self.engine.connect() as connection:
            row = connection.execute(
                select(orders_table).where(orders_table.c.accession_number == accession_number)
            ).first()
        if row is None:
            return None
        fields = {k: v for k, v in row._mapping.items() if k in Order.__dataclass_fields__}
        return Order(**fields)
