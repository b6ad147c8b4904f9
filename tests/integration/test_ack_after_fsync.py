"""Acknowledged = on disk, checked at the system-call level. A SIGKILL test cannot see a missing fsync (a killed
process keeps the page cache; only a power cut loses it), so this one watches what the receiver does: every
``fsync`` (with the path of the file or folder it syncs), every ``rename`` and every PDU sent to the SCU, in one
ordered log, while DCMTK storescu sends a series over a real association. Before the C-STORE response of the
k-th instance, k instances must each have been written to a temporary file, that file fsynced, renamed into
place, and its folder fsynced - so the test fails if any of those syncs is removed, or moved after the
acknowledgement (batched later, or handed to a background thread)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.transport import AssociationSocket

from gateway.config.settings import ReceiverSettings
from gateway.core.domain import InstanceRecord
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from gateway.ingest.receiver import StoreSCP
from gateway.ingest.spool import Spool
from tests.support.servers import storescu

P_DATA_TF = 0x04


def _syscall_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    log: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_replace, real_send = os.fsync, os.replace, AssociationSocket.send

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        with lock:
            log.append(("fsync", target))

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        with lock:
            log.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))

    def send(self: AssociationSocket, data: bytes) -> None:
        with lock:
            if data and data[0] == P_DATA_TF:
                log.append(("response", ""))
        real_send(self, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(AssociationSocket, "send", send)
    return log


def _durable_before_each_response(log: list[tuple[str, str]]) -> list[int]:
    """For each response in order: how many instances were fully durable before it was sent."""
    synced_tmp: set[str] = set()
    renamed: dict[str, str] = {}  # final path -> its folder, awaiting the folder's fsync
    durable: set[str] = set()
    counts = []
    for kind, what in log:
        if kind == "fsync":
            if what.endswith(".tmp"):
                synced_tmp.add(what)
            for final, folder in list(renamed.items()):
                if what == folder:
                    durable.add(final)
                    del renamed[final]
        elif kind == "rename":
            src, dst = what.split(" -> ")
            if src in synced_tmp and dst.endswith(".dcm"):  # a file renamed before its data was synced is not
                renamed[dst] = str(Path(dst).parent)
        else:
            counts.append(len(durable))
    return counts


def test_every_instance_is_fsynced_and_renamed_and_its_folder_fsynced_before_its_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = write_head_ct(tmp_path / "series", slices=8, rows=64, cols=64, seed=5)
    stored: list[InstanceRecord] = []
    port = free_port()
    scp = StoreSCP(
        ReceiverSettings(port=port, min_free_disk_mb=0),
        Spool(tmp_path / "spool"),
        stored.append,
        allowed_calling_aes=frozenset({"STORESCU"}),
    )
    scp.start()
    try:
        log = _syscall_log(monkeypatch)
        done = storescu(list(series.paths), port=port, calling_ae="STORESCU")
    finally:
        monkeypatch.undo()
        scp.stop()
    assert done.returncode == 0, done.stderr[-500:]
    assert len(stored) == 8
    counts = _durable_before_each_response(log)
    assert len(counts) == 8, log  # one C-STORE response per instance
    assert counts == list(range(1, 9)), (counts, log)
    # The new study and series folders were synced into their parents before the first acknowledgement.
    first_response = next(i for i, (kind, _) in enumerate(log) if kind == "response")
    synced_before = {what for kind, what in log[:first_response] if kind == "fsync"}
    study_folder = Path(stored[0].path).parent.parent
    assert {str(study_folder.parent), str(study_folder)} <= synced_before
