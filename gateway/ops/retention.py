"""Retention: what the gateway keeps, for how long, and a forecast of when its disk fills.

A purge removes, in this order:

* **dead letters** (failed deliveries nobody re-sent) older than ``dead_letter_days``;
* a study's **spooled images** once the study is analysed (every spooled instance is in its processed marker),
  no delivery of it is pending or dead-lettered, and it was analysed more than ``spool_days`` ago;
* a study's **result files** once no delivery of them is pending or dead-lettered and the newest is older than
  ``results_days``;
* **audit lines** older than ``audit_days``.

Then, while free space on the data disk is below ``min_free_disk_mb``, the oldest studies that could be purged
by the rules above (analysed and delivered) go before their time. Work that is not yet analysed or not yet
delivered is never purged, whatever its age or the free space. ``plan`` only looks; ``execute`` deletes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.config.settings import Settings
from gateway.core.errors import DatabaseError
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.database.queries import prune
from gateway.ingest.spool import PROCESSED_MARKER
from gateway.ops.audit import AuditLog
from gateway.ops.events import EventSink
from gateway.ops.metrics import Metrics

logger = logging.getLogger(__name__)

DAY_S = 86400.0


@dataclass(frozen=True, kw_only=True)
class PurgeItem:
    kind: str  # "dead_letter" | "spool" | "results" | "audit"
    name: str  # study UID, job id, or the audit file
    path: Path
    size_bytes: int
    age_days: float
    reason: str  # "age" or "free space"


@dataclass(frozen=True, kw_only=True)
class PurgePlan:
    items: tuple[PurgeItem, ...]
    audit_lines: int  # audit lines older than audit_days
    kept_unanalysed: int  # spooled studies kept: not yet analysed
    kept_undelivered: int  # studies kept: a delivery is pending or dead-lettered
    free_bytes: int
    target_free_bytes: int

    def totals(self) -> dict[str, tuple[int, int]]:
        """kind -> (count, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for item in self.items:
            count, size = out.get(item.kind, (0, 0))
            out[item.kind] = (count + 1, size + item.size_bytes)
        return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _jobs(folder: Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield path, data


def _analysed_at(study_dir: Path) -> float | None:
    """When the study was last analysed, if every spooled instance of it is analysed; else None."""
    try:
        marker = json.loads((study_dir / PROCESSED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    done = set(marker.get("instances", []))
    if any(path.stem not in done for path in study_dir.glob("*/*.dcm")):
        return None  # instances arrived after the last analysis: not analysed yet
    return float(marker.get("processed_at", 0.0))


_Candidate = tuple[float, str, str, Path]  # (age in days, kind, study, path) the age rules may purge


def _dead_letters(settings: Settings, now: float) -> tuple[list[PurgeItem], set[str]]:
    """Dead-letter jobs past their time (purged), and the studies of the others (still undelivered)."""
    items, kept = [], set()
    limit = settings.retention.dead_letter_days
    for path, job in _jobs(settings.outbox_dir / "dead"):
        age = (now - path.stat().st_mtime) / DAY_S
        if limit and age > limit:
            name = str(job.get("job_id", path.stem))
            size = path.stat().st_size
            items.append(
                PurgeItem(
                    kind="dead_letter", name=name, path=path, size_bytes=size, age_days=age, reason="age"
                )
            )
        else:
            kept.add(str(job.get("study_uid")))
    return items, kept


def _candidates(
    settings: Settings, undelivered: set[str], now: float
) -> tuple[list[_Candidate], int, set[str]]:
    """Spooled studies analysed and delivered, result folders delivered - with their age; and what is kept:
    the number of studies not yet analysed, the studies not yet delivered."""
    candidates: list[_Candidate] = []
    kept_unanalysed = 0
    kept_undelivered: set[str] = set()
    if settings.spool_dir.is_dir():
        for study_dir in sorted(
            p for p in settings.spool_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            analysed = _analysed_at(study_dir)
            if analysed is None:
                kept_unanalysed += 1
            elif study_dir.name in undelivered:
                kept_undelivered.add(study_dir.name)
            else:
                candidates.append(((now - analysed) / DAY_S, "spool", study_dir.name, study_dir))
    if settings.results_dir.is_dir():
        for folder in sorted(p for p in settings.results_dir.iterdir() if p.is_dir()):
            files = [p for p in folder.iterdir() if p.is_file()]
            spooled = settings.spool_dir / folder.name
            if folder.name in undelivered:
                kept_undelivered.add(folder.name)
            elif spooled.is_dir() and _analysed_at(spooled) is None:
                # Being analysed: its results are written before their delivery jobs, and the study is marked
                # processed only after those jobs are - until then "no job pending" does not mean delivered.
                kept_undelivered.add(folder.name)
            elif files:
                newest = max(p.stat().st_mtime for p in files)
                candidates.append(((now - newest) / DAY_S, "results", folder.name, folder))
    return candidates, kept_unanalysed, kept_undelivered


def _for_space(
    candidates: list[_Candidate], chosen: list[PurgeItem], free: int, target: int
) -> list[PurgeItem]:
    """Below the free-space target: more candidates, oldest first, until the target is reached."""
    freed = sum(item.size_bytes for item in chosen)
    taken = {item.path for item in chosen}
    extra: list[PurgeItem] = []
    if not target or free + freed >= target:
        return extra
    for age, kind, study, path in sorted(candidates, key=lambda c: -c[0]):
        if free + freed >= target:
            break
        if path in taken:
            continue
        size = _size(path)
        extra.append(
            PurgeItem(kind=kind, name=study, path=path, size_bytes=size, age_days=age, reason="free space")
        )
        freed += size
    return extra


def plan(settings: Settings, *, now: float | None = None) -> PurgePlan:
    """What a purge would remove now, and what it keeps because it is not yet analysed or delivered."""
    now = time.time() if now is None else now
    rules = settings.retention
    pending_studies = {str(job.get("study_uid")) for _, job in _jobs(settings.outbox_dir / "pending")}
    items, dead_studies = _dead_letters(settings, now)
    candidates, kept_unanalysed, kept_undelivered = _candidates(settings, pending_studies | dead_studies, now)
    limits = {"spool": rules.spool_days, "results": rules.results_days}
    for age, kind, study, path in candidates:
        if limits[kind] and age > limits[kind]:
            items.append(
                PurgeItem(
                    kind=kind, name=study, path=path, size_bytes=_size(path), age_days=age, reason="age"
                )
            )
    free = shutil.disk_usage(settings.data_dir).free if settings.data_dir.exists() else 0
    target = rules.min_free_disk_mb * 2**20
    items += _for_space(candidates, items, free, target)
    audit_lines = 0
    if rules.audit_days:
        audit_lines = AuditLog(settings.audit_log).count_before(now - rules.audit_days * DAY_S)
    return PurgePlan(
        items=tuple(items),
        audit_lines=audit_lines,
        kept_unanalysed=kept_unanalysed,
        kept_undelivered=len(kept_undelivered),
        free_bytes=free,
        target_free_bytes=target,
    )


def execute(settings: Settings, purge: PurgePlan, *, now: float | None = None) -> dict[str, int]:
    """Delete what ``purge`` lists; returns counts per kind (audit: lines). Logs UIDs, never patient data."""
    now = time.time() if now is None else now
    removed: dict[str, int] = {}
    for item in purge.items:
        try:
            if item.path.is_dir():
                shutil.rmtree(item.path)
            else:
                item.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("purge: could not remove %s %s: %s", item.kind, item.name, exc)
            continue
        removed[item.kind] = removed.get(item.kind, 0) + 1
    if settings.retention.audit_days and purge.audit_lines:
        removed["audit"] = AuditLog(settings.audit_log).prune_before(
            now - settings.retention.audit_days * DAY_S
        )
    removed.update(_prune_record(settings, purge, now))
    if removed:
        logger.info(
            "purge: removed %s (%.1f MiB)",
            ", ".join(f"{count} {kind}" for kind, count in sorted(removed.items())),
            sum(i.size_bytes for i in purge.items) / 2**20,
        )
    return removed


def _prune_record(settings: Settings, purge: PurgePlan, now: float) -> dict[str, int]:
    """The same retention in the system of record (when it can be reached; the next purge catches up)."""
    spool_purged = sorted({item.name for item in purge.items if item.kind == "spool"})
    audit_before = now - settings.retention.audit_days * DAY_S if settings.retention.audit_days else None
    if not spool_purged and audit_before is None:
        return {}
    engine = engine_for(settings.database_url)
    try:
        if migrate.current(engine) is None:
            return {}
        return prune(engine, spool_purged=spool_purged, audit_before=audit_before)
    except (DatabaseError, SQLAlchemyError) as exc:
        logger.warning("purge: the system of record was not pruned (%s); the next purge tries again", exc)
        return {}
    finally:
        engine.dispose()


@dataclass
class DiskForecast:
    """Free space on the data disk over the last hour, and when, at that rate, it reaches the watermark."""

    path: Path
    watermark_bytes: int
    window_s: float = 3600.0
    min_interval_s: float = 10.0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._samples and now - self._samples[-1][0] < self.min_interval_s:
            return
        self._samples.append((now, shutil.disk_usage(self.path).free))
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def report(self) -> dict[str, Any]:
        """free bytes, fill rate (bytes per hour, positive while the disk fills) and hours until the watermark
        (None while it does not fill or with too few samples)."""
        free = shutil.disk_usage(self.path).free
        rate = 0.0
        if len(self._samples) >= 2:
            (t0, f0), (t1, f1) = self._samples[0], self._samples[-1]
            if t1 > t0:
                rate = (f0 - f1) / (t1 - t0) * 3600.0
        hours = max(0.0, (free - self.watermark_bytes) / rate) if rate > 0 else None
        return {
            "free_bytes": free,
            "watermark_bytes": self.watermark_bytes,
            "fill_rate_bytes_per_hour": round(rate),
            "hours_until_watermark": round(hours, 1) if hours is not None else None,
        }


async def purge_periodically(
    settings: Settings, executor: Executor, metrics: Metrics, events: EventSink
) -> None:
    """Apply the retention rules every ``retention.interval_s`` (never what is not analysed or delivered)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.retention.interval_s)
        try:
            purge = await loop.run_in_executor(executor, plan, settings)
            removed = await loop.run_in_executor(executor, execute, settings, purge)
        except Exception as exc:  # a purge that fails is retried at the next interval
            logger.error("retention purge failed: %s: %s", type(exc).__name__, exc)
            continue
        for kind, count in removed.items():
            metrics.purged.labels(kind).inc(count)
        if removed:
            events.record("purge", removed=removed, freed_bytes=sum(i.size_bytes for i in purge.items))
