"""SR (TID 1500) and GSPS built from an analysis: content checked by parsing back, and by dciodvfy."""

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from clients.triton import DetectionOutput
from gateway.config.settings import load_settings
from gateway.core.domain import CodedConcept, Finding
from gateway.core.errors import InvalidInstanceError
from gateway.delivery.store import encode
from gateway.demo.phantoms import write_head_ct
from gateway.orchestration.interpret import interpret
from gateway.results.common import SeriesAnalysis
from gateway.results.content import read_measurement_report, reported_findings
from gateway.results.contours import outlines
from gateway.results.gsps import HEATMAP_LAYER, LAYER_NAME, SCORE_LAYER, build_gsps
from gateway.results.sr import build_sr
from preprocessing.series import load_series
from tests.support.analysis import make_analysis, make_finding
from tests.support.servers import dciodvfy_errors


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    return load_series(write_head_ct(tmp_path_factory.mktemp("ct"), slices=4, rows=128, cols=128).paths)


def _analysis(loaded, findings: tuple[Finding, ...], stat: bool) -> SeriesAnalysis:
    return make_analysis(loaded, findings, stat=stat)


def _finding(loaded, index: int, confidence: float = 0.93) -> Finding:
    return make_finding(loaded, index, confidence)


def _content_items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_positive_sr_holds_finding_location_measurements_algorithm_and_stat(loaded, tmp_path: Path) -> None:
    finding = dataclasses.replace(_finding(loaded, 2), long_axis_mm=10.0, area_mm2=100.0, mean_hu=71.5)
    analysis = _analysis(loaded, (finding,), stat=True)
    sr = build_sr(analysis)
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == loaded.headers[0].StudyInstanceUID
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    items = list(_content_items(ds))
    by_meaning = {
        (i.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in i else ""): i for i in items
    }
    assert by_meaning["Algorithm Name"].TextValue == "Head CT Hyperdensity Reference"
    assert by_meaning["Algorithm Version"].TextValue == "0.1.0"
    assert by_meaning["Language of Content Item and Descendants"].ConceptCodeSequence[0].CodeValue == "en-US"
    finding_types = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"
    ]
    assert "50960005" in finding_types
    sites = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "363698007"
    ]
    assert sites == ["69536005"]  # Head, from BodyPartExamined through the terminology table
    # The region is a closed outline on the image the finding is on (image-referenced SCOORD: what viewers
    # draw - OHIF draws no SCOORD3D), even though the series has a frame of reference ...
    assert not [i for i in items if i.ValueType == "SCOORD3D"]
    [scoord] = [i for i in items if i.ValueType == "SCOORD"]
    assert scoord.GraphicType == "POLYLINE"
    np.testing.assert_allclose(scoord.GraphicData, [40, 50, 60, 50, 60, 70, 40, 70, 40, 50])
    [selected_from] = scoord.ContentSequence
    assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == finding.sop_instance_uid
    # ... and every measurement group has one: the study-level assessment is the report's Qualitative
    # Evaluations, not a group without a region (on which OHIF's SR viewport fails).
    [root_evaluations] = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    assessment = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.get("TextValue") or i.ConceptCodeSequence[0].CodeMeaning
        for i in root_evaluations.ContentSequence
    }
    assert assessment["AI triage score"] == f"{analysis.study_score:.4f}"
    assert assessment["Critical finding - STAT read requested"] == "Yes"
    [measurements] = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    ]
    for group in measurements.ContentSequence:
        assert any(i.ValueType == "SCOORD" for i in group.ContentSequence)
    nums = {
        i.ConceptNameCodeSequence[0].CodeMeaning: (
            float(i.MeasuredValueSequence[0].NumericValue),
            i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for i in items
        if i.ValueType == "NUM"
    }
    assert nums["AI confidence"] == (pytest.approx(0.93), "1")
    assert (
        nums["Long axis"] == (10.0, "mm")
        and nums["Area"] == (100.0, "mm2")
        and nums["Mean"] == (71.5, "[hnsf'U]")
    )
    stat_values = [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "STAT"
    ]
    assert stat_values and set(stat_values) == {"Yes"}
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evidence == {str(h.SOPInstanceUID) for h in loaded.headers}
    assert dciodvfy_errors(path) == []


def test_series_without_frame_of_reference_gets_scoord_on_the_image(loaded, tmp_path: Path) -> None:
    headers = []
    for h in loaded.headers:
        copy = pydicom.Dataset(h)
        del copy.FrameOfReferenceUID
        headers.append(copy)
    analysis = dataclasses.replace(
        _analysis(loaded, (_finding(loaded, 1),), stat=False), sources=tuple(headers)
    )
    [reported] = reported_findings(analysis)
    assert reported.region is not None and not reported.region.is_3d
    assert reported.region.sop_instance_uid == loaded.images[1].sop_instance_uid
    ds = pydicom.dcmread(_write(build_sr(analysis), tmp_path / "sr.dcm"))
    [scoord] = [i for i in _content_items(ds) if i.ValueType == "SCOORD"]
    np.testing.assert_allclose(scoord.GraphicData, [40, 50, 60, 50, 60, 70, 40, 70, 40, 50])


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(encode(ds))
    return path


def test_written_report_reads_back_into_the_same_findings(loaded, tmp_path: Path) -> None:
    findings = (
        dataclasses.replace(_finding(loaded, 1, 0.81), long_axis_mm=12.5, area_mm2=90.0, mean_hu=68.0),
        _finding(loaded, 3, 0.66),
    )
    analysis = _analysis(loaded, findings, stat=True)
    written = reported_findings(analysis)
    path = _write(build_sr(analysis, findings=written), tmp_path / "sr.dcm")
    read = read_measurement_report(pydicom.dcmread(path))
    assert read == written


def test_third_party_tid1500_report_parses_into_findings(real_data: Path) -> None:
    findings = read_measurement_report(pydicom.dcmread(real_data / "sr-example" / "sr.dcm"))
    assert findings
    seg = pydicom.dcmread(real_data / "sr-example" / "seg.dcm", stop_before_pixels=True)
    for finding in findings:
        assert finding.tracking_uid and finding.finding_type.meaning
        assert finding.segment is not None and finding.segment[0] == seg.SOPInstanceUID
        assert finding.measurements and all(np.isfinite(m.value) for m in finding.measurements)
    assert any(f.finding_site is not None for f in findings)
    assert any(m.unit.scheme == "UCUM" for f in findings for m in f.measurements)


def test_non_sr_input_is_refused(real_data: Path) -> None:
    with pytest.raises(InvalidInstanceError):
        read_measurement_report(pydicom.dcmread(real_data / "ct-3slice" / "01.dcm", stop_before_pixels=True))


def test_negative_sr_says_the_algorithm_ran_and_found_nothing(loaded, tmp_path: Path) -> None:
    analysis = _analysis(loaded, (), stat=False)
    sr = build_sr(analysis)
    assert build_gsps(analysis) is None
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    items = list(_content_items(pydicom.dcmread(path)))
    summary = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111017"
    ]
    assert summary == ["111241"]  # All algorithms succeeded; without findings
    assert not [i for i in items if i.ValueType == "SCOORD"]
    assert dciodvfy_errors(path) == []


