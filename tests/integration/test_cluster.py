"""Several gateways, one PostgreSQL, one shared spool (``[cluster] enabled``): real gateway processes, a real
Triton, real DIMSE associations. Studies sent to any node are analysed exactly once, by whichever node claims them;
a node SIGKILLed while it holds studies has them taken over by the others within a lease, with the same result
objects (deterministic UIDs); and a database outage stops no node from acknowledging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, select

from gateway.config.settings import SchedulingSettings
from gateway.database import schema
from gateway.database.connect import engine_for
from gateway.database.queue import SharedQueue
from gateway.demo.phantoms import PhantomSeries, write_head_ct
from gateway.inference.server import free_port
from gateway.ingest.spool import Spool
from tests.support.postgres import PostgresCluster
from tests.support.servers import storescu, wait_for

pytestmark = pytest.mark.integration

LEASE_S = 6.0


@dataclass
class Node:
    name: str
    port: int
    data: Path
    process: subprocess.Popen[bytes] | None = None

    def audit(self) -> list[dict[str, object]]:
        path = self.data / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def done(self) -> list[str]:
        return [str(e["study"]) for e in self.audit() if e["event"] == "study_done"]


def _start(node: Node, *, url: str, spool: Path, triton: str, tmp: Path) -> None:
    config = tmp / f"{node.name}.toml"
    config.write_text(
        f'data_dir = "{node.data}"\nquiet_period_s = 1.0\nworkers = 1\n'
        f'[receiver]\nport = {node.port}\n[http]\nenabled = false\n[triton]\nurl = "{triton}"\n'
        f'[database]\nurl = "{url}"\nnode_id = "{node.name}"\n'
        f'[cluster]\nenabled = true\nspool_dir = "{spool}"\nlease_s = {LEASE_S}\nheartbeat_s = 1.0\n'
        "poll_s = 0.3\n"
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    log = open(tmp / f"{node.name}.log", "ab")  # noqa: SIM115 - closed with the process
    node.process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=log, stderr=log
    )


def _listening(node: Node) -> bool:
    import socket

    assert node.process is not None and node.process.poll() is None, f"{node.name} exited during start-up"
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", node.port)) == 0


def _start_all(nodes: list[Node], *, url: str, spool: Path, triton: str, tmp: Path) -> None:
    for node in nodes:
        _start(node, url=url, spool=spool, triton=triton, tmp=tmp)
    for node in nodes:
        wait_for(lambda n=node: _listening(n), timeout_s=120, what=f"{node.name} to listen")


def _stop(nodes: list[Node]) -> None:
    for node in nodes:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    for node in nodes:
        if node.process is not None:
            try:
                node.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.process.kill()


def _sr_uids(nodes: list[Node], study_uid: str) -> set[str]:
    return {p.name for n in nodes for p in (n.data / "results" / study_uid).glob("SR_*.dcm")}


def test_three_gateways_one_killed_holding_studies_lose_none_and_analyse_none_twice(
    tmp_path: Path, triton: str, postgres: PostgresCluster
) -> None:
    url = postgres.create_database()
    spool = tmp_path / "shared-spool"
    nodes = [Node(f"node-{i}", free_port(), tmp_path / f"data-{i}") for i in (1, 2, 3)]
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        _start_all(nodes, url=url, spool=spool, triton=triton, tmp=tmp_path)
        studies = [write_head_ct(tmp_path / f"st{i}", slices=12, seed=80 + i) for i in range(6)]
        for i, study in enumerate(studies):  # all through two of the three nodes: the third only claims
            target = nodes[i % 2]
            assert storescu(list(study.paths), port=target.port, calling_ae="STORESCU").returncode == 0

        def held() -> list[tuple[str, str]]:
            with engine.connect() as connection:
                lease = schema.study_leases
                rows = connection.execute(
                    select(lease.c.owner, lease.c.study_uid).where(lease.c.finished_at.is_(None))
                ).all()
            return [(str(owner), str(uid)) for owner, uid in rows]

        holding = wait_for(held, timeout_s=120, what="a node to hold a study")
        victim_name, victim_study = holding[0]
        victim = next(n for n in nodes if n.name == victim_name)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        victim.process.wait(timeout=10)
        survivors = [n for n in nodes if n is not victim]

        every = {s.study_uid for s in studies}
        wait_for(
            lambda: every <= {uid for n in nodes for uid in n.done()},
            timeout_s=240,
            what="every study finished by the cluster",
        )
        done = Counter(uid for n in nodes for uid in n.done())
        assert all(done[uid] == 1 for uid in every), f"a study completed more than once: {done}"
        for uid in every:
            assert len(_sr_uids(nodes, uid)) == 1, f"{uid}: SR objects differ between nodes"
        with engine.connect() as connection:
            lease = schema.study_leases
            taken = connection.execute(
                select(lease.c.study_uid, lease.c.owner, lease.c.claimed_at).where(lease.c.takeovers > 0)
            ).all()
        assert victim_study in {row[0] for row in taken} or victim_study in victim.done()
        assert all(row[1] in {n.name for n in survivors} for row in taken)
        takeover_s = [row[2] - killed_at for row in taken]
        print(
            f"\ncluster: 3 nodes, {len(studies)} studies; {victim.name} SIGKILLed holding {victim_study}; "
            f"{len(taken)} study(ies) taken over after {[round(s, 1) for s in takeover_s]} s (lease {LEASE_S} s); "
            f"completions per study: {sorted(set(done.values()))}"
        )
    finally:
        _stop(nodes)
        engine.dispose()


OUTAGE_S = 30.0


def test_a_database_outage_stops_no_node_from_acknowledging_and_the_cluster_catches_up(
    tmp_path: Path, triton: str, postgres: PostgresCluster
) -> None:
    url = postgres.create_database()
    spool = tmp_path / "shared-spool"
    nodes = [Node(f"node-{i}", free_port(), tmp_path / f"data-{i}") for i in (1, 2)]
    try:
        _start_all(nodes, url=url, spool=spool, triton=triton, tmp=tmp_path)
        before = [write_head_ct(tmp_path / f"before{i}", slices=8, seed=120 + i) for i in range(2)]
        during = [write_head_ct(tmp_path / f"during{i}", slices=8, seed=130 + i) for i in range(4)]
        for i, study in enumerate(before):
            assert storescu(list(study.paths), port=nodes[i % 2].port, calling_ae="STORESCU").returncode == 0
        postgres.stop()
        stopped_at = time.time()
        try:
            acknowledged = []
            for i, study in enumerate(during):  # sent while the database is down: every instance acknowledged
                started = time.time()
                result = storescu(list(study.paths), port=nodes[i % 2].port, calling_ae="STORESCU")
                assert result.returncode == 0, result.stderr
                acknowledged.append(time.time() - started)
            for node in nodes:
                assert node.process is not None and node.process.poll() is None, f"{node.name} exited"
            time.sleep(max(0.0, OUTAGE_S - (time.time() - stopped_at)))
        finally:
            postgres.restart()
        back_at = time.time()
        every = {s.study_uid for s in before + during}
        wait_for(
            lambda: every <= {uid for n in nodes for uid in n.done()},
            timeout_s=240,
            what="every study finished after the database came back",
        )
        caught_up_s = time.time() - back_at
        done = Counter(uid for n in nodes for uid in n.done())
        assert all(done[uid] == 1 for uid in every), f"a study completed more than once: {done}"
        for study in during:  # every acknowledged instance is in the shared spool
            assert len(list((spool / study.study_uid).glob("*/*.dcm"))) == 8
        print(
            f"\ndatabase outage: {OUTAGE_S:.0f} s; {len(during)} studies acknowledged during it "
            f"(storescu {[round(s, 1) for s in acknowledged]} s each); all {len(every)} studies done "
            f"{caught_up_s:.1f} s after the database was back, each once"
        )
    finally:
        _stop(nodes)


def _spool_orphan(spool: Spool, series: PhantomSeries) -> None:
    """Put a study in the shared spool as a node that acknowledged it and recorded nothing would leave it, its
    files quiet for two leases."""
    for path in series.paths:
        raw = path.read_bytes()
        offset = raw.index(b"DICM") + 4
        meta_len = int.from_bytes(raw[offset + 8 : offset + 12], "little")
        record = spool.store(
            pydicom.dcmread(path).file_meta, raw[offset + 12 + meta_len :], calling_ae="STORESCU"
        )
        old = time.time() - 2 * LEASE_S
        os.utime(record.path, (old, old))


def test_a_spooled_study_that_no_node_recorded_is_adopted_not_lost(tmp_path: Path, triton: str) -> None:
    """A node killed between acknowledging a study and its database writes leaves the study only in the shared
    spool: a live node's sweep (once a lease, its files quiet for a lease) assembles and analyses it."""
    spool_root = tmp_path / "shared-spool"
    node = Node("node-1", free_port(), tmp_path / "data-1")
    try:
        _start_all(
            [node], url=f"sqlite:///{tmp_path / 'cluster.db'}", spool=spool_root, triton=triton, tmp=tmp_path
        )
        series = write_head_ct(tmp_path / "orphan", slices=6, seed=140)
        _spool_orphan(Spool(spool_root), series)  # acknowledged by a node that died before recording anything
        wait_for(
            lambda: series.study_uid in node.done(),
            timeout_s=4 * LEASE_S + 60,
            what="the orphan study analysed",
        )
        assert node.done().count(series.study_uid) == 1
    finally:
        _stop([node])


