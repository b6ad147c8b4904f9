"""Spool, assembly, routing and scheduling - the stages before inference."""

import asyncio
import dataclasses
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from gateway.config.settings import load_settings
from gateway.core.domain import InstanceRecord, Priority, Series, Study
from gateway.core.errors import InvalidInstanceError, SpoolFullError
from gateway.demo.phantoms import write_head_ct
from gateway.ingest.assembler import StudyAssembler
from gateway.ingest.spool import Spool, node_file_name
from gateway.orchestration.routing import InferenceJob, Router
from gateway.orchestration.scheduler import JobQueue


def _body(path: Path) -> tuple[FileMetaDataset, bytes]:
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    offset = raw.index(b"DICM") + 4
    meta_len = int.from_bytes(raw[offset + 8 : offset + 12], "little")
    body = raw[offset + 12 + meta_len :]
    return ds.file_meta, body


def test_spool_stores_durably_and_recovers_unprocessed(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=3, rows=32, cols=32)
    spool = Spool(tmp_path / "spool")
    records = [spool.store(*_body(p), calling_ae="PACS1") for p in series.paths]
    for record in records:
        assert record.path.exists()
        assert stat.S_IMODE(record.path.stat().st_mode) == 0o600
        stored = pydicom.dcmread(record.path)
        assert stored.SOPInstanceUID == record.sop_instance_uid
        assert stored.file_meta.SourceApplicationEntityTitle == "PACS1"
        assert record.has_pixel_data and record.modality == "CT" and record.body_part == "HEAD"
    recovered = spool.recover()
    assert {r.sop_instance_uid for r in recovered} == set(series.sop_uids)
    assert {r.calling_ae for r in recovered} == {"PACS1"}
    spool.mark_processed(series.study_uid, series.sop_uids[:2])
    assert [r.sop_instance_uid for r in spool.recover()] == [series.sop_uids[2]]


def test_a_shared_spool_says_which_nodes_received_a_study(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=2, rows=16, cols=16)
    spool = Spool(tmp_path / "spool")
    spool.mark_received_by(series.study_uid, "node-1")  # nothing of the study here yet: no folder made
    assert not (tmp_path / "spool" / series.study_uid).exists()
    for path in series.paths:
        spool.store(*_body(path), calling_ae="PACS1")
    spool.mark_received_by(series.study_uid, "node-1")
    spool.mark_received_by(series.study_uid, "node-1")
    spool.mark_received_by(series.study_uid, "../gw 2")  # not a safe file name: its hash stands for it
    marks = spool.received_by(series.study_uid)
    assert marks == {"node-1", node_file_name("../gw 2")} and node_file_name("../gw 2").isalnum()
    assert len(spool.recover()) == 2 and spool.unprocessed_studies() == [series.study_uid]


def test_spool_refuses_path_like_uids_and_respects_watermark(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path / "in", slices=1, rows=16, cols=16)
    meta, _ = _body(series.paths[0])
    ds = pydicom.dcmread(series.paths[0])
    ds.StudyInstanceUID = "../../etc"
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    offset = raw.index(b"DICM") + 4
    body = raw[offset + 12 + int.from_bytes(raw[offset + 8 : offset + 12], "little") :]
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidInstanceError, match="StudyInstanceUID"):
        spool.store(meta, body, calling_ae="PACS1")
    full = Spool(tmp_path / "spool2", min_free_bytes=2**62)
    with pytest.raises(SpoolFullError):
        full.store(*_body(series.paths[0]), calling_ae="PACS1")
    assert not any((tmp_path / "spool2").iterdir())