def test_gsps_draws_each_finding_on_its_image_in_a_named_layer(loaded, tmp_path: Path) -> None:
    findings = (_finding(loaded, 1, 0.8), _finding(loaded, 3, 0.6))
    gsps = build_gsps(_analysis(loaded, findings, stat=True))
    assert gsps is not None
    path = tmp_path / "pr.dcm"
    path.write_bytes(encode(gsps))
    ds = pydicom.dcmread(path)
    assert ds.Modality == "PR" and ds.StudyInstanceUID == loaded.headers[0].StudyInstanceUID
    assert [layer.GraphicLayer for layer in ds.GraphicLayerSequence] == [
        LAYER_NAME,
        HEATMAP_LAYER,
        SCORE_LAYER,
    ]
    referenced = {
        r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedImageSequence
    }
    assert referenced == {f.sop_instance_uid for f in findings}
    on_layer = defaultdict(list)
    for annotation in ds.GraphicAnnotationSequence:
        on_layer[annotation.GraphicLayer].append(annotation)
    assert len(on_layer[LAYER_NAME]) == 2 and HEATMAP_LAYER not in on_layer  # no mask: no outline
    texts = [t.UnformattedTextValue for a in on_layer[LAYER_NAME] for t in a.TextObjectSequence]
    assert sorted(texts) == ["Hemorrhage 60%", "Hemorrhage 80%"]
    scores = {t.UnformattedTextValue for a in on_layer[SCORE_LAYER] for t in a.TextObjectSequence}
    assert len(on_layer[SCORE_LAYER]) == 2 and len(scores) == 1 and "score" in scores.pop()
    assert ds.SoftcopyVOILUTSequence[0].WindowCenter == 40
    assert ds.BodyPartExamined == "HEAD"
    assert dciodvfy_errors(path) == []


