"""``gateway check PATH``: per series the pipeline and the rule that chose it, the header repairs, instances
that would not decode, analyses that would fail; exit 0 only when every routed series would be analysed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from gateway.cli import main
from gateway.demo.phantoms import PATIENT_ID, PATIENT_NAME, write_head_ct

CONFIG = """
data_dir = "{data}"
[[pipelines]]
name = "ct_hyperdensity"
model = "ct_head_hyperdensity"
algorithm_version = "0.1.0"
modalities = ["CT"]
input_size = [256, 256]
[pipelines.labels]
0 = "hemorrhage"
"""


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """``gateway check`` configures logging for a console; give the test session its own back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))
    return path


def test_clean_folder_passes(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = write_head_ct(tmp_path / "good", slices=3, rows=64, cols=64)
    assert main(["check", str(tmp_path / "good"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"[analyse] series {series.series_uid} (CT" in out
    assert "pipeline: ct_hyperdensity (modality CT)" in out
    assert "1 series: 1 would be analysed, 0 would fail, 0 skipped" in out


def test_problems_are_listed_and_fail_the_check(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "scanner"
    deid = write_head_ct(folder / "deid", slices=3, rows=64, cols=64, seed=1)
    for path in deid.paths:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "A" * 40
        ds.StudyDate = "not-a-date"
        ds.save_as(path)
    mixed = write_head_ct(folder / "mixed", slices=2, rows=64, cols=64, seed=2)
    odd = write_head_ct(folder / "odd", slices=1, rows=32, cols=32, seed=3)
    ds = pydicom.dcmread(odd.paths[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = mixed.study_uid, mixed.series_uid
    ds.save_as(odd.paths[0])
    broken = pydicom.dcmread(deid.paths[0])
    broken.SOPInstanceUID = "not a uid"
    broken.save_as(folder / "broken.dcm", enforce_file_format=False)
    (folder / "notes.txt").write_text("not DICOM")
    assert main(["check", str(folder), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "header: AccessionNumber: dropped" in out and "header: StudyDate: dropped" in out
    assert f"[FAIL] series {mixed.series_uid}" in out and "mixes image sizes" in out
    assert "[REFUSED] broken.dcm: SOPInstanceUID is missing or not a valid UID" in out
    assert "1 non-DICOM file(s) ignored" in out
    assert PATIENT_NAME not in out and PATIENT_ID not in out, "no patient data on the console"