def _record(study: str, series: str, sop: str, **kw: object) -> InstanceRecord:
    fields = dict(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study,
        series_instance_uid=series,
        path=Path("/nonexistent"),
        calling_ae="PACS1",
        received_at=0.0,
        modality="CT",
    )
    fields.update(kw)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def test_assembler_holds_a_study_whose_association_ended_badly_until_the_guard_time() -> None:
    now = [100.0]
    assembler = StudyAssembler(5.0, incomplete_guard_s=60.0, clock=lambda: now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    assembler.add(_record("1.2.4", "1.2.4.1", "1.2.4.1.1"))
    assembler.association_ended({"1.2.3", "1.2.4"}, "association aborted")
    now[0] = 110.0
    assert assembler.pop_complete() == [], (
        "a study whose sender aborted is not analysed after the quiet period"
    )
    assembler.add(_record("1.2.4", "1.2.4.1", "1.2.4.1.2"))  # the sender retries study 1.2.4 ...
    assembler.association_ended({"1.2.4"}, "")  # ... in an association that ends in a normal release
    now[0] = 115.0
    [retried] = assembler.pop_complete()
    assert retried.study_instance_uid == "1.2.4" and retried.incomplete_reason == ""
    now[0] = 159.9
    assert assembler.pop_complete() == []
    now[0] = 160.0
    [abandoned] = assembler.pop_complete()
    assert abandoned.study_instance_uid == "1.2.3" and abandoned.incomplete_reason == "association aborted"


def test_a_study_still_being_received_is_not_closed_by_the_quiet_period() -> None:
    """A sender that pauses mid-study on an open association (a busy modality, a slow link) must not have its
    study analysed in two parts: the quiet period runs from the association's end."""
    now = [100.0]
    wakes: list[float] = []
    assembler = StudyAssembler(5.0, incomplete_guard_s=60.0, clock=lambda: now[0])
    assembler.on_earlier_deadline = lambda: wakes.append(now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"), receiving=True)
    now[0] = 120.0  # four quiet periods, the association still open
    assert assembler.pop_complete() == []
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.2"), receiving=True)
    now[0] = 130.0
    assembler.association_ended({"1.2.3"}, "")
    assert wakes == [100.0, 130.0], (
        "the sleeper is woken when the association's end moves the deadline earlier"
    )
    assert assembler.seconds_until_next() == 5.0
    now[0] = 135.0
    [study] = assembler.pop_complete()
    assert study.instance_count == 2
    # An association whose end is never heard of holds its study only for the guard time.
    assembler.add(_record("1.2.4", "1.2.4.1", "1.2.4.1.1"), receiving=True)
    now[0] = 194.9
    assert assembler.pop_complete() == []
    now[0] = 195.0
    assert [s.study_instance_uid for s in assembler.pop_complete()] == ["1.2.4"]


def test_assembler_waits_for_the_quiet_period() -> None:
    now = [100.0]
    assembler = StudyAssembler(5.0, clock=lambda: now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    now[0] = 103.0
    assembler.add(_record("1.2.3", "1.2.3.2", "1.2.3.2.1"))
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))  # re-sent: replaces, not duplicates
    now[0] = 107.9
    assert assembler.pop_complete() == []
    now[0] = 108.0
    [study] = assembler.pop_complete()
    assert study.instance_count == 2
    assert [s.series_instance_uid for s in study.series] == ["1.2.3.1", "1.2.3.2"]
    assert assembler.pending_studies() == 0


def test_assembler_says_when_the_next_study_is_due_and_wakes_the_sleeper_once() -> None:
    """The loop sleeps until the next deadline instead of polling; with nothing pending it sleeps until the
    first instance of a new study wakes it (once, not per instance)."""
    now = [100.0]
    wakes: list[float] = []
    assembler = StudyAssembler(5.0, incomplete_guard_s=60.0, clock=lambda: now[0])
    assembler.on_earlier_deadline = lambda: wakes.append(now[0])
    assert assembler.seconds_until_next() is None
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    now[0] = 102.0
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.2"))
    assembler.add(_record("1.2.4", "1.2.4.1", "1.2.4.1.1"))
    assert wakes == [100.0], "woken when the first study started waiting, not per instance"
    assert assembler.seconds_until_next() == 5.0  # both studies' last instance came at 102
    assembler.association_ended({"1.2.3"}, "association aborted")
    now[0] = 107.0
    assert assembler.seconds_until_next() == 0.0
    [due] = assembler.pop_complete()
    assert due.study_instance_uid == "1.2.4"
    assert assembler.seconds_until_next() == 55.0  # the aborted one waits for the guard time
    now[0] = 162.0
    assert len(assembler.pop_complete()) == 1 and assembler.seconds_until_next() is None
    assembler.add(_record("1.2.5", "1.2.5.1", "1.2.5.1.1"))
    assert wakes == [100.0, 162.0]


def test_an_mpps_in_progress_holds_a_study_past_the_quiet_period_and_its_list_closes_it() -> None:
    now = [100.0]
    wakes: list[float] = []
    assembler = StudyAssembler(5.0, incomplete_guard_s=60.0, longest_wait_s=600.0, clock=lambda: now[0])
    assembler.on_earlier_deadline = lambda: wakes.append(now[0])
    assembler.hold("1.2.3", "MPPS in progress")  # before any image: kept until the study starts arriving
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    now[0] = 200.0  # 20 quiet periods later, a gap before the next series
    assert assembler.pop_complete() == []
    assembler.add(_record("1.2.3", "1.2.3.2", "1.2.3.2.1"))
    assembler.expect("1.2.3", frozenset({"1.2.3.1.1", "1.2.3.2.1", "1.2.3.3.1"}), "MPPS completed")
    now[0] = 260.0
    assert assembler.pop_complete() == []  # one listed instance is still missing
    wakes.clear()
    assembler.add(_record("1.2.3", "1.2.3.3", "1.2.3.3.1"))
    assert wakes == [260.0]  # the deadline moved earlier: the sleeper is woken
    assert assembler.seconds_until_next() == pytest.approx(0.2)
    now[0] = 260.3  # within a second of the last listed instance, not after a quiet period
    (study,) = assembler.pop_complete()
    assert study.instance_count == 3 and len(study.series) == 3


def test_a_lost_mpps_completion_closes_the_study_at_the_longest_wait() -> None:
    now = [100.0]
    assembler = StudyAssembler(5.0, longest_wait_s=600.0, clock=lambda: now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    assembler.hold("1.2.3", "MPPS in progress")
    now[0] = 699.0
    assert assembler.pop_complete() == []
    now[0] = 700.5
    assert len(assembler.pop_complete()) == 1


def test_an_in_progress_notice_never_reopens_a_completed_list() -> None:
    now = [100.0]
    assembler = StudyAssembler(5.0, longest_wait_s=600.0, clock=lambda: now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    assembler.expect("1.2.3", frozenset({"1.2.3.1.1"}), "IAN")
    assembler.hold("1.2.3", "MPPS in progress")
    now[0] = 100.3
    assert len(assembler.pop_complete()) == 1


def test_an_order_that_says_how_many_images_closes_the_study_once_they_are_all_in() -> None:
    now = [100.0]
    wakes: list[float] = []
    started: list[tuple[str, str]] = []
    assembler = StudyAssembler(30.0, longest_wait_s=600.0, clock=lambda: now[0])
    assembler.on_earlier_deadline = lambda: wakes.append(now[0])
    assembler.on_new_study = lambda study, accession: started.append((study, accession))
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1", accession_number="ACC-7"))
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.2", accession_number="ACC-7"))
    assert started == [("1.2.3", "ACC-7")]  # once per study, with what its order is found by
    assembler.expect_count("1.2.3", 3)
    now[0] = 200.0  # past the quiet period: an order that expects more holds the study
    assert assembler.pop_complete() == []
    wakes.clear()
    assembler.add(_record("1.2.3", "1.2.3.2", "1.2.3.2.1"))
    assert wakes == [200.0]  # the count is reached: the sleeper is woken
    now[0] = 200.3
    (study,) = assembler.pop_complete()
    assert study.instance_count == 3


def test_a_listed_notice_wins_over_an_order_count() -> None:
    now = [100.0]
    assembler = StudyAssembler(30.0, longest_wait_s=600.0, clock=lambda: now[0])
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    assembler.expect("1.2.3", frozenset({"1.2.3.1.1", "1.2.3.1.2"}), "MPPS completed")
    assembler.expect_count("1.2.3", 1)  # the order's count is met, the MPPS's list is not
    now[0] = 101.0
    assert assembler.pop_complete() == []
    assembler.add(_record("1.2.3", "1.2.3.1", "1.2.3.1.2"))
    now[0] = 101.3
    assert len(assembler.pop_complete()) == 1


def _study(series: list[Series], description: str = "", priority: str = "") -> Study:
    return Study(
        study_instance_uid="1.2.3",
        calling_ae="PACS1",
        study_description=description,
        series=tuple(series),
        first_received_at=0.0,
        last_received_at=0.0,
        requested_priority=priority,
    )


def _series(
    uid: str, modality: str, body_part: str = "", description: str = "", pixels: bool = True
) -> Series:
    return Series(
        series_instance_uid=uid,
        modality=modality,
        body_part=body_part,
        series_description=description,
        instances=(_record("1.2.3", uid, uid + ".1", modality=modality, has_pixel_data=pixels),),
    )


def test_router_uses_header_rules_and_explains_skips() -> None:
    router = Router(load_settings().pipelines)
    decision = router.route(
        _study(
            [
                _series("1.1", "CT", body_part="HEAD"),
                _series("1.2", "CT", description="Routine BRAIN axial"),
                _series("1.3", "CT", body_part="CHEST"),
                _series("1.4", "MR", body_part="HEAD"),
                _series("1.5", "SR", pixels=False),
                _series("1.6", "CR", body_part="CHEST"),
                _series("1.7", "CT", body_part="ABDOMEN"),
            ]
        )
    )
    assert [(j.series.series_instance_uid, j.pipeline.name) for j in decision.jobs] == [
        ("1.1", "ct_head_hyperdensity"),
        ("1.2", "ct_head_hyperdensity"),
        ("1.6", "cxr_opacity"),
    ]
    reasons = {s.series_instance_uid: s.reason for s in decision.skipped}
    assert "ct_chest_nodule needs at least 8 slices, got 1" in reasons["1.3"]
    # The abdomen CT is an anatomy-check candidate of the chest pipeline (content-aware routing), too short here.
    assert "ct_chest_nodule needs at least 8 slices, got 1" in reasons["1.7"]
    assert "no pipeline for modality MR" in reasons["1.4"]
    assert "no image instances" in reasons["1.5"]


def test_header_rules_route_first_and_the_anatomy_check_adds_what_they_miss() -> None:
    def long_series(uid: str, body_part: str) -> Series:
        records = tuple(_record("1.2.3", uid, f"{uid}.{k}", modality="CT") for k in range(1, 10))
        return Series(
            series_instance_uid=uid,
            modality="CT",
            body_part=body_part,
            series_description="",
            instances=records,
        )

    router = Router(load_settings().pipelines)
    decision = router.route(_study([long_series("1.1", "CHEST"), long_series("1.2", "PARTIALBODY")]))
    jobs = {(j.series.series_instance_uid, j.pipeline.name): j for j in decision.jobs}
    chest = jobs[("1.1", "ct_chest_nodule")]
    assert chest.rule == "modality CT, body part CHEST" and not chest.anatomy_check
    candidate = jobs[("1.2", "ct_chest_nodule")]
    assert candidate.rule == "anatomy check: lung" and candidate.anatomy_check
    assert ("1.2", "ct_head_hyperdensity") not in jobs, "the head pipeline has no anatomy check"


def test_study_description_also_routes_and_priority_comes_from_the_order() -> None:
    router = Router(load_settings().pipelines)
    decision = router.route(_study([_series("1.1", "CT")], description="CT Head w/o", priority="STAT"))
    [job] = decision.jobs
    assert job.priority is Priority.STAT
    assert Priority.parse("high") is Priority.URGENT
    with pytest.raises(ValueError):
        Priority.parse("whenever")


def test_the_order_routes_by_procedure_code_or_reason_for_exam(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[[pipelines]]\nname = "head"\nmodel = "m"\nmodalities = ["CT"]\n'
        'algorithm_version = "1"\nprocedure_codes = ["cthead"]\nreason_patterns = ["(?i)\\\\bbleed"]\ninput_size = [64, 64]\n'
        '[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    router = Router(load_settings(config).pipelines)
    plain = _study([_series("1.1", "CT", body_part="ABDOMEN")])
    assert router.route(plain).jobs == ()  # nothing in the headers says head
    by_code = dataclasses.replace(plain, order_procedure_code="CTHEAD")
    assert [j.rule for j in router.route(by_code).jobs] == ["modality CT, ordered procedure CTHEAD"]
    by_reason = dataclasses.replace(plain, order_reason="Fall, query bleed")
    assert [j.rule for j in router.route(by_reason).jobs] == ["modality CT, reason for exam"]
    other = dataclasses.replace(plain, order_reason="follow-up, tablebleed", order_procedure_code="CTABD")
    assert router.route(other).jobs == ()  # another procedure; the pattern matches words, not parts of them


def test_job_queue_serves_stat_first_then_fifo() -> None:
    pipeline = load_settings().pipelines[0]
    series = _series("1.1", "CT")

    def job(priority: Priority, tag: str) -> InferenceJob:
        return InferenceJob(
            study=_study([series], description=tag), series=series, pipeline=pipeline, priority=priority
        )

    async def run() -> list[str]:
        queue = JobQueue()
        for p, tag in [
            (Priority.ROUTINE, "r1"),
            (Priority.STAT, "s1"),
            (Priority.URGENT, "u1"),
            (Priority.ROUTINE, "r2"),
            (Priority.STAT, "s2"),
        ]:
            queue.put(job(p, tag))
        return [(await queue.get()).study.study_description for _ in range(5)]

    assert asyncio.run(run()) == ["s1", "s2", "u1", "r1", "r2"]


def test_domain_objects_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        _record("1.2.3", "1.2.3.1", "not-a-uid")
    with pytest.raises(ValueError, match="series"):
        _study([])
