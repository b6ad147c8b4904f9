"""Study assembly: group spooled instances by study and series, and declare a study complete once no instance
has arrived for the quiet period. Thread-safe: association threads add, the engine pops.

A modality's MPPS or an archive's IAN makes completion deterministic: a study whose procedure step is in progress
is held (no quiet period closes it, only ``longest_wait_s`` after its last instance, against a lost N-SET); a
completed step or an availability notice lists the study's instances, and the study closes as soon as every one of
them is in the spool. An order that says how many images the study holds closes it the same way, once that many
are in the spool (a listed notice, more precise, wins over a count).

A study whose last association ended badly (aborted, dropped, or with refused instances) waits for the longer
``incomplete_guard_s`` instead: the sender is likely to retry, and a partial study analysed early would send a
partial clinical result. A later association that delivers instances of the study and ends in a normal release
clears the mark. A study analysed with the mark still set carries it as ``Study.incomplete_reason``.

A study still being received - an association (or STOW-RS request) that stored its last instance has not ended
yet - is not closed by the quiet period: a sender that pauses mid-study (a slow link, a busy modality) would
otherwise have its study analysed in two parts, each with its own result. It closes the quiet period after that
association ends, or ``incomplete_guard_s`` after its last instance if the end is never heard of."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core.domain import InstanceRecord, Series, Study

NOTICE_SETTLE_S = (
    0.2  # after the last instance a completeness notice listed (a re-sent copy may follow at once)
)


@dataclass
class _Pending:
    last_arrival: float
    first_received_at: float
    last_received_at: float
    calling_ae: str
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    incomplete_reason: str = ""
    notice: _Notice | None = None  # what the modality (MPPS) or the archive (IAN) says the study holds
    receiving: bool = False  # the association that stored its last instance is still open


@dataclass
class _Notice:
    """A completeness notice for a study: held open while its procedure step is in progress; complete once every
    listed instance is in the spool."""

    source: str  # "MPPS in progress", "MPPS completed", "IAN", "order"
    at: float
    expected: frozenset[str] = frozenset()  # SOP Instance UIDs; empty while only held
    final: bool = False  # the list is the whole study (MPPS completed / discontinued, IAN)
    count: int = 0  # the study holds at least this many instances (an order's expected number of images)

    def satisfied_by(self, instances: dict[str, InstanceRecord]) -> bool:
        return self.final and self.expected.issubset(instances) and len(instances) >= self.count

    @property
    def listed(self) -> bool:
        return self.final and bool(self.expected)


class StudyAssembler:
    def __init__(
        self,
        quiet_period_s: float,
        *,
        incomplete_guard_s: float | None = None,
        longest_wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if quiet_period_s <= 0:
            raise ValueError(f"quiet_period_s must be > 0, got {quiet_period_s}")
        self.quiet_period_s = quiet_period_s
        self.incomplete_guard_s = max(quiet_period_s, incomplete_guard_s or quiet_period_s)
        # A study held by a notice that never completes (a lost MPPS N-SET) closes this long after its last
        # instance, whatever the notice said.
        self.longest_wait_s = max(self.incomplete_guard_s, longest_wait_s or 0.0)
        self._notices: dict[str, _Notice] = {}  # notices of studies with no instance here yet
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        # Called (outside the lock) when the first study starts waiting, or a study's deadline moved earlier
        # (a notice, the end of the association that was still sending it): whoever sleeps until the next
        # deadline must be woken.
        self.on_earlier_deadline: Callable[[], None] | None = None
        # Called (outside the lock, on the receiving thread) with (study UID, accession number) when a study
        # starts waiting: whoever knows its order may say how many images to expect (``expect_count``).
        self.on_new_study: Callable[[str, str], None] | None = None

    def add(self, record: InstanceRecord, *, receiving: bool = False) -> None:
        """An instance is in the spool. ``receiving``: it came on an association (or STOW-RS request) that is still
        open, whose end ``association_ended`` will report; a recovered instance has none."""
        now = self._clock()
        with self._lock:
            was_empty = not self._pending
            pending = self._pending.get(record.study_instance_uid)
            new = pending is None
            if pending is None:
                pending = _Pending(
                    last_arrival=now,
                    first_received_at=record.received_at,
                    last_received_at=record.received_at,
                    calling_ae=record.calling_ae,
                    notice=self._notices.pop(record.study_instance_uid, None),
                )
                self._pending[record.study_instance_uid] = pending
            pending.last_arrival = now
            pending.receiving = receiving
            pending.last_received_at = max(pending.last_received_at, record.received_at)
            # A re-sent instance replaces the earlier copy (same SOP Instance UID, same spool file).
            pending.instances[record.sop_instance_uid] = record
            # The last instance a notice listed: the study's deadline moved earlier, whoever sleeps must know.
            listed = pending.notice is not None and pending.notice.satisfied_by(pending.instances)
        if (was_empty or listed) and self.on_earlier_deadline is not None:
            self.on_earlier_deadline()
        if new and self.on_new_study is not None:
            self.on_new_study(record.study_instance_uid, record.accession_number)

    def association_ended(self, study_uids: set[str], problem: str) -> None:
        """An association that stored instances of these studies ended: cleanly (``problem`` empty) or not."""
        moved = False
        with self._lock:
            for uid in study_uids:
                pending = self._pending.get(uid)
                if pending is not None:
                    before = self._deadline(pending)
                    pending.incomplete_reason = problem
                    pending.receiving = False
                    pending.last_arrival = max(pending.last_arrival, self._clock())
                    moved = moved or self._deadline(pending) < before
        if moved and self.on_earlier_deadline is not None:
            self.on_earlier_deadline()  # the quiet period now runs from the association's end

    def hold(self, study_uid: str, source: str) -> None:
        """The study's procedure step is in progress (MPPS N-CREATE): no quiet period closes it until the step
        is completed, or until ``longest_wait_s`` after its last instance."""
        self._notice(study_uid, _Notice(source=source, at=self._clock()))

    def expect(self, study_uid: str, sop_uids: frozenset[str], source: str) -> None:
        """The study holds exactly these instances (MPPS completed, IAN): it closes as soon as every one of them is
        in the spool, not after a quiet period."""
        self._notice(study_uid, _Notice(source=source, at=self._clock(), expected=sop_uids, final=True))

    def expect_count(self, study_uid: str, count: int, source: str = "order") -> None:
        """The study holds ``count`` instances (its order says so): it closes as soon as that many are in the
        spool. A notice that lists the instances (MPPS completed, IAN) is more precise and is kept."""
        self._notice(study_uid, _Notice(source=source, at=self._clock(), final=True, count=count))

    def _notice(self, study_uid: str, notice: _Notice) -> None:
        with self._lock:
            pending = self._pending.get(study_uid)
            if notice.count and pending is not None and pending.notice is not None and pending.notice.listed:
                return  # a count never replaces a list
            if pending is None:
                self._notices[study_uid] = notice
                for uid, old in list(self._notices.items()):  # notices of studies that never came
                    if notice.at - old.at > self.longest_wait_s:
                        del self._notices[uid]
                return
            if pending.notice is not None and pending.notice.final and not notice.final:
                return  # an in-progress notice never re-opens a completed list
            pending.notice = notice
        if self.on_earlier_deadline is not None:
            self.on_earlier_deadline()  # the deadline moved: whoever sleeps until the next one wakes up

    def pending_studies(self) -> int:
        with self._lock:
            return len(self._pending)

    def _deadline(self, pending: _Pending) -> float:
        """When the study is complete: a completed notice's last listed instance (plus a moment), a held study at
        the longest wait, otherwise the quiet period (the longer guard after an association that ended badly)."""
        notice = pending.notice
        if notice is not None:
            if notice.satisfied_by(pending.instances):
                return max(pending.last_arrival, notice.at) + NOTICE_SETTLE_S
            return pending.last_arrival + self.longest_wait_s
        period = (
            self.incomplete_guard_s if pending.incomplete_reason or pending.receiving else self.quiet_period_s
        )
        return pending.last_arrival + period

    def seconds_until_next(self, now: float | None = None) -> float | None:
        """How long until the next pending study is complete (0 when one is); None when nothing is pending.
        Later instances only push a deadline back, and whatever moves one earlier wakes the sleeper
        (``on_earlier_deadline``), so a sleep until this time never misses a study."""
        now = self._clock() if now is None else now
        with self._lock:
            deadlines = [self._deadline(p) for p in self._pending.values()]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def pop_complete(self, now: float | None = None) -> list[Study]:
        """Remove and return the studies that have been quiet for at least the quiet period."""
        now = self._clock() if now is None else now
        with self._lock:
            ready = [uid for uid, p in self._pending.items() if now >= self._deadline(p)]
            popped = [(uid, self._pending.pop(uid)) for uid in ready]
        return [_build_study(uid, pending) for uid, pending in popped]


def _build_study(study_uid: str, pending: _Pending) -> Study:
    study = assemble_study(
        list(pending.instances.values()),
        calling_ae=pending.calling_ae,
        first_received_at=pending.first_received_at,
        last_received_at=pending.last_received_at,
    )
    return dataclasses.replace(study, incomplete_reason=pending.incomplete_reason)


def assemble_study(
    records: list[InstanceRecord], *, calling_ae: str, first_received_at: float, last_received_at: float
) -> Study:
    """Group the records of one study into series (ordered by arrival within a series)."""
    by_series: dict[str, dict[str, InstanceRecord]] = {}
    for record in records:
        by_series.setdefault(record.series_instance_uid, {})[record.sop_instance_uid] = record
    series = []
    for series_uid, members in sorted(by_series.items()):
        ordered = sorted(members.values(), key=lambda r: r.received_at)
        first = ordered[0]
        series.append(
            Series(
                series_instance_uid=series_uid,
                modality=first.modality,
                body_part=first.body_part,
                series_description=first.series_description,
                instances=tuple(ordered),
            )
        )
    priorities = [r.requested_priority for r in records if r.requested_priority]
    return Study(
        study_instance_uid=records[0].study_instance_uid,
        calling_ae=calling_ae,
        study_description=records[0].study_description,
        series=tuple(series),
        first_received_at=first_received_at,
        last_received_at=last_received_at,
        requested_priority=priorities[0] if priorities else "",
        accession_number=next((r.accession_number for r in records if r.accession_number), ""),
    )
