"""UPS tasks pushed to the gateway (IHE AIW-I): the workitems a worklist manager asked the gateway to perform,
kept before their N-CREATE is answered. Blocking: association threads, the retrieval thread, report building."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from gateway.database.schema import ups_tasks as table

FINAL_STATES = ("COMPLETED", "CANCELED")


@dataclass(frozen=True, kw_only=True)
class UpsTask:
    workitem_uid: str
    study_uid: str
    source_ae: str
    requester_ae: str
    state: str
    priority: str
    outputs: list[list[str]]  # [SOP class, SOP instance, series] of every object stored for the study
    detail: str


class TaskStore:
    def __init__(self, engine: Engine, node: str) -> None:
        self.engine = engine
        self.node = node

    def create(self, task: UpsTask) -> bool:
        """Keep a new task; False when a workitem of that UID exists already."""
        now = time.time()
        values = {**task.__dict__, "created_at": now, "updated_at": now, "node": self.node}
        try:
            with self.engine.begin() as connection:
                connection.execute(table.insert().values(**values))
        except IntegrityError:
            return False
        return True

    def get(self, workitem_uid: str) -> UpsTask | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(table).where(table.c.workitem_uid == workitem_uid)).first()
        return _task(row) if row is not None else None

    def move(
        self,
        workitem_uid: str,
        state: str,
        *,
        detail: str = "",
        outputs: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """The task's new state (never out of a final one)."""
        values: dict[str, object] = {"state": state, "detail": detail[:1000], "updated_at": time.time()}
        if outputs is not None:
            values["outputs"] = [list(o) for o in outputs]
        with self.engine.begin() as connection:
            connection.execute(
                update(table)
                .where(table.c.workitem_uid == workitem_uid, table.c.state.not_in(FINAL_STATES))
                .values(**values)
            )

    def open_for_study(self, study_uid: str) -> list[UpsTask]:
        """The study's tasks that are not completed or canceled."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(table).where(table.c.study_uid == study_uid, table.c.state.not_in(FINAL_STATES))
            ).all()
        return [_task(r) for r in rows]


def _task(row: object) -> UpsTask:
    m = row._mapping  # type: ignore[attr-defined]
    return UpsTask(**{k: m[k] for k in UpsTask.__dataclass_fields__})
