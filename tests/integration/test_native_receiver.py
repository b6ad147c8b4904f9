"""The native receiver (``build/gateway-storescp``, ``[receiver] engine = "native"``): acknowledged = fsynced,
checked at the system-call level with strace; the gateway's policy applied (calling AE allow-list, disk
watermark); supervised (restarted after a SIGKILL, gone with the gateway). The hostile corpus runs against it in
``test_hostile_input.py``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from gateway.app import Gateway
from gateway.config.settings import ReceiverSettings, load_settings
from gateway.core.domain import InstanceRecord
from gateway.core.errors import ConfigError
from gateway.demo.phantoms import write_head_ct
from gateway.inference.server import free_port
from gateway.ingest.native import NativeReceiver, native_binary
from gateway.ingest.spool import Spool, record_from_header
from tests.integration.test_ack_after_fsync import _durable_before_each_response
from tests.integration.test_hostile_input import send_raw
from tests.support.notices import series_items
from tests.support.servers import require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

_CALL = re.compile(r"^(?P<pid>\d+) +(?P<name>\w+)\((?P<args>.*)")
_FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")


def _ordered_log(trace: str) -> list[tuple[str, str]]:
    """strace's lines as (fsync, path) / (rename, "src -> dst") / (response, "") in the order they took effect:
    an fsync or rename when it returned, a response (a P-DATA-TF written to the association's socket) when it
    started."""
    log: list[tuple[str, str]] = []
    pending: dict[str, tuple[str, str]] = {}  # pid -> the call waiting to be resumed
    for line in trace.splitlines():
        resumed = re.match(r"^(\d+) +<\.\.\. (\w+) resumed>", line)
        if resumed:
            call = pending.pop(resumed.group(1), None)
            if call is not None and "= -1" not in line:
                log.append(call)
            continue
        match = _CALL.match(line)
        if match is None:
            continue
        name, args = match.group("name"), match.group("args")
        entry: tuple[str, str] | None = None
        if name == "fsync":
            path = _FD_PATH.match(args)
            entry = ("fsync", path.group("path")) if path else None
        elif name == "rename":
            paths = re.findall(r'"([^"]*)"', args)
            entry = ("rename", f"{paths[0]} -> {paths[1]}") if len(paths) == 2 else None
        elif name in ("write", "sendto", "sendmsg") and "<TCP" in args and '"\\4' in args:
            log.append(("response", ""))  # the response is out the moment the write starts
            continue
        if entry is None:
            continue
        if "<unfinished ...>" in line:
            pending[match.group("pid")] = entry
        elif "= -1" not in line:
            log.append(entry)
    return log


def _traced(tmp_path: Path, settings: ReceiverSettings, calls: str, paths: list[Path]) -> str:
    """Run the receiver under strace (``calls`` traced) while storescu sends ``paths``; the trace's text."""
    assert native_binary() is not None, "build/gateway-storescp is not built: run `make native`"
    strace = require_tool("strace")
    if subprocess.run([strace, "-f", "-o", os.devnull, "true"], capture_output=True).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace is not permitted in this container)")
    receiver = NativeReceiver(
        settings, Spool(tmp_path / "spool"), lambda record: None, allowed_calling_aes=frozenset({"STORESCU"})
    )
    trace = tmp_path / "strace.log"
    process = subprocess.Popen(
        [strace, "-f", "-yy", "-s", "80", "-e", f"trace={calls}", "-o", str(trace), *receiver.command()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().startswith(b"READY")
        done = storescu(paths, port=settings.port, calling_ae="STORESCU")
        assert done.returncode == 0, done.stderr[-500:]
    finally:
        assert process.stdin is not None
        process.stdin.close()  # the receiver exits when its stdin closes
        process.wait(timeout=30)
    return trace.read_text()


def test_without_a_journal_every_instance_is_fsynced_and_renamed_and_its_folder_fsynced_before_its_response(
    tmp_path: Path,
) -> None:
    series = write_head_ct(tmp_path / "series", slices=8, rows=64, cols=64, seed=5)
    settings = ReceiverSettings(port=free_port(), min_free_disk_mb=0, journal_mb=0)
    trace = _traced(tmp_path, settings, "fsync,rename,write,sendto,sendmsg", list(series.paths))
    log = _ordered_log(trace)
    counts = _durable_before_each_response(log)
    assert len(counts) == 8, log  # one C-STORE response per instance
    assert counts == list(range(1, 9)), (counts, log)
    first_response = next(i for i, (kind, _) in enumerate(log) if kind == "response")
    synced_before = {what for kind, what in log[:first_response] if kind == "fsync"}
    study_folder = next((tmp_path / "spool").glob("1.*"))
    assert {str(study_folder.parent), str(study_folder)} <= synced_before


def test_with_a_journal_every_instance_is_in_the_journal_and_synced_before_its_response(
    tmp_path: Path,
) -> None:
    """The journal's rule at the system-call level: before the k-th response, k records were written to the
    journal (a pwrite of a slot's first block with the record magic in it) and an fdatasync of the journal returned
    after them; no
    spool file is fsynced on its own (the writer syncs them in batches, after the acknowledgements)."""
    series = write_head_ct(tmp_path / "series", slices=8, rows=64, cols=64, seed=5)
    settings = ReceiverSettings(port=free_port(), min_free_disk_mb=0, journal_mb=8)
    trace = _traced(
        tmp_path, settings, "pwrite64,fdatasync,fsync,syncfs,write,sendto,sendmsg", list(series.paths)
    )
    pending: dict[str, str] = {}
    log: list[str] = []  # "record" when a record's pwrite returned, "sync" when a journal fdatasync returned
    for line in trace.splitlines():
        resumed = re.match(r"^(\d+) +<\.\.\. (\w+) resumed>", line)
        if resumed:
            kind = pending.pop(resumed.group(1), None)
            if kind is not None and "= -1" not in line:
                log.append(kind)
            continue
        match = _CALL.match(line)
        if match is None:
            continue
        name, args = match.group("name"), match.group("args")
        if name in ("write", "sendto", "sendmsg") and "<TCP" in args and '"\\4' in args:
            log.append("response")
            continue
        kind = ""
        if name == "pwrite64" and "journal>" in args and "GWRECD02" in args:  # a slot's block with its record
            kind = "record"
        elif name == "fdatasync" and "journal>" in args:
            kind = "sync"
        elif name == "fsync" and "journal>" not in args:  # (the journal itself is fsynced once, written out)
            kind = "file fsync"  # the direct path (an instance that did not fit the journal)
        if not kind:
            continue
        if "<unfinished ...>" in line:
            pending[match.group("pid")] = kind
        elif "= -1" not in line:
            log.append(kind)
    durable, written, counts = 0, 0, []
    for kind in log:
        if kind == "record":
            written += 1
        elif kind == "sync":
            durable = written
        elif kind == "response":
            counts.append(durable)
    assert len(counts) == 8, log  # one C-STORE response per instance
    assert all(c >= k for k, c in enumerate(counts, start=1)), (counts, log)
    assert "file fsync" not in log, (
        log
    )  # every instance acknowledged from the journal, none fsynced on its own
    # A clean stop lets the writer finish: every instance is in the spool, nothing left to replay.
    assert len(list((tmp_path / "spool").glob("1.*/*/*.dcm"))) == 8


def test_an_instance_acknowledged_from_the_journal_survives_a_crash_before_its_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver's spool writes held back (fault injection): every instance is acknowledged from the journal alone,
    none is in the spool. SIGKILLed and restarted by the gateway, the receiver puts them in the spool from the
    journal, and the gateway assembles them - nothing acknowledged is lost."""
    monkeypatch.setenv("GATEWAY_STORESCP_PAUSE_WRITER", "1")
    gateway = _native_gateway(tmp_path, "journal_mb = 8\n")
    try:
        series = write_head_ct(tmp_path / "s", slices=5, rows=128, cols=128, seed=75)
        assert storescu(list(series.paths), port=gateway.port, calling_ae="STORESCU").returncode == 0
        time.sleep(0.5)
        assert _spooled(tmp_path, series.study_uid) == 0, "the writer was to be held back"
        assert gateway.assembler.pending_studies() == 0
        monkeypatch.delenv("GATEWAY_STORESCP_PAUSE_WRITER")  # the restarted receiver writes as usual
        os.kill(gateway.health()["receiver"]["pid"], signal.SIGKILL)
        wait_for(lambda: gateway.health()["receiver"]["restarts"] == 1, timeout_s=30, what="a restart")
        wait_for(lambda: _spooled(tmp_path, series.study_uid) == 5, timeout_s=10, what="the replay")
        wait_for(
            lambda: gateway.assembler.pending_studies() == 1, timeout_s=10, what="the study to be pending"
        )
        for path in series.paths:  # the same bytes as sent (behind the receiver's file meta)
            sent = pydicom.dcmread(path)
            kept = pydicom.dcmread(
                tmp_path
                / "data"
                / "spool"
                / series.study_uid
                / sent.SeriesInstanceUID
                / f"{sent.SOPInstanceUID}.dcm"
            )
            assert (
                kept.PixelData == sent.PixelData and kept.file_meta.SourceApplicationEntityTitle == "STORESCU"
            )
        # A second restart replays nothing: the journal's checkpoint moved past what is in the spool.
        os.kill(gateway.health()["receiver"]["pid"], signal.SIGKILL)
        wait_for(lambda: gateway.health()["receiver"]["restarts"] == 2, timeout_s=30, what="a second restart")
        replays = [r.getMessage() for r in caplog.records if "from its journal" in r.getMessage()]
        assert len(replays) == 1 and "5 acknowledged instance(s)" in replays[0], replays
    finally:
        gateway.stop()


def test_the_journal_replays_every_acknowledged_instance_past_slots_it_gave_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot is reserved before an instance arrives; some are given up: an instance refused once received, and a
    first instance larger than the slot an association starts with (written again, whole, in a slot its size).
    With the writer held back and the receiver SIGKILLed, the replay walks past the given-up slots: every
    acknowledged instance is in the spool, byte for byte, and the refused one is not."""
    monkeypatch.setenv("GATEWAY_STORESCP_PAUSE_WRITER", "1")
    gateway = _native_gateway(tmp_path, "journal_mb = 32\n")
    try:
        big = write_head_ct(
            tmp_path / "big", slices=1, rows=1024, cols=1024, seed=81
        )  # 2 MiB > the first slot
        small = write_head_ct(
            tmp_path / "small", slices=3, rows=64, cols=64, seed=82, study_uid=big.study_uid
        )
        refused = pydicom.dcmread(small.paths[0])
        refused.SOPInstanceUID = refused.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        refused.SeriesInstanceUID = "1.2.invalid"  # cannot name a spool folder: refused after it is received
        refused.save_as(tmp_path / "refused.dcm")
        sent = [big.paths[0], small.paths[0], tmp_path / "refused.dcm", small.paths[1], small.paths[2]]
        done = subprocess.run(
            [require_tool("storescu"), "-nh", "-aet", "STORESCU", "-aec", "AI_GATEWAY", "127.0.0.1",
             str(gateway.port), *map(str, sent)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-800:]
        refusals = [r.getMessage() for r in caplog.records if "refused (status" in r.getMessage()]
        assert len(refusals) == 1 and "0xC000" in refusals[0], refusals  # the invalid UID, and only it
        assert _spooled(tmp_path, big.study_uid) == 0, "the writer was to be held back"
        monkeypatch.delenv("GATEWAY_STORESCP_PAUSE_WRITER")
        os.kill(gateway.health()["receiver"]["pid"], signal.SIGKILL)
        wait_for(lambda: gateway.health()["receiver"]["restarts"] == 1, timeout_s=30, what="a restart")
        wait_for(lambda: _spooled(tmp_path, big.study_uid) == 4, timeout_s=10, what="the replay")
        spool = tmp_path / "data" / "spool" / big.study_uid
        for path in [p for p in sent if p.name != "refused.dcm"]:
            original = pydicom.dcmread(path)
            kept = spool / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm"
            assert pydicom.dcmread(kept).PixelData == original.PixelData
        assert (
            not list(spool.glob("1.2.invalid/*"))
            and not (tmp_path / "data" / "spool" / "1.2.invalid").exists()
        )
        time.sleep(0.5)  # nothing more comes: the refused instance had no record
        assert _spooled(tmp_path, big.study_uid) == 4
    finally:
        gateway.stop()


def test_a_journal_in_the_earlier_format_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    """A journal written by the first receiver version (its records laid out differently) is neither replayed
    wrongly nor overwritten: the receiver does not start, and says why and what to do."""
    settings = ReceiverSettings(port=free_port(), min_free_disk_mb=0, engine="native", journal_mb=8)
    receiver = NativeReceiver(
        settings, Spool(tmp_path / "spool"), lambda record: None, allowed_calling_aes=frozenset({"STORESCU"})
    )
    receiver.journal.parent.mkdir(parents=True, exist_ok=True)
    receiver.journal.write_bytes(b"GWJRNL01" + bytes(8 << 20))
    with pytest.raises(ConfigError, match=r"journal format 1.*start that version once"):
        receiver.start()
    assert receiver.journal.read_bytes()[:8] == b"GWJRNL01"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def _native_gateway(tmp_path: Path, extra: str = "") -> Gateway:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\nengine = "native"\n'
        f"accept_notices = false\n{extra}[http]\nenabled = false\n"
        '[triton]\nurl = "127.0.0.1:1"\n'  # no analysis here: what is received is the subject
        '[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = 11112\n'
    )
    return Gateway(load_settings(config)).start()


def _spooled(tmp_path: Path, study_uid: str) -> int:
    return len(list((tmp_path / "data" / "spool" / study_uid).glob("*/*.dcm")))


def test_the_gateway_supervises_the_native_receiver_and_applies_its_policy(tmp_path: Path) -> None:
    gateway = _native_gateway(tmp_path)
    try:
        health = gateway.health()["receiver"]
        assert health["engine"] == "native" and health["restarts"] == 0
        first = write_head_ct(tmp_path / "first", slices=4, rows=128, cols=128, seed=71)
        assert storescu(list(first.paths), port=gateway.port, calling_ae="STORESCU").returncode == 0
        # Acknowledged from the journal; the spool files follow at once.
        wait_for(lambda: _spooled(tmp_path, first.study_uid) == 4, timeout_s=10, what="the spool files")
        # Each instance reached the assembler (read back after its acknowledgement), the study is pending.
        wait_for(
            lambda: gateway.assembler.pending_studies() == 1, timeout_s=10, what="the study to be pending"
        )

        # A calling AE title that is not a configured peer is refused at association; nothing is kept.
        stranger = write_head_ct(tmp_path / "stranger", slices=1, rows=64, cols=64, seed=72)
        assert storescu(list(stranger.paths), port=gateway.port, calling_ae="STRANGER").returncode != 0
        assert _spooled(tmp_path, stranger.study_uid) == 0

        # SIGKILLed, it is restarted and receives again.
        os.kill(health["pid"], signal.SIGKILL)
        wait_for(lambda: gateway.health()["receiver"]["restarts"] == 1, timeout_s=30, what="a restart")
        second = write_head_ct(tmp_path / "second", slices=3, rows=128, cols=128, seed=73)
        wait_for(
            lambda: storescu(list(second.paths), port=gateway.port, calling_ae="STORESCU").returncode == 0,
            timeout_s=30,
            what="the restarted receiver to accept a study",
        )
        wait_for(lambda: _spooled(tmp_path, second.study_uid) == 3, timeout_s=10, what="the spool files")
        pid = gateway.health()["receiver"]["pid"]
    finally:
        gateway.stop()
    assert not _alive(pid), "the native receiver outlived the gateway"


def test_the_native_receiver_refuses_below_the_disk_watermark(tmp_path: Path) -> None:
    gateway = _native_gateway(tmp_path, "min_free_disk_mb = 1000000000\n")
    try:
        series = write_head_ct(tmp_path / "s", slices=2, rows=64, cols=64)
        assert [send_raw(gateway.port, path) for path in series.paths] == ["0xA700", "0xA700"]
        assert _spooled(tmp_path, series.study_uid) == 0
    finally:
        gateway.stop()


def test_settings_the_native_receiver_cannot_serve_are_refused_with_the_reason(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\nengine = "native"\n'
        '[http]\nenabled = false\n[triton]\nurl = "127.0.0.1:1"\n'
    )
    with pytest.raises(Exception, match="services_port"):
        Gateway(load_settings(config)).start()


def test_the_records_it_hands_on_are_those_the_python_spool_would_make(tmp_path: Path) -> None:
    """The receiver sends the record's fields it read from the header; they must equal what the gateway reads
    with pydicom - and where a value is not plain ASCII (here a description in Latin-1) the gateway reads it."""
    series = write_head_ct(tmp_path / "s", slices=3, rows=32, cols=32, seed=74, priority="STAT")
    files = list(series.paths)
    ds = pydicom.dcmread(files[1])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = "Schädel nativ"
    ds.AccessionNumber = "ACC 42"
    ds.save_as(files[1])
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    records: list[InstanceRecord] = []
    port = free_port()
    receiver = NativeReceiver(
        ReceiverSettings(port=port, min_free_disk_mb=0, engine="native", accept_notices=False),
        Spool(tmp_path / "spool"),
        records.append,
        allowed_calling_aes=frozenset({"STORESCU"}),
    )
    receiver.start()
    try:
        assert storescu(files, port=port, calling_ae="STORESCU").returncode == 0
        wait_for(lambda: len(records) == 3, timeout_s=10, what="three records")
    finally:
        receiver.stop()
    for record in records:
        expected = record_from_header(
            pydicom.dcmread(record.path), record.path, "STORESCU", record.received_at
        )
        assert record == expected
    assert {r.series_description for r in records} >= {"Schädel nativ"}
    assert sorted(r.has_pixel_data for r in records) == [False, True, True]


def test_with_a_services_port_mpps_is_answered_beside_the_native_receiver(tmp_path: Path) -> None:
    """engine = "native" with [receiver] services_port: images to the native port, an MPPS to the services port
    (the pynetdicom receiver) - the MPPS in progress holds the study open past its quiet period, its N-SET
    COMPLETED closes it. Without services_port these settings are refused (previous test)."""
    services = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n[receiver]\nport = {free_port()}\n'
        f'engine = "native"\nservices_port = {services}\n[http]\nenabled = false\n'
        '[triton]\nurl = "127.0.0.1:1"\n'
        '[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = 11112\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        health = gateway.health()["receiver"]
        assert health["engine"] == "native" and health["services"] == {
            "engine": "pynetdicom",
            "port": services,
        }
        series = write_head_ct(tmp_path / "s", slices=3, rows=64, cols=64, seed=74)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", services, ae_title="AI_GATEWAY")
        assert assoc.is_established
        try:
            step = generate_uid()
            created = Dataset()
            created.PerformedProcedureStepStatus = "IN PROGRESS"
            scheduled = Dataset()
            scheduled.StudyInstanceUID = series.study_uid
            created.ScheduledStepAttributesSequence = [scheduled]
            assert assoc.send_n_create(created, ModalityPerformedProcedureStep, step)[0].Status == 0x0000
            assert storescu(list(series.paths), port=gateway.port, calling_ae="STORESCU").returncode == 0
            assert _spooled(tmp_path, series.study_uid) == 3  # through the native receiver
            time.sleep(3.0)  # three quiet periods: the MPPS in progress holds the study open
            assert gateway.assembler.pending_studies() == 1
            completed = Dataset()
            completed.PerformedProcedureStepStatus = "COMPLETED"
            completed.PerformedSeriesSequence = series_items(list(series.paths))
            assert assoc.send_n_set(completed, ModalityPerformedProcedureStep, step)[0].Status == 0x0000
        finally:
            assoc.release()
        wait_for(lambda: gateway.assembler.pending_studies() == 0, timeout_s=10, what="the study to close")
    finally:
        gateway.stop()


@pytest.mark.parametrize("journal_mb", [0, 8], ids=["direct", "journal"])
def test_each_instance_is_handed_on_with_its_spool_file_whole_and_the_association_end_after_them(
    tmp_path: Path, journal_mb: int
) -> None:
    """With a journal the spool files are written after the acknowledgements, by a thread of their own (copied
    from the journal): an instance is handed on only once its file is at its path, whole, and its association's
    end only after every instance of it."""
    series = write_head_ct(tmp_path / "s", slices=12, rows=128, cols=128, seed=75)
    pixels = {ds.SOPInstanceUID: ds.PixelData for ds in map(pydicom.dcmread, series.paths)}
    events: list[tuple[str, object]] = []

    def stored(record: InstanceRecord) -> None:
        ds = pydicom.dcmread(record.path)  # at once, on the receiver's event thread
        events.append(
            (
                "stored",
                ds.SOPInstanceUID == record.sop_instance_uid and ds.PixelData == pixels[ds.SOPInstanceUID],
            )
        )

    port = free_port()
    receiver = NativeReceiver(
        ReceiverSettings(
            port=port, min_free_disk_mb=0, engine="native", accept_notices=False, journal_mb=journal_mb
        ),
        Spool(tmp_path / "spool"),
        stored,
        allowed_calling_aes=frozenset({"STORESCU"}),
        on_association_end=lambda studies, problem: events.append(("end", (studies, problem))),
    )
    receiver.start()
    try:
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        wait_for(
            lambda: ("end", ({series.study_uid}, "")) in events, timeout_s=10, what="the association's end"
        )
    finally:
        receiver.stop()
    assert events == [("stored", True)] * 12 + [("end", ({series.study_uid}, ""))]


def test_a_clean_stop_with_a_journal_leaves_every_instance_in_the_spool_and_nothing_to_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped at once after its last acknowledgement, the receiver first lets its writer finish the spool files
    and its settler sync them and move the journal's checkpoint: every instance is in the spool, and the next start
    replays nothing (a stop that left them to the journal would replay them all)."""
    series = write_head_ct(tmp_path / "s", slices=40, rows=256, cols=256, seed=76)
    settings = ReceiverSettings(
        port=free_port(), min_free_disk_mb=0, engine="native", accept_notices=False, journal_mb=16
    )
    spool = Spool(tmp_path / "spool")

    def receiver() -> NativeReceiver:
        return NativeReceiver(
            settings, spool, lambda record: None, allowed_calling_aes=frozenset({"STORESCU"})
        )

    first = receiver()
    first.start()
    try:
        assert storescu(list(series.paths), port=settings.port, calling_ae="STORESCU").returncode == 0
    finally:
        first.stop()
    assert len(list((tmp_path / "spool" / series.study_uid).glob("*/*.dcm"))) == 40
    caplog.set_level("WARNING")
    second = receiver()
    second.start()
    second.stop()
    assert not [r.getMessage() for r in caplog.records if "from its journal" in r.getMessage()]
