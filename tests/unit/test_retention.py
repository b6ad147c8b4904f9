"""Retention: a purge removes what is past its time and never what is not yet analysed or not yet delivered;
``gateway purge --dry-run`` lists without removing; a free-space target purges delivered studies oldest first."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config.settings import Settings, load_settings
from gateway.ops import retention
from gateway.ops.audit import AuditLog

DAY = 86400.0
NOW = time.time()


def _settings(tmp_path: Path, **rules: float) -> Settings:
    lines = "\n".join(f"{key} = {value}" for key, value in rules.items())
    config = tmp_path / "gateway.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[retention]\n{lines}\n')
    return load_settings(config)


def _age(path: Path, days: float) -> None:
    stamp = NOW - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (stamp, stamp))


def _spooled(settings: Settings, study: str, *, analysed_days_ago: float | None, extra: bool = False) -> Path:
    """A spooled study of two instances; analysed (marker) ``analysed_days_ago``, with one more instance that
    arrived after the analysis when ``extra``."""
    folder = settings.spool_dir / study / "1.2.9"
    folder.mkdir(parents=True)
    for sop in ("1.2.9.1", "1.2.9.2", *(("1.2.9.3",) if extra else ())):
        (folder / f"{sop}.dcm").write_bytes(b"\0" * 50_000)
    if analysed_days_ago is not None:
        marker = {
            "processed_at": NOW - analysed_days_ago * DAY,
            "instances": ["1.2.9.1", "1.2.9.2"],
            "results": {},
        }
        (settings.spool_dir / study / "processed.json").write_text(json.dumps(marker))
    return settings.spool_dir / study


def _results(settings: Settings, study: str, days: float) -> Path:
    folder = settings.results_dir / study
    folder.mkdir(parents=True)
    (folder / "SR_1.2.8.1.dcm").write_bytes(b"\0" * 20_000)
    _age(folder, days)
    return folder


def _job(settings: Settings, where: str, study: str, days: float) -> Path:
    folder = settings.outbox_dir / where
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-{study}.json"
    path.write_text(json.dumps({"job_id": f"job-{study}", "study_uid": study, "paths": []}))
    _age(path, days)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Settings, dict[str, Path]]:
    settings = _settings(tmp_path, spool_days=30, results_days=90, audit_days=365, dead_letter_days=30)
    paths = {
        "old_delivered": _spooled(settings, "1.2.1", analysed_days_ago=40),
        "old_delivered_results": _results(settings, "1.2.1", days=100),
        "recent_delivered": _spooled(settings, "1.2.2", analysed_days_ago=2),
        "old_pending": _spooled(settings, "1.2.3", analysed_days_ago=40),
        "old_pending_results": _results(settings, "1.2.3", days=100),
        "pending_job": _job(settings, "pending/PACS", "1.2.3", days=40),
        "never_analysed": _spooled(settings, "1.2.4", analysed_days_ago=None),
        "late_instance": _spooled(settings, "1.2.5", analysed_days_ago=40, extra=True),
        "old_dead_job": _job(settings, "dead", "1.2.6", days=40),
        "old_dead_results": _results(settings, "1.2.6", days=100),
        "recent_dead_job": _job(settings, "dead", "1.2.7", days=3),
        "recent_dead_results": _results(settings, "1.2.7", days=100),
    }
    _age(paths["never_analysed"], 400)
    audit = AuditLog(settings.audit_log)
    audit.record("old", study="1.2.1")
    audit.record("new", study="1.2.2")
    lines = settings.audit_log.read_text().splitlines()
    first = json.loads(lines[0])
    first["time"] = NOW - 400 * DAY
    settings.audit_log.write_text("\n".join([json.dumps(first), lines[1]]) + "\n")
    return settings, paths


def test_purge_removes_what_is_past_its_time_and_keeps_unanalysed_and_undelivered(layout) -> None:
    settings, paths = layout
    plan = retention.plan(settings, now=NOW)
    planned = {(item.kind, item.name) for item in plan.items}
    assert planned == {
        ("spool", "1.2.1"),
        ("results", "1.2.1"),
        ("dead_letter", "job-1.2.6"),
        ("results", "1.2.6"),  # its dead letter is past dead_letter_days, so nobody will re-send them
    }
    assert plan.audit_lines == 1 and plan.kept_unanalysed == 2 and plan.kept_undelivered == 2
    removed = retention.execute(settings, plan, now=NOW)
    assert removed == {"spool": 1, "results": 2, "dead_letter": 1, "audit": 1}
    for gone in ("old_delivered", "old_delivered_results", "old_dead_job", "old_dead_results"):
        assert not paths[gone].exists(), gone
    for kept in set(paths) - {"old_delivered", "old_delivered_results", "old_dead_job", "old_dead_results"}:
        assert paths[kept].exists(), f"{kept} must be kept"
    assert [e["event"] for e in AuditLog(settings.audit_log).read()] == ["new"]


def test_free_space_target_purges_delivered_studies_oldest_first_and_never_undelivered(layout) -> None:
    settings, paths = layout
    greedy = _settings(
        settings.data_dir.parent,
        spool_days=0,
        results_days=0,
        audit_days=0,
        dead_letter_days=0,
        min_free_disk_mb=10**9,
    )
    plan = retention.plan(greedy, now=NOW)
    assert all(item.reason == "free space" for item in plan.items)
    ages = [item.age_days for item in plan.items]
    assert ages == sorted(ages, reverse=True), "oldest first"
    names = {(item.kind, item.name) for item in plan.items}
    assert names == {("spool", "1.2.1"), ("results", "1.2.1"), ("spool", "1.2.2")}
    retention.execute(greedy, plan, now=NOW)
    for kept in (
        "old_pending",
        "old_pending_results",
        "never_analysed",
        "late_instance",
        "recent_dead_results",
    ):
        assert paths[kept].exists(), f"{kept} must never be purged for space"


def test_results_of_a_study_still_being_analysed_are_never_purged_before_their_delivery_is_queued(
    tmp_path: Path,
) -> None:
    """An analysis writes its result files, then their delivery jobs, then the study's processed marker. Between
    the first two, "no delivery pending" does not mean delivered: a purge for space then took the results of a
    study whose PACS was down (found by the running-gateway retention test under CI load - its delivery then
    failed on missing files). Results of a spooled study not yet marked analysed stay; once it is, they may go."""
    settings = _settings(tmp_path, spool_days=0, results_days=0, min_free_disk_mb=10**9)
    _spooled(settings, "1.2.20", analysed_days_ago=None)  # its analysis is writing results right now
    results = _results(settings, "1.2.20", days=0)
    plan = retention.plan(settings, now=NOW)
    assert ("results", "1.2.20") not in {(item.kind, item.name) for item in plan.items}
    assert plan.kept_undelivered == 1
    retention.execute(settings, plan, now=NOW)
    assert results.exists()
    # Analysed and nothing pending: delivered - purgeable for space, results and images.
    marker = {"processed_at": NOW, "instances": ["1.2.9.1", "1.2.9.2"], "results": {}}
    (settings.spool_dir / "1.2.20" / "processed.json").write_text(json.dumps(marker))
    names = {(item.kind, item.name) for item in retention.plan(settings, now=NOW).items}
    assert names == {("spool", "1.2.20"), ("results", "1.2.20")}


def test_gateway_purge_dry_run_lists_and_removes_nothing(layout, capsys: pytest.CaptureFixture[str]) -> None:
    settings, paths = layout
    config = settings.data_dir.parent / "gateway.toml"
    before = sorted(str(p) for p in settings.data_dir.rglob("*"))
    assert main(["purge", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 1 spooled study(ies)" in out and "would remove 2 result folder(s)" in out
    assert "would remove 1 dead-letter job(s)" in out and "would remove 1 audit line(s)" in out
    assert "kept 2 study(ies) not yet analysed and 2 not yet delivered" in out
    assert sorted(str(p) for p in settings.data_dir.rglob("*")) == before
    assert main(["purge", "--config", str(config)]) == 0
    assert "removed 1 spooled study(ies)" in capsys.readouterr().out
    assert not paths["old_delivered"].exists() and paths["old_pending"].exists()


def test_disk_forecast_reports_hours_until_the_watermark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = [10 * 2**30]

    class Usage:
        @property
        def free(self) -> int:
            return free[0]

    monkeypatch.setattr(retention.shutil, "disk_usage", lambda path: Usage())
    forecast = retention.DiskForecast(tmp_path, watermark_bytes=2**30)
    forecast.sample(now=0.0)
    assert forecast.report()["hours_until_watermark"] is None
    free[0] -= 2**30  # 1 GiB in 30 minutes: 2 GiB/h, 8 GiB above the watermark -> 4 h
    forecast.sample(now=1800.0)
    report = forecast.report()
    assert report["fill_rate_bytes_per_hour"] == 2 * 2**30 and report["hours_until_watermark"] == 4.0


def test_a_purge_prunes_the_system_of_record_too(layout) -> None:
    """The instance index of purged images and audit rows past audit_days go; the study's record stays."""
    from sqlalchemy import func, select

    from gateway.core.domain import InstanceRecord
    from gateway.database import migrate, schema
    from gateway.database.connect import engine_for
    from gateway.database.recorder import Recorder

    settings, _ = layout
    engine = engine_for(settings.database_url)
    migrate.upgrade(engine)
    recorder = Recorder(engine, "n").start()
    for study in ("1.2.1", "1.2.2"):  # old and delivered (purged) / recent (kept)
        for sop in ("1.2.9.1", "1.2.9.2"):
            recorder.instance_stored(
                InstanceRecord(
                    sop_instance_uid=f"{study}.{sop}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_instance_uid=study,
                    series_instance_uid="1.2.9",
                    path=settings.spool_dir / study / "1.2.9" / f"{sop}.dcm",
                    calling_ae="PACS",
                    received_at=NOW - 40 * DAY,
                )
            )
    recorder.audit_event({"time": NOW - 400 * DAY, "event": "study_done", "study": "1.2.1"})
    recorder.audit_event({"time": NOW - 1 * DAY, "event": "study_done", "study": "1.2.2"})
    assert recorder.flush()
    recorder.close()
    removed = retention.execute(settings, retention.plan(settings, now=NOW), now=NOW)
    assert removed["instance rows"] == 2 and removed["audit rows"] == 1
    with engine.connect() as c:
        left = c.execute(select(schema.instances.c.study_uid)).scalars().all()
        studies = c.execute(select(func.count()).select_from(schema.studies)).scalar_one()
    engine.dispose()
    assert set(left) == {"1.2.2"} and studies == 2
