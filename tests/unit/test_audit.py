"""The audit trail's writer thread: nobody waits for the disk, and nothing is reordered or lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from gateway.ops.audit import AuditLog


def test_with_a_writer_record_returns_before_the_disk_and_read_sees_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.start_writer()
    disk = threading.Event()
    writers: set[str] = set()
    original = AuditLog._write

    def slow_write(self: AuditLog, data: bytes) -> None:
        writers.add(threading.current_thread().name)
        disk.wait(10)
        original(self, data)

    monkeypatch.setattr(AuditLog, "_write", slow_write)
    try:
        for i in range(50):
            audit.record("step", n=i)  # would hang here for 10 s each if record waited for the disk
        assert audit.backlog > 0
        disk.set()
        assert [e["n"] for e in audit.read()] == list(range(50))
    finally:
        audit.close()
    assert {name.split("_")[0] for name in writers} == {"audit-writer"}


def test_then_runs_after_every_earlier_event_is_on_disk(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.start_writer()
    try:
        seen: list[tuple[int, int]] = []
        for i in range(20):
            audit.record("step", n=i)
            future = audit.then(lambda i=i: seen.append((i, len(AuditLog(audit.path).read()))))
        future.result(timeout=10)
    finally:
        audit.close()
    assert [i for i, _ in seen] == list(range(20))  # in the order asked
    assert all(on_disk >= i + 1 for i, on_disk in seen)  # (events arriving together share one write)


def test_events_arriving_together_share_an_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    syncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real_fsync(fd)

    gate = threading.Event()
    audit.start_writer()
    try:
        audit.then(lambda: gate.wait(10))  # hold the writer while 100 events are recorded
        for i in range(100):
            audit.record("step", n=i)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        gate.set()
        audit.then(lambda: None).result(timeout=10)
    finally:
        audit.close()
    assert len(audit.read()) == 100
    assert syncs < 10  # one per batch; 100 with one fsync per event


def test_close_writes_what_is_queued_and_later_events_are_written_at_once(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.start_writer()
    for i in range(10):
        audit.record("step", n=i)
    audit.close()
    assert len(AuditLog(audit.path).read()) == 10
    audit.record("late")
    assert AuditLog(audit.path).read()[-1]["event"] == "late"


def test_a_failed_write_keeps_the_events_in_order_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    original = AuditLog._write
    failing = True

    def full_disk(self: AuditLog, data: bytes) -> None:
        if failing:
            raise OSError(28, "No space left on device")
        original(self, data)

    monkeypatch.setattr(AuditLog, "_write", full_disk)
    audit.start_writer()
    try:
        audit.record("a")
        audit.record("b")
        audit.then(lambda: None).result(timeout=10)
        assert audit.backlog == 2 and "No space" in audit.last_error
        failing = False
        audit.record("c")
        assert [e["event"] for e in audit.read()] == ["a", "b", "c"]
        assert audit.backlog == 0 and audit.last_error == ""
    finally:
        audit.close()