def test_gsps_outlines_the_heat_map_on_its_own_layer(loaded, tmp_path: Path) -> None:
    finding = _finding(loaded, 1, 0.8)
    analysis = _analysis(loaded, (finding,), stat=False)
    rows, cols = int(loaded.headers[0].Rows), int(loaded.headers[0].Columns)
    mask = np.zeros(
        (len(analysis.sources), rows // 2, cols // 2), dtype=np.uint8
    )  # the model grid: half size
    mask[1, 10:20, 30:44] = 1  # on the finding's slice
    mask[2, 5:9, 5:9] = 1  # and on the next, where there is no finding: not drawn
    gsps = build_gsps(analysis, mask)
    path = tmp_path / "pr.dcm"
    path.write_bytes(encode(gsps))
    ds = pydicom.dcmread(path)
    outlines_by_image = {
        a.ReferencedImageSequence[0].ReferencedSOPInstanceUID: a.GraphicObjectSequence
        for a in ds.GraphicAnnotationSequence
        if a.GraphicLayer == HEATMAP_LAYER
    }
    assert set(outlines_by_image) == {loaded.images[1].sop_instance_uid}  # only where the findings are
    [outline] = outlines_by_image[loaded.images[1].sop_instance_uid]
    assert outline.GraphicType == "POLYLINE" and outline.GraphicAnnotationUnits == "PIXEL"
    points = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
    assert (points[0] == points[-1]).all()  # closed
    # Scaled from the model grid to the image: columns 30..44 and rows 10..20 of the half-size grid.
    assert (
        points[:, 0].min() == 60
        and points[:, 0].max() == 88
        and points[:, 1].min() == 20
        and points[:, 1].max() == 40
    )
    assert 0x60003000 in ds  # one image, its boxes: the overlay for overlay-only viewers stays
    assert dciodvfy_errors(path) == []


def test_outlines_follow_the_pixel_edges() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:8, 1:8] = True
    mask[3:5, 3:5] = False  # a hole: its own loop
    mask[9, 9] = True  # one pixel: below min_pixels
    loops = outlines(mask)
    assert [loop.tolist() for loop in loops] == [
        [[1, 1], [8, 1], [8, 8], [1, 8], [1, 1]],
        [[3, 5], [5, 5], [5, 3], [3, 3], [3, 5]],
    ]
    assert outlines(np.zeros((4, 4))) == []


