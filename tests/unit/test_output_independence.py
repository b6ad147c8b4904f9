"""One output never sinks the others: each result object is built on its own, and a duplicated slice position
is resolved by the documented rule (the instance received last at a position is analysed) instead of a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.demo.phantoms import write_head_ct
from gateway.results import encode
from gateway.results.content import reported_findings
from gateway.results.encode import encode_results
from preprocessing.series import LoadedSeries, load_series
from tests.support.analysis import make_analysis, make_finding


def _with_duplicate(tmp_path: Path) -> tuple[list[Path], str]:
    series = write_head_ct(tmp_path / "ct", slices=6, rows=128, cols=128)
    ds = pydicom.dcmread(series.paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    duplicate = tmp_path / "duplicate.dcm"
    ds.save_as(duplicate)
    return [*series.paths, duplicate], str(ds.SOPInstanceUID)


def _mask(loaded: LoadedSeries, index: int) -> np.ndarray:
    mask = np.zeros((len(loaded.images), 64, 64), dtype=bool)
    mask[index, 10:20, 10:20] = True
    return mask


def test_duplicate_slice_position_keeps_the_last_received_and_reports_the_other(tmp_path: Path) -> None:
    paths, duplicate_uid = _with_duplicate(tmp_path)
    loaded = load_series(paths)
    assert len(loaded.images) == 6
    uids = [image.sop_instance_uid for image in loaded.images]
    assert duplicate_uid in uids, "the instance received last at the position is analysed"
    [(name, reason)] = loaded.skipped
    assert name == paths[2].name and "duplicate slice position" in reason
    positions = [float(h.ImagePositionPatient[2]) for h in loaded.headers]
    assert len(set(positions)) == len(positions) and positions == sorted(positions)


def test_a_series_with_a_duplicate_position_gets_sr_gsps_and_seg(tmp_path: Path) -> None:
    paths, _ = _with_duplicate(tmp_path)
    loaded = load_series(paths)
    index = next(
        i for i, h in enumerate(loaded.headers) if h.SOPInstanceUID == loaded.images[2].sop_instance_uid
    )
    analysis = make_analysis(loaded, (make_finding(loaded, index, 0.95),), stat=True)
    result = encode_results(analysis, reported_findings(analysis), _mask(loaded, index), [])
    assert result.failures == {}
    assert [ds.Modality for ds in result.datasets] == ["SR", "PR", "SEG"]


@pytest.mark.parametrize("broken", ["build_sr", "build_gsps", "build_seg"])
def test_one_failing_output_leaves_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    loaded = load_series(write_head_ct(tmp_path / "ct", slices=4, rows=128, cols=128).paths)
    analysis = make_analysis(loaded, (make_finding(loaded, 1, 0.95),), stat=True)

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("Plane positions must not contain duplicates.")

    monkeypatch.setattr(encode, broken, fail)
    result = encode_results(analysis, reported_findings(analysis), _mask(loaded, 1), [])
    expected = {"build_sr": "SR", "build_gsps": "GSPS", "build_seg": "SEG"}[broken]
    assert result.failures == {expected: "ValueError: Plane positions must not contain duplicates."}
    made = {"SR": "SR", "PR": "GSPS", "SEG": "SEG"}
    assert sorted(made[ds.Modality] for ds in result.datasets) == sorted({"SR", "GSPS", "SEG"} - {expected})


@pytest.mark.parametrize("broken", ["build_bundle", "build_oru"])
def test_a_report_that_cannot_be_built_leaves_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    from gateway.config.settings import load_settings
    from gateway.ops.audit import AuditLog
    from gateway.reporting import dispatcher as reporting
    from gateway.results.content import SeriesReport

    loaded = load_series(write_head_ct(tmp_path / "ct", slices=3, rows=64, cols=64).paths)
    analysis = make_analysis(loaded, (make_finding(loaded, 1, 0.95),), stat=True)
    report = SeriesReport(
        analysis=analysis, findings=tuple(reported_findings(analysis)), sr_sop_instance_uid="1.2.3"
    )

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot build")

    monkeypatch.setattr(reporting, broken, fail)
    config = tmp_path / "gateway.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    audit = AuditLog(tmp_path / "audit.jsonl")
    dispatcher = reporting.ReportDispatcher(load_settings(config), audit)
    folder = tmp_path / "out"
    folder.mkdir()
    assert dispatcher.write_documents(folder, [report], stat=True)
    written = list(folder.iterdir())
    kinds = sorted(
        p.name.split("_")[0] + ("_" + p.name.split("_")[1] if p.name.startswith("HL7") else "")
        for p in written
    )
    expected = {"build_bundle": ["HL7_OMI", "HL7_ORU"], "build_oru": ["FHIR", "HL7_OMI"]}[broken]
    assert kinds == expected
    [failure] = [e for e in audit.read() if e["event"] == "report_failed"]
    assert failure["message"] == {"build_bundle": "FHIR", "build_oru": "ORU"}[broken]