def test_a_study_a_live_node_received_and_has_not_recorded_yet_is_left_to_it(
    tmp_path: Path, triton: str
) -> None:
    """After a database outage a node's writes can come late: a study it received during the outage is in the
    shared spool, quiet, and unknown to the database. Another node must not adopt it while the receiving node
    lives (both would analyse it: two results); once the receiving node stops beating, it is adopted."""
    spool_root = tmp_path / "shared-spool"
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    node = Node("node-1", free_port(), tmp_path / "data-1")
    try:
        _start_all([node], url=url, spool=spool_root, triton=triton, tmp=tmp_path)
        receiving = SharedQueue(engine_for(url), "node-2", SchedulingSettings(), lease_s=LEASE_S)
        beating = threading.Event()
        beating.set()

        def beat() -> None:  # node-2: alive, its record of the study not written yet
            while beating.is_set():
                receiving.heartbeat()
                time.sleep(0.5)

        heart = threading.Thread(target=beat, daemon=True)
        heart.start()
        series = write_head_ct(tmp_path / "received", slices=6, seed=141)
        spool = Spool(spool_root)
        _spool_orphan(spool, series)
        spool.mark_received_by(series.study_uid, "node-2")
        # node-1 sweeps once a lease once it has been connected for a lease: three sweeps leave it alone.
        time.sleep(4 * LEASE_S)
        assert series.study_uid not in node.done(), "adopted from a live node that received it"
        beating.clear()
        heart.join()
        wait_for(
            lambda: series.study_uid in node.done(),
            timeout_s=4 * LEASE_S + 60,
            what="the study adopted once its receiving node stopped beating",
        )
        assert node.done().count(series.study_uid) == 1
    finally:
        _stop([node])