def test_interpret_maps_boxes_to_source_pixels_and_drops_bad_detections(loaded) -> None:
    pipeline = load_settings().pipelines[0]
    rows = np.array(
        [
            [1, 0, 0.9, 0.25, 0.5, 0.5, 0.75],  # good
            [2, 0, float("nan"), 0.1, 0.1, 0.2, 0.2],  # NaN confidence
            [2, 0, 0.8, 0.9, 0.9, 1.4, 1.2],  # outside the image
            [2, 7, 0.8, 0.1, 0.1, 0.2, 0.2],  # unknown class
            [9, 0, 0.8, 0.1, 0.1, 0.2, 0.2],  # slice outside the series
            [3, 0, 0.3, 0.1, 0.1, 0.2, 0.2],  # below report threshold: not a finding, not an error
        ],
        dtype=np.float32,
    )
    output = DetectionOutput(
        detections=rows,
        slice_scores=np.zeros(4, np.float32),
        study_score=0.9,
        model_name="m",
        model_version="1",
        requests=1,
        seconds=0.0,
    )
    result = interpret(output, loaded.images, pipeline)
    [finding] = result.findings
    assert finding.sop_instance_uid == loaded.images[1].sop_instance_uid
    assert finding.bbox == pytest.approx((32.0, 64.0, 64.0, 96.0))  # 128x128 source
    assert result.stat is True
    assert len(result.dropped) == 4
    assert any("non-finite" in d for d in result.dropped) and any(
        "unknown class 7" in d for d in result.dropped
    )


def test_gsps_overlay_only_when_it_is_right_for_every_referenced_image(loaded) -> None:
    single = build_gsps(_analysis(loaded, (_finding(loaded, 2),), stat=False))
    assert single is not None and single[0x60001001].value == LAYER_NAME
    bits = np.unpackbits(np.frombuffer(single[0x60003000].value, np.uint8), bitorder="little")[: 128 * 128]
    ys, xs = np.nonzero(bits.reshape(128, 128))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 60, 50, 70)
    moved = dataclasses.replace(_finding(loaded, 3), bbox=(10.0, 10.0, 20.0, 20.0))
    double = build_gsps(_analysis(loaded, (_finding(loaded, 2), moved), stat=False))
    assert double is not None and 0x60003000 not in double  # boxes differ per image: vector graphics only
    assert len([a for a in double.GraphicAnnotationSequence if a.GraphicLayer == LAYER_NAME]) == 2


def test_class_scores_become_image_level_findings_on_the_best_image(loaded) -> None:
    from gateway.config.settings import load_settings
    from gateway.orchestration.interpret import interpret_scores

    pipeline = (
        load_settings()
        .pipelines[0]
        .replace(
            labels={1: CodedConcept(value="112001", scheme="DCM", meaning="Opacity")},
            report_threshold=0.5,
            stat_threshold=0.9,
        )
    )
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.95], [np.nan, 0.4]], dtype=np.float32)
    result = interpret_scores(scores, loaded.images, pipeline)
    [finding] = result.findings
    assert finding.bbox is None and finding.confidence == pytest.approx(0.95)
    assert finding.sop_instance_uid == loaded.images[2].sop_instance_uid
    assert result.stat is True and result.study_score == pytest.approx(0.95)
    quiet = interpret_scores(np.full((4, 2), 0.1, np.float32), loaded.images, pipeline)
    assert quiet.findings == () and quiet.stat is False


def test_encoder_processes_give_the_same_results_and_survive_a_killed_worker(loaded) -> None:
    """Results built in a worker process equal those built in-process (bar fresh UIDs and times); when the pool
    breaks, the series is still encoded and a new pool serves the next one."""
    import asyncio
    import os
    import signal

    from gateway.results.encode import ResultEncoder, encode_results

    analysis = _analysis(loaded, (_finding(loaded, 1), _finding(loaded, 2)), stat=True)
    reported = reported_findings(analysis)
    local = encode_results(analysis, reported, None, []).datasets
    encoder = ResultEncoder(1)
    try:
        remote = asyncio.run(encoder.encode(analysis, reported, None, [])).datasets
        assert [ds.SOPClassUID for ds in remote] == [ds.SOPClassUID for ds in local]
        assert [str(ds.SOPInstanceUID) for ds in remote] == [str(ds.SOPInstanceUID) for ds in local]
        again = read_measurement_report(remote[0])
        assert len(again) == 2
        pool = encoder._executor(False)
        for pid in list(pool._processes):  # kill the worker: the next call finds the pool broken
            os.kill(pid, signal.SIGKILL)
        after_kill = asyncio.run(encoder.encode(analysis, reported, None, [])).datasets
        assert [str(ds.SOPInstanceUID) for ds in after_kill] == [str(ds.SOPInstanceUID) for ds in local]
        assert encoder._executor(False) is not pool  # replaced
        assert len(asyncio.run(encoder.encode(analysis, reported, None, [])).datasets) == len(local)
    finally:
        encoder.close()


