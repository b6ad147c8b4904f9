"""UPS tasks pushed to the gateway, in the system of record on both backends: kept once per workitem, moved
forward, never out of a final state; and what an N-GET of one answers."""

from __future__ import annotations

from sqlalchemy import Engine

from gateway.database.ups_tasks import TaskStore, UpsTask
from gateway.ingest.ups_tasks import workitem_state


def _task(uid: str = "1.2.3.1", study: str = "1.2.3") -> UpsTask:
    return UpsTask(
        workitem_uid=uid, study_uid=study, source_ae="PACS", requester_ae="WL", state="SCHEDULED",
        priority="HIGH", outputs=[], detail="",
    )  # fmt: skip


def test_a_task_is_kept_once_and_never_leaves_a_final_state(engine: Engine) -> None:
    store = TaskStore(engine, "node-a")
    assert store.create(_task()) and not store.create(_task())  # a second N-CREATE of the UID: refused
    store.move("1.2.3.1", "IN PROGRESS", detail="retrieving")
    assert [t.workitem_uid for t in store.open_for_study("1.2.3")] == ["1.2.3.1"]
    store.move(
        "1.2.3.1", "COMPLETED", detail="2 result object(s) stored", outputs=[["1.2.840.1", "9.9.1", "9.9"]]
    )
    store.move("1.2.3.1", "CANCELED", detail="late")  # a final state stays
    task = store.get("1.2.3.1")
    assert task is not None and task.state == "COMPLETED" and task.outputs == [["1.2.840.1", "9.9.1", "9.9"]]
    assert store.open_for_study("1.2.3") == [] and store.get("1.2.3.404") is None


def test_an_n_get_answers_state_priority_and_on_completion_the_outputs() -> None:
    scheduled = workitem_state(_task())
    assert scheduled.ProcedureStepState == "SCHEDULED" and scheduled.ScheduledProcedureStepPriority == "HIGH"
    assert "UnifiedProcedureStepPerformedProcedureSequence" not in scheduled
    done = UpsTask(**{**_task().__dict__, "state": "COMPLETED", "outputs": [["1.2.840.1", "9.9.1", "9.9"]]})
    [performed] = workitem_state(done).UnifiedProcedureStepPerformedProcedureSequence
    [item] = performed.OutputInformationSequence
    assert (
        item.SeriesInstanceUID == "9.9" and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "9.9.1"
    )
