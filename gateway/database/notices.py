"""Completeness notices (MPPS steps, IANs) in the system of record: written before their DIMSE answer, read
back after a restart. Blocking: called on the receiver's association threads and at start-up."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine, select

from gateway.database.connect import upsert
from gateway.database.schema import completion_notices as table


@dataclass(frozen=True, kw_only=True)
class StoredNotice:
    notice_uid: str
    kind: str  # MPPS | IAN
    study_uid: str
    status: str  # IN PROGRESS | COMPLETED | DISCONTINUED | AVAILABLE
    expected: frozenset[str]
    updated_at: float


class NoticeStore:
    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node

    def save(self, notice_uid: str, kind: str, study_uid: str, status: str, expected: Iterable[str]) -> None:
        values = {
            "notice_uid": notice_uid,
            "kind": kind,
            "study_uid": study_uid,
            "status": status,
            "expected": sorted(expected),
            "updated_at": time.time(),
            "node": self.node,
        }
        with self.engine.begin() as connection:
            insert = upsert(connection, table).values(**values)
            changed = {k: insert.excluded[k] for k in values if k != "notice_uid"}
            connection.execute(insert.on_conflict_do_update(index_elements=["notice_uid"], set_=changed))

    def find(self, notice_uid: str) -> StoredNotice | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(table).where(table.c.notice_uid == notice_uid)).first()
        return _notice(row) if row is not None else None

    def for_studies(self, study_uids: Iterable[str]) -> list[StoredNotice]:
        """The notices of these studies, oldest first."""
        wanted = sorted(set(study_uids))
        found: list[StoredNotice] = []
        with self.engine.connect() as connection:
            for start in range(0, len(wanted), 500):
                rows = connection.execute(
                    select(table).where(table.c.study_uid.in_(wanted[start : start + 500]))
                ).all()
                found.extend(_notice(r) for r in rows)
        return sorted(found, key=lambda n: n.updated_at)


def _notice(row: object) -> StoredNotice:
    m = row._mapping  # type: ignore[attr-defined]
    return StoredNotice(
        notice_uid=m["notice_uid"],
        kind=m["kind"],
        study_uid=m["study_uid"],
        status=m["status"],
        expected=frozenset(m["expected"] or []),
        updated_at=m["updated_at"],
    )
