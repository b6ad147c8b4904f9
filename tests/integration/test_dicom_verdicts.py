"""Verdicts over DICOM (issue 14, item 1): what a viewer stores back after the radiologist reviewed the AI's
results - an edited presentation state, an edited SR, a rejection KOS - is recognised on C-STORE, recorded as
verdicts tied to the AI findings before the response, kept as evidence and never analysed; a rejection of a
result the gateway never reported is refused (0xC000 with the reason) and nothing is kept."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.server import free_port
from gateway.ops.http_api import hash_token
from gateway.review.dicom_verdicts import KOS, _iou
from tests.support.servers import http_json, storescu, wait_for

pytestmark = pytest.mark.integration

DR = "radiologist-token"


def _send(port: int, ds: Dataset) -> Dataset:
    ae = AE(ae_title="VIEWER")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status


def _as_new(ds: Dataset, description: str) -> Dataset:
    edited = copy.deepcopy(ds)
    edited.SOPInstanceUID = generate_uid()
    edited.SeriesInstanceUID = generate_uid()
    edited.SeriesDescription = description
    edited.file_meta.MediaStorageSOPInstanceUID = edited.SOPInstanceUID
    return edited


def _kos(study_uid: str, sr: Dataset, title: tuple[str, str, str]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = KOS, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "KO"
    ds.PatientID, ds.PatientName = "PHANTOM-1", "Phantom^Head"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title
    ds.ConceptNameCodeSequence = [code]
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = sr.SeriesInstanceUID, [sop]
    study = Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = study_uid, [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [study]
    return ds


def test_edited_gsps_edited_sr_and_rejection_kos_become_verdicts(tmp_path: Path, triton: str) -> None:
    lesions = (
        Lesion(x=80.0, y=80.0, slice=3, radius_mm=7.0, hu=70.0),
        Lesion(x=170.0, y=160.0, slice=5, radius_mm=8.0, hu=70.0),
    )
    series = write_head_ct(
        tmp_path / "ct", slices=10, rows=256, cols=256, pixel_mm=1.0, lesions=lesions, seed=3
    )
    http, port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
        f'[http]\nport = {http}\n[[http.tokens]]\nname = "dr"\nrole = "radiologist"\nsha256 = "{hash_token(DR)}"\n'
        f'[triton]\nurl = "{triton}"\n'
        '[[pipelines]]\nname = "ct_hyperdensity"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'mode = "assist"\nreport_threshold = 0.5\nstat_threshold = 0.7\nmodalities = ["CT"]\n'
        'input_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        study = series.study_uid
        url = f"http://127.0.0.1:{http}/studies/{study}"
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        findings = wait_for(
            lambda: (lambda r: r[1] if r[0] == 200 and r[1] else None)(
                http_json(f"{url}/findings", token=DR)
            ),
            timeout_s=120,
            what="the AI findings",
        )
        assert len(findings) >= 2, findings
        results = tmp_path / "data" / "results" / study
        [gsps_path] = results.glob("PR_*.dcm")
        [sr_path] = results.glob("SR_*.dcm")
        gsps, sr = pydicom.dcmread(gsps_path), pydicom.dcmread(sr_path)

        # 1. The radiologist edits the AI's presentation state: keeps one box, moves another, deletes the rest,
        #    and draws one the AI missed.
        edited = _as_new(gsps, "AI findings reviewed")
        kept, moved = findings[0], findings[1]
        annotations = []
        for annotation in edited.GraphicAnnotationSequence:
            if annotation.GraphicLayer != "AI_FINDINGS":
                annotations.append(annotation)  # the heat map outline and the score stay as they were
                continue
            images = {str(r.ReferencedSOPInstanceUID) for r in annotation.ReferencedImageSequence}
            objects = []
            for graphic in annotation.get("GraphicObjectSequence", []):
                points = [float(v) for v in graphic.GraphicData]
                box = (min(points[0::2]), min(points[1::2]), max(points[0::2]), max(points[1::2]))
                finding = next(  # the AI finding this graphic draws (float32 points: matched by overlap)
                    (f for f in findings if f["image_uid"] in images and _iou(box, tuple(f["box"])) > 0.99),
                    None,
                )
                if finding is kept:
                    objects.append(graphic)
                elif finding is moved:
                    x0, y0, x1, y1 = box
                    dx = (x1 - x0) * 0.4  # shifted by 40 % of its width: the same finding, somewhere else
                    graphic.GraphicData = [x0 + dx, y0, x1 + dx, y0, x1 + dx, y1, x0 + dx, y1, x0 + dx, y0]
                    objects.append(graphic)
            if kept["image_uid"] in images:
                drawn = copy.deepcopy(objects[0])
                drawn.GraphicData = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0, 10.0, 10.0]
                objects.append(drawn)
            annotation.GraphicObjectSequence = objects
            annotations.append(annotation)
        edited.GraphicAnnotationSequence = annotations
        status = _send(port, edited)
        assert status.Status == 0x0000, status
        verdicts = {v["tracking_uid"]: v for v in http_json(f"{url}/verdicts", token=DR)[1]}
        assert verdicts[kept["tracking_uid"]]["kind"] == "accept"
        modify = verdicts[moved["tracking_uid"]]
        assert modify["kind"] == "modify" and modify["correction"]["box"][0] > moved["box"][0]
        for other in findings[2:]:
            assert verdicts[other["tracking_uid"]]["kind"] == "reject"
        [missed] = [v for v in verdicts.values() if v["kind"] == "missed"]
        assert missed["correction"] == {
            "finding_type": "hemorrhage",
            "image_uid": kept["image_uid"],
            "box": [10.0, 10.0, 30.0, 30.0],
        }
        assert all(
            v["via"] == "dicom" and v["evidence_uid"] == edited.SOPInstanceUID for v in verdicts.values()
        )
        assert all(
            v["reviewer"].startswith("dicom:") and "Phantom" not in v["reviewer"] for v in verdicts.values()
        )
        assert (tmp_path / "data" / "verdicts" / study / f"{edited.SOPInstanceUID}.dcm").exists()

        # 2. An edited SR that names the AI's SR as its predecessor and leaves the last finding out.
        amended = _as_new(sr, "AI report reviewed")
        reference = Dataset()
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = (
            sr.SOPClassUID,
            sr.SOPInstanceUID,
        )
        series_ref = Dataset()
        series_ref.SeriesInstanceUID, series_ref.ReferencedSOPSequence = sr.SeriesInstanceUID, [reference]
        study_ref = Dataset()
        study_ref.StudyInstanceUID, study_ref.ReferencedSeriesSequence = study, [series_ref]
        amended.PredecessorDocumentsSequence = [study_ref]
        container = next(
            item
            for item in amended.ContentSequence
            if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010"
        )
        dropped = container.ContentSequence[-1]
        container.ContentSequence = list(container.ContentSequence)[:-1]
        dropped_uid = next(str(i.UID) for i in dropped.ContentSequence if i.ValueType == "UIDREF")
        assert _send(port, amended).Status == 0x0000
        current = {
            v["tracking_uid"]: v
            for v in http_json(f"{url}/verdicts", token=DR)[1]
            if v["current"] and v["sr_uid"]
        }
        assert (
            current[dropped_uid]["kind"] == "reject"
            and current[dropped_uid]["evidence_uid"] == amended.SOPInstanceUID
        )
        assert {v["kind"] for uid, v in current.items() if uid != dropped_uid} == {"accept"}

        # 3. A rejection KOS: every finding of the SR rejected; one naming an unknown result is refused.
        before = len(http_json(f"{url}/verdicts", token=DR)[1])
        unknown = copy.deepcopy(sr)
        unknown.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
        refused = _send(port, _kos(study, unknown, ("113001", "DCM", "Rejected for Quality Reasons")))
        assert refused.Status == 0xC000 and "no AI result" in refused.ErrorComment
        assert len(http_json(f"{url}/verdicts", token=DR)[1]) == before  # nothing stored
        assert (
            _send(port, _kos(study, sr, ("113001", "DCM", "Rejected for Quality Reasons"))).Status == 0x0000
        )
        current = [v for v in http_json(f"{url}/verdicts", token=DR)[1] if v["current"] and v["sr_uid"]]
        assert {v["kind"] for v in current} == {"reject"} and len(current) == len(findings)

        # Verdict objects are not studies to analyse: never spooled, the study analysed once.
        assert [e for e in gateway.audit.read() if e["event"] == "series_analysed" and e["study"] == study][
            1:
        ] == []
        assert not list((tmp_path / "data" / "spool").rglob(f"*{edited.SOPInstanceUID}*"))
    finally:
        gateway.stop()
