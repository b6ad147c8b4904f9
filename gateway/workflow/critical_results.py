"""The critical-results ledger: every notification of a critical AI finding, its escalation and its
acknowledgement, in the system of record. Blocking: call from a thread, never from the event loop.

A study's ladder is one row per level. The row is inserted *before* its message is sent, under a unique key on
(study, level): whichever node or restart tries again finds it and sends nothing, so a study never gets two
messages at one level. A node that dies between the insert and the send leaves the row ``sending``; once the
acknowledgement time has passed it counts as unanswered and the next level is told - a lost message is escalated,
never repeated. Acknowledging stops the ladder; when it runs out, a last ``unanswered`` row (no message) says so,
once.

Acknowledgement links are signed (HMAC-SHA256 over study, level and expiry with the site's key), so a link in an
e-mail acknowledges exactly that study and nothing else, and only until it expires.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from gateway.core.durable import atomic_write
from gateway.database.schema import critical_results as table

OPEN_STATES = ("sending", "notified", "failed")
CLOSED_STATES = ("acknowledged", "unanswered")


@dataclass(frozen=True, kw_only=True)
class CriticalRow:
    study_uid: str
    level: int
    contact: str
    channels: str
    state: str
    calling_ae: str
    sr_uid: str
    results_stored_at: float
    created_at: float
    notified_at: float | None
    acknowledged_at: float | None
    acknowledged_by: str
    summary: dict[str, Any]
    detail: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class Acknowledgement:
    row: CriticalRow
    first: bool  # False: the study had been acknowledged before (by ``row.acknowledged_by``)


def _row(mapping: Any) -> CriticalRow:
    return CriticalRow(**{k: mapping[k] for k in CriticalRow.__dataclass_fields__})


class CriticalLedger:
    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node

    def open_level(
        self,
        study_uid: str,
        level: int,
        *,
        contact: str,
        channels: str,
        calling_ae: str,
        sr_uid: str,
        results_stored_at: float,
        summary: dict[str, Any],
        state: str = "sending",
        now: float | None = None,
    ) -> bool:
        """Claim the message of this study and level; False when it was claimed before (send nothing)."""
        values = {
            "study_uid": study_uid,
            "level": level,
            "contact": contact[:128],
            "channels": channels,
            "state": state,
            "calling_ae": calling_ae,
            "sr_uid": sr_uid,
            "results_stored_at": results_stored_at,
            "created_at": time.time() if now is None else now,
            "summary": summary,
            "node": self.node,
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(table.insert().values(**values))
        except IntegrityError:
            return False
        return True

    def sent(self, study_uid: str, level: int, *, ok: bool, detail: str, at: float | None = None) -> None:
        """The level's message went out on at least one channel (``ok``), or on none."""
        values: dict[str, Any] = {"state": "notified" if ok else "failed", "detail": detail[:1000]}
        if ok:
            values["notified_at"] = time.time() if at is None else at
        with self.engine.begin() as connection:
            connection.execute(
                update(table)
                .where(table.c.study_uid == study_uid, table.c.level == level, table.c.state == "sending")
                .values(**values)
            )

    def rows(self, study_uid: str) -> list[CriticalRow]:
        with self.engine.connect() as connection:
            found = connection.execute(
                select(table).where(table.c.study_uid == study_uid).order_by(table.c.level)
            ).all()
        return [_row(r._mapping) for r in found]

    def acknowledge(self, study_uid: str, by: str, at: float | None = None) -> Acknowledgement | None:
        """Acknowledge the study's critical result (its highest level so far); None when it has none. A second
        acknowledgement changes nothing and says who was first."""
        at = time.time() if at is None else at
        with self.engine.begin() as connection:
            done = connection.execute(
                select(table).where(table.c.study_uid == study_uid, table.c.state == "acknowledged")
            ).first()
            if done is not None:
                return Acknowledgement(row=_row(done._mapping), first=False)
            top = connection.execute(
                select(table)
                .where(table.c.study_uid == study_uid, table.c.state != "unanswered")
                .order_by(table.c.level.desc())
                .limit(1)
                .with_for_update()
            ).first()
            if top is None:
                return None
            changed = connection.execute(
                update(table)
                .where(table.c.id == top.id, table.c.state.in_(OPEN_STATES))
                .values(state="acknowledged", acknowledged_at=at, acknowledged_by=by[:128])
            ).rowcount
        if changed != 1:  # acknowledged at this moment by someone else
            return self.acknowledge(study_uid, by, at)
        [row] = [r for r in self.rows(study_uid) if r.level == top.level]
        return Acknowledgement(row=row, first=True)

    def due(self, ack_timeout_s: float, now: float | None = None) -> list[CriticalRow]:
        """Each unacknowledged study's top row that the next level is due for: failed on every channel, or not
        acknowledged ``ack_timeout_s`` after its message was started."""
        now = time.time() if now is None else now
        closed = select(table.c.study_uid).where(table.c.state.in_(CLOSED_STATES))
        with self.engine.connect() as connection:
            found = connection.execute(
                select(table)
                .where(table.c.state.in_(OPEN_STATES), table.c.study_uid.not_in(closed))
                .order_by(table.c.study_uid, table.c.level)
            ).all()
        top: dict[str, CriticalRow] = {}
        for r in found:
            top[r.study_uid] = _row(r._mapping)  # the highest level last
        return [row for row in top.values() if row.state == "failed" or now - row.created_at >= ack_timeout_s]


class LinkSigner:
    """Signs and checks acknowledgement links: ``study|level|expires`` under an HMAC-SHA256 key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the link key must be at least 16 bytes")
        self.key = key

    @classmethod
    def from_file(cls, path: Path) -> LinkSigner:
        """The key in ``path``; made (32 random bytes, hex, mode 0600) when the file does not exist."""
        if not path.exists():
            atomic_write(path, secrets.token_hex(32).encode())  # mode 0600
        return cls(path.read_bytes().strip())

    def signature(self, study_uid: str, level: int, expires: int) -> str:
        message = f"{study_uid}|{level}|{expires}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def valid(
        self, study_uid: str, level: int, expires: int, signature: str, now: float | None = None
    ) -> str:
        """'' when the link is good, else why not."""
        if (time.time() if now is None else now) > expires:
            return "the link has expired"
        if not hmac.compare_digest(self.signature(study_uid, level, expires), signature):
            return "the link is not valid"
        return ""
