"""The system of record's writer and queries on both backends: a study's life as the flow reports it becomes
its state, its timeline, its analyses, jobs and deliveries; the state machine refuses moves it does not allow;
a database that cannot be written holds the writes, in order, until it can."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from gateway.core.domain import InstanceRecord
from gateway.database import migrate, schema
from gateway.database.connect import engine_for
from gateway.database.jobs import QueuedJob, RoutedStudy, job_id
from gateway.database.queries import StudyFilter, list_studies, study_timeline
from gateway.database.recorder import Recorder
from gateway.database.states import StudyState, allowed

STUDY, SERIES = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(engine, "node-a").start()
    yield recorder
    recorder.close()


def _instance(n: int, at: float, study: str = STUDY, ae: str = "PACS_B") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{study}.9.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study,
        series_instance_uid=SERIES,
        path=Path(f"/spool/{study}/{n}.dcm"),
        calling_ae=ae,
        received_at=at,
        modality="CT",
    )


def _event(recorder: Recorder, event: str, at: float, **fields: object) -> None:
    recorder.audit_event({"time": at, "event": event, **fields})


def _route(recorder: Recorder, at: float, study: str = STUDY, priority: str = "STAT", jobs: int = 1) -> None:
    routed = RoutedStudy(
        study_uid=study,
        calling_ae="PACS_B",
        priority=priority,
        instances=3,
        series=1,
        first_received_at=at - 12,
        last_received_at=at - 10,
    )
    queued = [
        QueuedJob(
            job_id=job_id(study, SERIES, "ct"),
            study_uid=study,
            series_uid=SERIES,
            pipeline="ct",
            priority=priority,
            calling_ae="PACS_B",
            cost=3,
            deadline_s=60.0,
        )
    ][:jobs]
    recorder.study_routed(routed, queued, skipped=1 - jobs, at=at)


def test_a_study_life_becomes_its_state_and_timeline(engine: Engine, recorder: Recorder) -> None:
    t0 = time.time() - 100
    for n in range(3):
        recorder.instance_stored(_instance(n, t0 + n))
    _route(recorder, t0 + 12)
    recorder.job_started(job_id(STUDY, SERIES, "ct"), STUDY, 1, t0 + 15)
    _event(
        recorder,
        "delivery_queued",
        t0 + 19,
        study=STUDY,
        job="j1",
        destination="PACS_B@127.0.0.1:104",
        objects=3,
    )
    _event(
        recorder,
        "series_analysed",
        t0 + 20,
        study=STUDY,
        series=SERIES,
        pipeline="ct",
        model="ct_head_hyperdensity",
        model_version="1",
        model_sha256="ab" * 32,
        algorithm_version="0.1.0",
        findings=2,
        stat=True,
        results=["1.2.3.1", "1.2.3.2"],
        infer_ms=250.0,
    )
    _event(recorder, "study_done", t0 + 21, study=STUDY, series=1, skipped=0, failed=0, findings=2, stat=True)
    assert recorder.flush()
    assert list_studies(engine, StudyFilter())[0].state == "results_stored"  # the delivery is still pending
    _event(recorder, "results_delivered", t0 + 25, study=STUDY, job="j1", destination="PACS_B@127.0.0.1:104")
    assert recorder.flush()

    [row] = list_studies(engine, StudyFilter(state="delivered", priority="stat", pacs="PACS_B"))
    assert (row.instances, row.findings, row.stat, row.node) == (3, 2, True, "node-a")
    assert row.wait_s == pytest.approx(3.0)  # complete at +12, analysis started at +15
    timeline = study_timeline(engine, STUDY)
    assert timeline is not None
    stages = [step.stage for step in timeline.steps]
    assert [s for s in stages if s in {x.value for x in StudyState}] == [
        "receiving",
        "complete",
        "queued",
        "analysing",
        "results_stored",
        "delivered",
    ]
    assert "series_analysed" in stages and "results_delivered" in stages
    assert [step.at for step in timeline.steps] == sorted(step.at for step in timeline.steps)
    [analysis] = timeline.analyses
    assert (analysis["model_name"], analysis["model_version"], analysis["outcome"]) == (
        "ct_head_hyperdensity",
        "1",
        "analysed",
    )
    assert analysis["result_uids"] == ["1.2.3.1", "1.2.3.2"] and analysis["timings"] == {"infer_ms": 250.0}
    [job] = timeline.jobs
    assert (job["state"], job["attempts"], job["deadline_at"] - job["enqueued_at"]) == ("done", 1, 60.0)
    assert [d["state"] for d in timeline.deliveries] == ["delivered"]
    with engine.connect() as c:  # every audit event is in the append-only table too
        events = c.execute(select(schema.audit_events.c.event)).scalars().all()
    assert sorted(events) == sorted(["delivery_queued", "series_analysed", "study_done", "results_delivered"])


def test_queries_filter_by_state_priority_pacs_time_and_wait(engine: Engine, recorder: Recorder) -> None:
    now = time.time()
    studies = [f"{STUDY}.{i}" for i in range(4)]
    for i, study in enumerate(studies):
        recorder.instance_stored(_instance(0, now - 1000 + i, study=study))
        _route(recorder, now - 900 + i, study=study, priority="STAT" if i % 2 else "ROUTINE")
    recorder.job_started(job_id(studies[1], SERIES, "ct"), studies[1], 1, now - 899 + 10)  # waited 10 s
    assert recorder.flush()
    assert len(list_studies(engine, StudyFilter())) == 4
    assert {r.study_uid for r in list_studies(engine, StudyFilter(priority="STAT"))} == {
        studies[1],
        studies[3],
    }
    # "Which STAT studies from PACS_B waited more than 2 minutes?" - the one still queued for 15 minutes.
    waited = list_studies(
        engine, StudyFilter(priority="STAT", pacs="PACS_B", waited_more_than_s=120), now=now
    )
    assert [r.study_uid for r in waited] == [studies[3]]
    assert list_studies(engine, StudyFilter(pacs="OTHER")) == []
    assert len(list_studies(engine, StudyFilter(since=now - 910.5))) == 2  # first received at now - 912 + i
    assert list_studies(engine, StudyFilter(state="analysing"))[0].study_uid == studies[1]
    assert study_timeline(engine, "1.2.3.4.5.6.7") is None


def test_a_late_instance_reopens_the_study_and_a_dead_letter_fails_it(
    engine: Engine, recorder: Recorder
) -> None:
    t0 = time.time() - 100
    recorder.instance_stored(_instance(0, t0))
    _route(recorder, t0 + 12)
    _event(recorder, "study_done", t0 + 20, study=STUDY, series=1, skipped=0, failed=0)
    recorder.instance_stored(_instance(1, t0 + 30))  # a late instance: back to receiving
    assert recorder.flush()
    assert list_studies(engine, StudyFilter())[0].state == "receiving"
    _route(recorder, t0 + 42)
    _event(recorder, "delivery_queued", t0 + 43, study=STUDY, job="j2", destination="X")
    _event(recorder, "study_done", t0 + 50, study=STUDY, series=1, skipped=0, failed=0)
    _event(
        recorder, "delivery_dead_letter", t0 + 60, study=STUDY, job="j2", destination="X", reason="refused"
    )
    assert recorder.flush()
    row = list_studies(engine, StudyFilter())[0]
    assert (row.state, row.detail) == ("failed", "delivery to X dead-lettered")
    timeline = study_timeline(engine, STUDY)
    assert timeline is not None
    assert [s.stage for s in timeline.steps if s.stage in ("receiving", "complete")] == [
        "receiving",
        "complete",
        "receiving",
        "complete",
    ]


def test_a_study_no_pipeline_applies_to_is_skipped(engine: Engine, recorder: Recorder) -> None:
    recorder.instance_stored(_instance(0, time.time() - 20))
    _route(recorder, time.time() - 5, jobs=0)
    _event(recorder, "study_done", time.time(), study=STUDY, series=1, skipped=1, failed=0)
    assert recorder.flush()
    assert list_studies(engine, StudyFilter())[0].state == "skipped"


def test_the_state_machine_only_moves_forward_or_reopens() -> None:
    S = StudyState
    assert allowed(S.QUEUED, S.ANALYSING) and allowed(S.RESULTS_STORED, S.DELIVERED)
    assert not allowed(S.DELIVERED, S.ANALYSING)
    assert not allowed(S.ANALYSING, S.QUEUED)
    assert not allowed(None, S.COMPLETE)
    assert all(allowed(state, S.RECEIVING) for state in S if state is not S.RECEIVING)


def test_writes_wait_while_postgres_is_down_and_catch_up_in_order(postgres: object) -> None:
    from tests.support.postgres import PostgresCluster

    assert isinstance(postgres, PostgresCluster)
    engine = engine_for(postgres.create_database())
    migrate.upgrade(engine)
    recorder = Recorder(engine, "node-a").start()
    try:
        postgres.stop()
        t0 = time.time() - 100
        for n in range(50):
            recorder.instance_stored(_instance(n, t0 + n * 0.01))  # never blocks, database or not
        _route(recorder, t0 + 12)
        deadline = time.time() + 20
        while not recorder.last_error and time.time() < deadline:
            time.sleep(0.1)
        assert recorder.last_error and recorder.backlog >= 51
        postgres.restart()
        assert recorder.flush(timeout_s=60)
        assert recorder.last_error == "" and recorder.backlog == 0
        [row] = list_studies(engine, StudyFilter())
        assert (row.state, row.instances) == ("queued", 3)
        with engine.connect() as c:
            assert c.execute(select(schema.instances.c.sop_instance_uid)).scalars().all().__len__() == 50
    finally:
        recorder.close()
        engine.dispose()


def test_a_commit_callback_runs_once_the_routed_jobs_are_in_the_database(
    engine: Engine, recorder: Recorder
) -> None:
    """What the cluster queue wakes its workers with: a claim made in the callback finds the study's job (a
    wake-up at routing time came before the commit and found nothing, then slept for poll_s)."""
    seen: list[list[str]] = []
    called = threading.Event()

    def committed() -> None:  # on the writer's thread, as the cluster queue's callback is
        with engine.connect() as c:
            seen.append(
                [r[0] for r in c.execute(select(schema.jobs.c.state).where(schema.jobs.c.study_uid == STUDY))]
            )
        called.set()

    _route(recorder, time.time())
    recorder.after_commit(committed)
    assert called.wait(10)
    assert seen == [["queued"]]

    def broken() -> None:
        raise RuntimeError("a callback that fails")

    recorder.after_commit(broken)  # its failure is its own: the writer goes on
    _route(recorder, time.time(), study=STUDY + ".2")
    assert recorder.flush(10) and recorder.last_error == ""