def test_stat_results_are_encoded_in_a_process_of_their_own_at_the_gateway_s_cpu_priority(loaded) -> None:
    """Routine encoders run niced (they yield the CPU under load); a STAT series goes to its own process at the
    gateway's priority, never queued behind routine encodes."""
    import asyncio
    import os

    from gateway.results.content import reported_findings
    from gateway.results.encode import ResultEncoder

    analysis = _analysis(loaded, (_finding(loaded, 1),), stat=True)
    reported = reported_findings(analysis)
    encoder = ResultEncoder(2, routine_nice=7)
    try:
        asyncio.run(encoder.encode(analysis, reported, None, []))
        asyncio.run(encoder.encode(analysis, reported, None, [], urgent=True))
        pids = encoder.pids()
        assert len(pids["stat"]) == 1 and 1 <= len(pids["routine"]) <= 2
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids["stat"]] == [own]
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in pids["routine"]} == {min(19, own + 7)}
    finally:
        encoder.close()


def test_tracking_uids_are_the_same_for_the_same_analysis(loaded) -> None:
    """A re-delivered SR keeps the Tracking UIDs a radiologist's verdict names (they were random per encoding)."""
    from gateway.results.content import reported_findings

    findings = (_finding(loaded, 1, 0.8), _finding(loaded, 3, 0.6))
    first = [f.tracking_uid for f in reported_findings(_analysis(loaded, findings, stat=False))]
    again = [f.tracking_uid for f in reported_findings(_analysis(loaded, findings, stat=False))]
    assert first == again and len(set(first)) == 2


def test_gsps_of_a_monochrome1_radiograph_inverts_so_that_bone_stays_white(loaded, tmp_path: Path) -> None:
    """A presentation state's output is P-values (high = white); a MONOCHROME1 image (low = white) needs the
    INVERSE Presentation LUT Shape, or every viewer that applies the GSPS shows the radiograph inverted
    (DICOMscope did, with IDENTITY)."""
    from gateway.demo.phantoms import write_cxr

    assert (
        build_gsps(_analysis(loaded, (_finding(loaded, 1),), stat=False)).PresentationLUTShape == "IDENTITY"
    )
    for monochrome1 in (True, False):
        cxr = load_series(
            write_cxr(tmp_path / f"cxr{monochrome1}", size=256, seed=2, monochrome1=monochrome1).paths
        )
        gsps = build_gsps(make_analysis(cxr, (make_finding(cxr, 0),), stat=False))
        assert gsps.PresentationLUTShape == ("INVERSE" if monochrome1 else "IDENTITY")
        assert dciodvfy_errors(_write(gsps, tmp_path / f"pr{monochrome1}.dcm")) == []


def test_an_encoder_whose_gateway_died_while_it_started_exits() -> None:
    """A worker process starting while the gateway is killed finds itself a child of PID 1; it watched
    ``os.getppid()`` then - PID 1, alive forever - and outlived the gateway (orphans seen after CI runs). It now
    watches the PID the gateway gave it, and exits once that is gone."""
    import subprocess
    import sys
    import time

    gone = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout
    )
    script = (
        "import time\n"
        "from gateway.results.encode import _worker_init\n"
        f"_worker_init(20, 0, {gone})\n"
        "time.sleep(30)\n"
        "raise SystemExit(3)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0 and time.monotonic() - started < 15, done.stderr[-500:]
