"""The job queue in the database, shared by every gateway on it (the cluster mode, ``[cluster] enabled``).

Routing writes the jobs (the system of record's ``jobs`` table, one row per series and pipeline); any node claims
the next one with :meth:`SharedQueue.claim`, in one transaction:

1. **The order is computed from the shared tables**, so it holds across the cluster, not per process: STAT
   first; a waiting job moves up one class (never to STAT) once it has waited ``promote_fraction`` of its
   deadline; within a class the PACS with the lowest stride-scheduling pass (``fair_share``: served cost /
   weight; an idle PACS joins at the cluster's virtual time); then oldest first. On PostgreSQL the candidate row
   is locked ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait for each other.
2. **Study leases.** The first claim of a study's job leases the whole study to the claiming node (every series of
   a study is analysed where its results are collected); the owner's heartbeat renews the lease every
   ``heartbeat_s``. A lease that expires - the owner was killed, or lost the database for longer than a lease -
   lets another node take the study over: its jobs are queued again and the new owner analyses it as it stands in
   the shared spool. Deterministic result UIDs make a second run produce the same objects.
3. **Completion once.** Only the lease's owner may finish a study (:meth:`finish_study`, a guarded update), so two
   nodes never both report it done.

A node judges another's lease expired only after it has itself been connected for a whole lease period: after a
database outage every owner gets one lease to renew before anything is taken from it.

Every method is blocking (run them in an executor) and raises ``DatabaseError`` when the database cannot be used.
SQLite takes the same statements (without ``SKIP LOCKED``: it has one writer at a time); the claims then guard
themselves with conditional updates.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, case, delete, func, literal, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from gateway.config.settings import SchedulingSettings
from gateway.core.errors import DatabaseError
from gateway.database import schema as t
from gateway.database.connect import greatest, upsert

logger = logging.getLogger(__name__)

VIRTUAL_TIME = ""  # the fair_share row that holds the cluster's virtual time
ACTIVE = ("queued", "running")


@dataclass(frozen=True, kw_only=True)
class ClaimedJob:
    job_id: str
    study_uid: str
    series_uid: str
    pipeline: str
    priority: str
    calling_ae: str
    attempts: int  # before this claim
    enqueued_at: float
    new_study: bool  # the study was not leased to this node before this claim
    takeover: bool  # ... and another node held it (its lease expired)


@dataclass(frozen=True, kw_only=True)
class QueueDepth:
    by_priority: dict[str, int]
    by_pacs: dict[str, int]
    running: int
    nodes_alive: int


class SharedQueue:
    def __init__(
        self,
        engine: Engine,
        node: str,
        scheduling: SchedulingSettings,
        *,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.node = node
        self.scheduling = scheduling
        self.lease_s = lease_s
        self._clock = clock
        self._connected_since: float | None = None  # since when every heartbeat succeeded

    # -- this node ------------------------------------------------------------------------------------------

    def heartbeat(self) -> int:
        """Say this node is alive and renew its leases; returns how many studies it holds."""
        now = self._clock()
        try:
            with self._transaction() as connection:
                connection.execute(
                    upsert(connection, t.nodes)
                    .values(node_id=self.node, started_at=now, heartbeat_at=now)
                    .on_conflict_do_update(
                        index_elements=["node_id"],
                        set_={
                            "heartbeat_at": now,
                            "stopped_at": None,
                            "adopted_by": None,
                            "adopted_at": None,
                        },
                    )
                )
                held = connection.execute(
                    update(t.study_leases)
                    .where(t.study_leases.c.owner == self.node, t.study_leases.c.finished_at.is_(None))
                    .values(expires_at=now + self.lease_s)
                ).rowcount
                connection.execute(
                    update(t.jobs)
                    .where(t.jobs.c.lease_owner == self.node, t.jobs.c.state == "running")
                    .values(lease_expires_at=now + self.lease_s)
                )
        except DatabaseError:
            self._connected_since = None
            raise
        if self._connected_since is None:
            self._connected_since = now
        return int(held or 0)

    def now(self) -> float:
        return self._clock()

    def may_take_over(self, now: float) -> bool:
        """Only a node connected for a whole lease judges others' leases (an outage is not a death)."""
        return self._connected_since is not None and now - self._connected_since >= self.lease_s

    def stopped(self) -> None:
        """A clean stop: the studies this node holds and has not finished go back to the queue at once."""
        now = self._clock()
        with self._transaction() as connection:
            held = select(t.study_leases.c.study_uid).where(
                t.study_leases.c.owner == self.node, t.study_leases.c.finished_at.is_(None)
            )
            connection.execute(
                update(t.jobs)
                .where(t.jobs.c.study_uid.in_(held))
                .values(state="queued", lease_owner=None, lease_expires_at=None)
            )
            connection.execute(
                delete(t.study_leases).where(
                    t.study_leases.c.owner == self.node, t.study_leases.c.finished_at.is_(None)
                )
            )
            connection.execute(update(t.nodes).where(t.nodes.c.node_id == self.node).values(stopped_at=now))

    # -- the queue ------------------------------------------------------------------------------------------

    def claim(self, *, stat_only: bool = False) -> ClaimedJob | None:
        """The next job for this node by class, ageing, fair share and age; None when none may run here."""
        for _ in range(5):  # another node won the same row between our read and our update: choose again
            with self._transaction() as connection:
                claimed = self._claim_once(connection, stat_only=stat_only)
                if not isinstance(claimed, bool):
                    return claimed
        return None

    def _claim_once(
        self, connection: Connection, *, stat_only: bool
    ) -> ClaimedJob | bool | None:  # False: lost a race
        now = self._clock()
        j, lease, share = t.jobs, t.study_leases, t.fair_share
        vt = self._virtual_time(connection)
        larger = greatest(connection)
        promote = literal(self.scheduling.promote_fraction)
        rank = case(
            (j.c.priority == "STAT", 0),
            (j.c.priority == "URGENT", 1),
            (literal(now) - j.c.enqueued_at >= promote * (j.c.deadline_at - j.c.enqueued_at), 1),
            else_=2,
        )
        # Queued jobs of studies that are free or this node's; and, once this node may judge leases, every job of
        # a study whose owner's lease expired (the whole study runs again here).
        claimable = and_(j.c.state == "queued", or_(lease.c.study_uid.is_(None), lease.c.owner == self.node))
        if self.may_take_over(now):
            claimable = or_(claimable, and_(lease.c.expires_at < now, lease.c.owner != self.node))
        query = (
            select(
                j.c.job_id,
                j.c.study_uid,
                j.c.series_uid,
                j.c.pipeline,
                j.c.priority,
                j.c.calling_ae,
                j.c.cost,
                j.c.attempts,
                j.c.enqueued_at,
                lease.c.owner,
                larger(func.coalesce(share.c.pass_value, vt), vt).label("pass_value"),
            )
            .select_from(
                j.outerjoin(lease, lease.c.study_uid == j.c.study_uid).outerjoin(
                    share, share.c.calling_ae == j.c.calling_ae
                )
            )
            .where(lease.c.finished_at.is_(None), claimable)
            .order_by(rank, "pass_value", j.c.enqueued_at, j.c.job_id)
            .limit(1)
        )
        if stat_only:
            query = query.where(j.c.priority == "STAT")
        if connection.dialect.name == "postgresql":
            query = query.with_for_update(of=j, skip_locked=True)
        row = connection.execute(query).mappings().first()
        if row is None:
            return None
        previous = row["owner"]
        if previous != self.node and not self._lease_study(connection, row["study_uid"], previous, now):
            return False
        started = connection.execute(
            update(j)
            .where(j.c.job_id == row["job_id"], j.c.state == "queued")
            .values(
                state="running",
                lease_owner=self.node,
                lease_expires_at=now + self.lease_s,
                started_at=now,
                attempts=j.c.attempts + 1,
            )
        ).rowcount
        if started != 1:
            return False
        self._charge(connection, row["calling_ae"], float(row["pass_value"]), int(row["cost"]), vt)
        return ClaimedJob(
            job_id=row["job_id"],
            study_uid=row["study_uid"],
            series_uid=row["series_uid"],
            pipeline=row["pipeline"],
            priority=row["priority"],
            calling_ae=row["calling_ae"],
            attempts=int(row["attempts"]),
            enqueued_at=float(row["enqueued_at"]),
            new_study=previous != self.node,
            takeover=previous is not None and previous != self.node,
        )

    def _lease_study(self, connection: Connection, study_uid: str, previous: str | None, now: float) -> bool:
        """Lease ``study_uid`` to this node (free, or its owner's lease expired); on a takeover every job of the
        study runs again here. False when another node got it first."""
        lease = t.study_leases
        if previous is None:
            insert = upsert(connection, lease).values(
                study_uid=study_uid, owner=self.node, claimed_at=now, expires_at=now + self.lease_s
            )
            connection.execute(insert.on_conflict_do_nothing(index_elements=["study_uid"]))
            owner = connection.execute(select(lease.c.owner).where(lease.c.study_uid == study_uid)).scalar()
            return bool(owner == self.node)  # (an insert's rowcount does not say this on every driver)
        taken = connection.execute(
            update(lease)
            .where(
                lease.c.study_uid == study_uid,
                lease.c.owner == previous,
                lease.c.expires_at < now,
                lease.c.finished_at.is_(None),
            )
            .values(
                owner=self.node,
                claimed_at=now,
                expires_at=now + self.lease_s,
                takeovers=lease.c.takeovers + 1,
            )
        ).rowcount
        if taken != 1:
            return False
        connection.execute(
            update(t.jobs)
            .where(t.jobs.c.study_uid == study_uid)
            .values(state="queued", lease_owner=None, lease_expires_at=None)
        )
        logger.warning("study %s taken over from node %s (its lease expired)", study_uid, previous)
        return True

    def _virtual_time(self, connection: Connection) -> float:
        value = connection.execute(
            select(t.fair_share.c.pass_value).where(t.fair_share.c.calling_ae == VIRTUAL_TIME)
        ).scalar()
        return float(value or 0.0)

    def _charge(self, connection: Connection, pacs: str, pass_value: float, cost: int, vt: float) -> None:
        """Stride scheduling: the served PACS's pass advances by cost / weight; the virtual time follows the
        pass of the PACS served (the lowest among those with work waiting)."""
        share = t.fair_share
        advanced = pass_value + max(1, cost) / self.scheduling.weight(pacs)
        for key, value in ((pacs, advanced), (VIRTUAL_TIME, max(vt, pass_value))):
            insert = upsert(connection, share).values(calling_ae=key, pass_value=value)
            connection.execute(
                insert.on_conflict_do_update(
                    index_elements=["calling_ae"],
                    set_={"pass_value": greatest(connection)(share.c.pass_value, insert.excluded.pass_value)}
                    if key == VIRTUAL_TIME
                    else {"pass_value": insert.excluded.pass_value},
                )
            )

    def release(self, job_id: str) -> None:
        """A job that could not run now (Triton unavailable, a full disk): queued again, its study still held
        here so it runs on this node when it can."""
        with self._transaction() as connection:
            connection.execute(
                update(t.jobs)
                .where(t.jobs.c.job_id == job_id, t.jobs.c.lease_owner == self.node)
                .values(state="queued", lease_owner=None, lease_expires_at=None)
            )

    def abandon(self, job_id: str) -> None:
        """A job no node can run (routing rules differ between nodes): failed, not claimed again and again."""
        with self._transaction() as connection:
            connection.execute(
                update(t.jobs)
                .where(t.jobs.c.job_id == job_id)
                .values(state="failed", finished_at=self._clock(), lease_owner=None, lease_expires_at=None)
            )

    def raise_to_stat(self, study_uid: str) -> int:
        """A series of the study produced a STAT finding: its waiting series become STAT jobs."""
        with self._transaction() as connection:
            return int(
                connection.execute(
                    update(t.jobs)
                    .where(
                        t.jobs.c.study_uid == study_uid,
                        t.jobs.c.state == "queued",
                        t.jobs.c.priority != "STAT",
                    )
                    .values(priority="STAT")
                ).rowcount
                or 0
            )

    def finish_study(self, study_uid: str) -> bool:
        """Complete a study this node holds: True once, for its owner; False when another node took it over
        (that node completes it)."""
        now = self._clock()
        with self._transaction() as connection:
            lease = t.study_leases
            return (
                connection.execute(
                    update(lease)
                    .where(
                        lease.c.study_uid == study_uid,
                        lease.c.owner == self.node,
                        lease.c.finished_at.is_(None),
                    )
                    .values(finished_at=now)
                ).rowcount
                == 1
            )

    def reopen(self, study_uids: Sequence[str]) -> None:
        """Studies routed again (more instances arrived after their analysis): a new lease round."""
        if not study_uids:
            return
        with self._transaction() as connection:
            connection.execute(
                delete(t.study_leases).where(
                    t.study_leases.c.study_uid.in_(list(study_uids)),
                    t.study_leases.c.finished_at.is_not(None),
                )
            )

    # -- what the cluster looks like --------------------------------------------------------------------------

    def depth(self) -> QueueDepth:
        now = self._clock()
        with self._transaction() as connection:
            j = t.jobs
            rows = connection.execute(
                select(j.c.priority, j.c.calling_ae, j.c.state, func.count())
                .where(j.c.state.in_(ACTIVE))
                .group_by(j.c.priority, j.c.calling_ae, j.c.state)
            ).all()
            alive = connection.execute(
                select(func.count())
                .select_from(t.nodes)
                .where(t.nodes.c.heartbeat_at >= now - self.lease_s, t.nodes.c.stopped_at.is_(None))
            ).scalar_one()
        by_priority = {p: 0 for p in ("STAT", "URGENT", "ROUTINE")}
        by_pacs: dict[str, int] = {}
        running = 0
        for priority, pacs, state, count in rows:
            if state == "running":
                running += count
                continue
            by_priority[priority] = by_priority.get(priority, 0) + count
            by_pacs[pacs] = by_pacs.get(pacs, 0) + count
        return QueueDepth(by_priority=by_priority, by_pacs=by_pacs, running=running, nodes_alive=int(alive))

    def live_nodes(self) -> set[str]:
        """The nodes beating within a lease and not stopped (this one included once it has beaten)."""
        now = self._clock()
        with self._transaction() as connection:
            n = t.nodes
            return set(
                connection.execute(
                    select(n.c.node_id).where(
                        n.c.heartbeat_at >= now - self.lease_s, n.c.stopped_at.is_(None)
                    )
                ).scalars()
            )

    def dead_nodes(self) -> list[str]:
        """Nodes that stopped (cleanly, or by no longer beating) and that nobody has adopted yet."""
        now = self._clock()
        if not self.may_take_over(now):
            return []
        with self._transaction() as connection:
            n = t.nodes
            return list(
                connection.execute(
                    select(n.c.node_id).where(
                        or_(n.c.heartbeat_at < now - self.lease_s, n.c.stopped_at.is_not(None)),
                        n.c.adopted_by.is_(None),
                        n.c.node_id != self.node,
                    )
                ).scalars()
            )

    def adopt(self, node: str) -> list[str]:
        """Take over a dead node's studies that it was still receiving or had not routed (their instances are in
        the shared spool); returns their UIDs, [] when another node adopted it first."""
        now = self._clock()
        with self._transaction() as connection:
            n = t.nodes
            adopted = connection.execute(
                update(n)
                .where(
                    n.c.node_id == node,
                    n.c.adopted_by.is_(None),
                    or_(n.c.heartbeat_at < now - self.lease_s, n.c.stopped_at.is_not(None)),
                )
                .values(adopted_by=self.node, adopted_at=now)
            ).rowcount
            if adopted != 1:
                return []
            return self.unrouted_studies(connection, node)

    def unrouted_studies(self, connection: Connection, node: str) -> list[str]:
        s = t.studies
        return list(
            connection.execute(
                select(s.c.study_uid).where(s.c.node == node, s.c.state.in_(("receiving", "complete")))
            ).scalars()
        )

    def studies_to_recover(self, spooled: Sequence[str], *, unknown_only: bool = False) -> set[str]:
        """Of the unprocessed studies in the shared spool, those a starting node should assemble: received by it,
        unknown to the database, or received by a node that is gone - not those another live node is receiving
        or that are already queued (their jobs are in the queue)."""
        now = self._clock()
        with self._transaction() as connection:
            s, n = t.studies, t.nodes
            rows = connection.execute(
                select(s.c.study_uid, s.c.node, s.c.state, n.c.heartbeat_at, n.c.stopped_at)
                .select_from(s.outerjoin(n, n.c.node_id == s.c.node))
                .where(s.c.study_uid.in_(list(spooled)))
            ).all()
        known = {row[0]: row for row in rows}
        chosen = set()
        for uid in spooled:
            row = known.get(uid)
            if row is None:
                chosen.add(uid)
                continue
            if unknown_only:
                continue
            _, node, state, heartbeat_at, stopped_at = row
            if state not in ("receiving", "complete"):
                continue
            gone = stopped_at is not None or heartbeat_at is None or heartbeat_at < now - self.lease_s
            if node == self.node or gone:
                chosen.add(uid)
        return chosen

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """``engine.begin()`` that turns any database failure into ``DatabaseError``."""
        try:
            with self.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise DatabaseError(f"the database cannot be used: {type(exc).__name__}") from exc
