"""The job queue in the database, shared by several gateways (``gateway.database.queue``), on both backends: the
cluster-wide order (STAT first, ageing, fair share per PACS across nodes), study leases (every series of a study on
one node), takeover when a lease expires and never before a node has been connected for a lease, completion once,
a clean stop handing work back, and concurrent claimers never getting the same job."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from gateway.config.settings import SchedulingSettings
from gateway.core.domain import InstanceRecord
from gateway.database import schema
from gateway.database.jobs import QueuedJob, RoutedStudy, job_id
from gateway.database.queue import SharedQueue
from gateway.database.recorder import Recorder

LEASE = 30.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _node(engine: Engine, name: str, clock: Clock, **scheduling: object) -> SharedQueue:
    queue = SharedQueue(engine, name, SchedulingSettings(**scheduling), lease_s=LEASE, clock=clock)
    queue.heartbeat()
    return queue


def _route(
    engine: Engine,
    study: str,
    *,
    series: int = 1,
    priority: str = "ROUTINE",
    pacs: str = "PACS_A",
    at: float,
    cost: int = 10,
    deadline_s: float = 3600.0,
) -> list[str]:
    recorder = Recorder(engine, "router").start()
    jobs = [
        QueuedJob(
            job_id=job_id(study, f"{study}.{n}", "ct"),
            study_uid=study,
            series_uid=f"{study}.{n}",
            pipeline="ct",
            priority=priority,
            calling_ae=pacs,
            cost=cost,
            deadline_s=deadline_s,
        )
        for n in range(1, series + 1)
    ]
    routed = RoutedStudy(
        study_uid=study,
        calling_ae=pacs,
        priority=priority,
        instances=cost * series,
        series=series,
        first_received_at=at - 5,
        last_received_at=at - 1,
    )
    recorder.study_routed(routed, jobs, skipped=0, at=at)
    assert recorder.flush()
    recorder.close()
    return [j.job_id for j in jobs]


def _uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.9.{n}"


def test_stat_goes_first_across_the_cluster_whichever_node_asks(engine: Engine, clock: Clock) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    for n in range(1, 201):  # 200 routine series queued before the STAT study
        _route(engine, _uid(n), at=clock.now - 300 + n)
    _route(engine, _uid(999), priority="STAT", at=clock.now)
    claimed = b.claim()
    assert claimed is not None and claimed.study_uid == _uid(999) and claimed.priority == "STAT"
    routine = a.claim()
    assert routine is not None and routine.study_uid == _uid(1)  # then oldest first
    assert a.claim(stat_only=True) is None  # a STAT-only worker takes nothing else


def test_a_waiting_routine_job_moves_up_to_urgent_after_half_its_deadline(
    engine: Engine, clock: Clock
) -> None:
    node = _node(engine, "node-a", clock)
    _route(engine, _uid(1), priority="ROUTINE", at=clock.now - 1900, deadline_s=3600.0)  # waited > 0.5 x 3600
    _route(engine, _uid(2), priority="URGENT", at=clock.now - 10, deadline_s=600.0)
    _route(engine, _uid(3), priority="ROUTINE", at=clock.now - 1000, deadline_s=3600.0)
    order = [node.claim(), node.claim(), node.claim()]
    assert [c.study_uid for c in order if c] == [_uid(1), _uid(2), _uid(3)]


def test_fair_share_per_pacs_holds_across_nodes(engine: Engine, clock: Clock) -> None:
    """PACS_A queued 40 series first, PACS_B 40 after; claims alternating over two nodes serve them in turns
    (weights 1:1), not all of PACS_A first - the stride passes live in the shared table."""
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    for n in range(40):
        _route(engine, _uid(n), pacs="PACS_A", at=clock.now - 100 + n * 0.01)
    for n in range(40, 80):
        _route(engine, _uid(n), pacs="PACS_B", at=clock.now - 50 + n * 0.01)
    served = []
    for i in range(20):
        claimed = (a if i % 2 else b).claim()
        assert claimed is not None
        served.append(claimed.calling_ae)
    assert Counter(served) == {"PACS_A": 10, "PACS_B": 10}


def test_fair_share_follows_the_configured_weights(engine: Engine, clock: Clock) -> None:
    node = _node(engine, "node-a", clock, pacs_weights={"PACS_A": 3.0})
    for n in range(40):
        _route(engine, _uid(n), pacs="PACS_A", at=clock.now - 100 + n * 0.01)
        _route(engine, _uid(100 + n), pacs="PACS_B", at=clock.now - 100 + n * 0.01)
    served = Counter(c.calling_ae for c in (node.claim() for _ in range(40)) if c)
    assert served["PACS_A"] == 30 and served["PACS_B"] == 10


def test_every_series_of_a_study_runs_on_the_node_that_took_the_study(engine: Engine, clock: Clock) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    _route(engine, _uid(1), series=3, at=clock.now - 10)
    first = a.claim()
    assert first is not None and first.new_study and not first.takeover
    assert b.claim() is None  # the study is leased to node-a
    rest = [a.claim(), a.claim()]
    assert all(c is not None and not c.new_study for c in rest)
    assert a.claim() is None


def test_an_expired_lease_is_taken_over_and_the_whole_study_runs_again(engine: Engine, clock: Clock) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    _route(engine, _uid(1), series=2, at=clock.now - 10)
    assert a.claim() is not None and a.claim() is not None  # node-a runs both series, then dies
    clock.now += LEASE / 2
    b.heartbeat()
    assert b.claim() is None  # within the lease: still node-a's
    clock.now += LEASE / 2 + 1
    b.heartbeat()
    taken = b.claim()
    assert taken is not None and taken.takeover and taken.study_uid == _uid(1)
    assert b.claim() is not None  # the other series too: node-b analyses the study as a whole
    assert a.finish_study(_uid(1)) is False  # node-a, back from the dead, may not complete it
    assert b.finish_study(_uid(1)) is True
    assert b.finish_study(_uid(1)) is False  # once


def test_a_heartbeat_keeps_the_lease(engine: Engine, clock: Clock) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    _route(engine, _uid(1), series=2, at=clock.now - 10)
    assert a.claim() is not None
    for _ in range(6):
        clock.now += LEASE / 3
        assert a.heartbeat() == 1
        b.heartbeat()
        assert b.claim() is None


def test_after_an_outage_no_lease_is_judged_until_the_judge_was_connected_a_whole_lease(
    engine: Engine, clock: Clock
) -> None:
    a = _node(engine, "node-a", clock)
    _route(engine, _uid(1), series=2, at=clock.now - 10)
    assert a.claim() is not None
    clock.now += 3 * LEASE  # nobody could reach the database: node-a's lease is long expired
    b = _node(engine, "node-b", clock)  # connected just now
    assert b.claim() is None
    a.heartbeat()  # node-a is back and renews within the grace period
    clock.now += LEASE + 1
    a.heartbeat()
    b.heartbeat()
    assert b.claim() is None
    assert a.claim() is not None


def test_a_clean_stop_hands_its_unfinished_studies_back_at_once(engine: Engine, clock: Clock) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    _route(engine, _uid(1), series=2, at=clock.now - 10)
    assert a.claim() is not None
    a.stopped()
    again = b.claim()
    assert again is not None and again.new_study and not again.takeover
    assert b.claim() is not None


def test_a_released_job_is_claimed_again_by_the_node_that_holds_its_study(
    engine: Engine, clock: Clock
) -> None:
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    _route(engine, _uid(1), at=clock.now - 10)
    claimed = a.claim()
    assert claimed is not None
    a.release(claimed.job_id)  # Triton unavailable
    assert b.claim() is None
    again = a.claim()
    assert again is not None and again.job_id == claimed.job_id and again.attempts == 1


def test_a_stat_finding_raises_the_studys_waiting_series(engine: Engine, clock: Clock) -> None:
    node = _node(engine, "node-a", clock)
    _route(engine, _uid(1), series=3, at=clock.now - 10)
    assert node.claim() is not None
    assert node.raise_to_stat(_uid(1)) == 2
    nxt = node.claim(stat_only=True)
    assert nxt is not None and nxt.priority == "STAT"


def test_a_dead_nodes_unrouted_studies_are_adopted_by_one_node(engine: Engine, clock: Clock) -> None:
    dead = _node(engine, "node-dead", clock)
    recorder = Recorder(engine, "node-dead").start()
    recorder.instance_stored(
        InstanceRecord(
            sop_instance_uid=_uid(50),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=_uid(5),
            series_instance_uid=_uid(6),
            path=Path("/spool/x.dcm"),
            calling_ae="PACS_A",
            received_at=clock.now,
            modality="CT",
        )
    )
    assert recorder.flush()
    recorder.close()
    del dead
    a, b = _node(engine, "node-a", clock), _node(engine, "node-b", clock)
    clock.now += LEASE + 1
    a.heartbeat()
    b.heartbeat()
    assert a.dead_nodes() == ["node-dead"] and b.dead_nodes() == ["node-dead"]
    won = [a.adopt("node-dead"), b.adopt("node-dead")]
    assert sorted(won, key=len) == [[], [_uid(5)]]
    assert a.dead_nodes() == [] and b.dead_nodes() == []


def test_concurrent_claimers_never_get_the_same_job(engine: Engine, clock: Clock) -> None:
    nodes = [_node(engine, f"node-{i}", clock) for i in range(4)]
    for n in range(60):
        _route(engine, _uid(n), at=clock.now - 100 + n)
    got: list[str] = []
    lock = threading.Lock()

    def drain(node: SharedQueue) -> None:
        while (claimed := node.claim()) is not None:
            with lock:
                got.append(claimed.job_id)

    threads = [threading.Thread(target=drain, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(got) == 60 and len(set(got)) == 60
    with engine.connect() as connection:
        owners = connection.execute(select(schema.study_leases.c.owner)).scalars().all()
    assert len(owners) == 60
