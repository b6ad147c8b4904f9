"""Content-aware routing on real components: an upper-abdomen CT slab (header says ABDOMEN) with the lung bases in
its field of view goes to the chest nodule pipeline by an anatomy check and its findings are marked incidental;
a head CT is never sent to the chest pipeline; the decision and its evidence are in the audit and the SR."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Nodule, write_chest_ct, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.audit import AuditLog
from tests.support.analysis import content_items
from tests.support.servers import dciodvfy_errors, storescu, wait_for

pytestmark = pytest.mark.integration


def test_abdominal_ct_with_lung_bases_gets_the_chest_pipeline_and_a_head_ct_does_not(
    tmp_path: Path, triton: str
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 2\n[http]\nport = 0\n'
        f'[receiver]\nport = {port}\n[triton]\nurl = "{triton}"\n'
    )
    settings = load_settings(config)  # the embedded pipelines; ct_chest_nodule has anatomy = "lung"
    abdomen = write_chest_ct(
        tmp_path / "abdomen",
        slices=16,
        rows=256,
        cols=256,
        pixel_mm=1.4,
        nodules=(Nodule(x_mm=-70.0, y_mm=-20.0, z_mm=20.0, diameter_mm=14.0, hu=30.0),),
        seed=4,
    )
    for (
        path
    ) in abdomen.paths:  # what an abdominal protocol writes: no header rule of the chest pipeline matches
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined, ds.StudyDescription, ds.SeriesDescription = (
            "ABDOMEN",
            "CT ABDOMEN",
            "PORTAL VENOUS",
        )
        ds.save_as(path)
    head = write_head_ct(tmp_path / "head", slices=10, rows=256, cols=256, seed=6)
    audit = AuditLog(settings.audit_log)
    gateway = Gateway(settings).start()
    try:
        for series in (abdomen, head):
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0

        def done(uid: str) -> bool:
            return any(e["event"] == "study_done" and e["study"] == uid for e in audit.read())

        wait_for(lambda: done(abdomen.study_uid) and done(head.study_uid), timeout_s=180, what="both studies")
    finally:
        gateway.stop()
    events = audit.read()
    [chest] = [e for e in events if e["event"] == "series_analysed" and e["study"] == abdomen.study_uid]
    assert chest["pipeline"] == "ct_chest_nodule" and chest["rule"] == "anatomy check: lung"
    assert "lung on 9 of 9 sampled slices" in chest["routing_note"] and chest["findings"] >= 1
    [sr] = [pydicom.dcmread(p) for p in (settings.results_dir / abdomen.study_uid).glob("SR_*.dcm")]
    items = list(content_items(sr))
    notes = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert any("Routed by anatomy check: lung on 9 of 9 sampled slices" in n for n in notes)
    incidental = [
        i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "INCIDENTAL"
    ]
    assert len(incidental) == chest["findings"], "every finding of an anatomy-routed series is incidental"
    [path] = (settings.results_dir / abdomen.study_uid).glob("SR_*.dcm")
    assert dciodvfy_errors(path) == []
    # The head CT: analysed by the head pipeline, and never by the chest pipeline - no lung in its field of view.
    head_analysed = [
        e["pipeline"] for e in events if e["event"] == "series_analysed" and e["study"] == head.study_uid
    ]
    assert head_analysed == ["ct_head_hyperdensity"]
    [skip] = [
        e
        for e in events
        if e["event"] == "series_skipped"
        and e["study"] == head.study_uid
        and e.get("pipeline") == "ct_chest_nodule"
    ]
    assert "no lung in the field of view (lung on 0 of 9 sampled slices)" in skip["reason"]
    print(
        f"\nanatomy routing: abdomen -> ct_chest_nodule ({chest['routing_note']}); head CT: {skip['reason']}"
    )
