"""Plausibility: findings outside their pipeline's anatomy (the air around the head, the CT table, the chest
wall for a lung nodule) or outside its size range are dropped with a reason; findings where they belong stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import PipelineSettings, load_settings
from gateway.core.domain import CodedConcept, Finding
from gateway.demo.phantoms import write_chest_ct, write_head_ct
from gateway.orchestration.plausibility import check_findings
from preprocessing.series import LoadedSeries, load_series

LABEL = CodedConcept(value="27925004", scheme="SCT", meaning="Nodule")


def _pipeline(name: str) -> PipelineSettings:
    return next(p for p in load_settings().pipelines if p.name == name)


def _finding(
    loaded: LoadedSeries, index: int, centre: tuple[float, float], size_px: float, long_axis_mm: float
) -> Finding:
    image = loaded.images[index]
    x, y = centre
    half = size_px / 2.0
    return Finding(
        label=LABEL,
        confidence=0.9,
        sop_instance_uid=image.sop_instance_uid,
        sop_class_uid=image.sop_class_uid,
        bbox=(x - half, y - half, x + half, y + half),
        slice_index=index,
        long_axis_mm=long_axis_mm,
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    return load_series(write_head_ct(tmp_path_factory.mktemp("head"), slices=4, rows=256, cols=256).paths)


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    return load_series(
        write_chest_ct(tmp_path_factory.mktemp("chest"), slices=4, rows=256, cols=256, pixel_mm=1.4).paths
    )


def test_head_findings_inside_the_skull_stay_and_outside_or_oversized_go(head: LoadedSeries) -> None:
    pipeline = _pipeline("ct_head_hyperdensity")
    inside = _finding(head, 2, (150.0, 120.0), 10, 10.0)
    outside = _finding(head, 2, (10.0, 10.0), 8, 8.0)  # the air around the head
    huge = _finding(head, 2, (128.0, 128.0), 12, 400.0)
    result = check_findings([inside, outside, huge], head.images, pipeline, modality="CT")
    assert result.findings == (inside,)
    assert [kind for kind, _ in result.dropped] == ["anatomy", "size"]
    assert "outside the intracranial" in result.dropped[0][1] and "400.0 mm outside" in result.dropped[1][1]


def test_lung_nodules_must_lie_in_the_lung(chest: LoadedSeries) -> None:
    pipeline = _pipeline("ct_chest_nodule")
    # 256 px at 1.4 mm: the left lung's centre is 70 mm left of the middle, the mediastinum in the middle
    in_lung = _finding(chest, 1, (128.0 - 70 / 1.4, 128.0 - 5 / 1.4), 6, 8.0)
    mediastinum = _finding(chest, 1, (128.0, 128.0 + 10 / 1.4), 6, 8.0)
    below_body = _finding(chest, 1, (128.0, 250.0), 6, 8.0)  # where the table is
    result = check_findings([in_lung, mediastinum, below_body], chest.images, pipeline, modality="CT")
    assert result.findings == (in_lung,)
    assert [kind for kind, _ in result.dropped] == ["anatomy", "anatomy"]


def test_size_only_for_radiographs_and_no_check_without_a_declaration(chest: LoadedSeries) -> None:
    cxr = _pipeline("cxr_opacity")
    corner = _finding(chest, 1, (5.0, 5.0), 6, 8.0)
    assert check_findings([corner], chest.images, cxr, modality="CR").findings == (corner,)
    free = _pipeline("ct_chest_nodule").replace(finding_anatomy="", finding_size_mm=None)
    assert check_findings([corner], chest.images, free, modality="CT").findings == (corner,)


def test_settings_refuse_an_unknown_anatomy(tmp_path: Path) -> None:
    from gateway.core.errors import ConfigError

    config = tmp_path / "g.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[[pipelines]]\nname = "x"\nmodel = "m"\nalgorithm_version = "1"\n'
        'modalities = ["CT"]\ninput_size = [64, 64]\nfinding_anatomy = "liver"\n[pipelines.labels]\n0 = "nodule"\n'
    )
    with pytest.raises(ConfigError, match="finding_anatomy must be"):
        load_settings(config)
