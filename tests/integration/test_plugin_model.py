"""The plug-in contract: a third-party ONNX classifier (NHWC, RGB, its own tensor names) is added by dropping a
standard Triton model folder into the repository and declaring a pipeline - no gateway code changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.inference.server import TritonServer, free_port
from gateway.results.content import read_measurement_report
from tests.support.servers import dciodvfy_errors, storescu, wait_for

pytestmark = pytest.mark.integration

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
GAIN, CENTRE = 12.0, 0.5


def build_vendor_classifier() -> onnx.ModelProto:
    """p(opacity) = sigmoid(GAIN * (mean brightness - CENTRE)); output [N, 2] = (p(normal), p(opacity))."""
    constants = [
        numpy_helper.from_array(np.array(CENTRE, np.float32), "centre"),
        numpy_helper.from_array(np.array(GAIN, np.float32), "gain"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1),  # [N, 1, 1, 1]
        helper.make_node("Flatten", ["mean"], ["mean2"], axis=1),  # [N, 1]
        helper.make_node("Sub", ["mean2", "centre"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p1"]),
        helper.make_node("Sub", ["one", "p1"], ["p0"]),
        helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vendor_cxr_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 64, 64, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


VENDOR_CONFIG = """
name: "vendor_cxr_classifier"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "image" data_type: TYPE_FP32 dims: [ 64, 64, 3 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { }
"""

PIPELINE = """
[[pipelines]]
name = "vendor_opacity"
model = "vendor_cxr_classifier"
algorithm_name = "Vendor CXR Opacity Classifier"
algorithm_version = "2.3.0"
mode = "assist"
report_threshold = 0.5
stat_threshold = 0.99
modalities = ["DX", "CR"]
body_parts = ["CHEST"]
input_size = [64, 64]
intensity = "window"
window = [2048.0, 4096.0]
hu_clip = [0.0, 4095.0]
input_layout = "NHWC"
input_channels = 3
input_dtype = "FP32"
input_name = "image"
output_kind = "class_scores"
output_name = "probabilities"
[pipelines.labels]
1 = "opacity"
"""


def write_dx(path: Path, brightness: float, *, monochrome1: bool = False) -> Dataset:
    rng = np.random.default_rng(int(brightness * 100))
    pixels = np.clip(rng.normal(brightness * 4095, 200, (256, 256)), 0, 4095).astype(np.uint16)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientSex = "PHANTOM^HEAD^TESTONLY", "PHANTOM-ID-0042", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = "DX", "CHEST", "Chest PA"
    ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber, ds.StudyID = 1, 1, "ACC-DX", "1"
    ds.ReferringPhysicianName = ""
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def expected_probability(path: Path) -> float:
    """The classifier's math on the gateway's documented preprocessing (window to [0, 1], 64x64)."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # mirrored over the 12-bit stored range
        values = (2 ** int(ds.BitsStored) - 1) - values
    windowed = np.clip((values - 0.0) / 4096.0, 0, 1)
    mean = windowed.reshape(64, 4, 64, 4).mean(axis=(1, 3)).mean()
    return float(1 / (1 + np.exp(-GAIN * (mean - CENTRE))))


def test_third_party_nhwc_classifier_runs_end_to_end_without_code_changes(
    tmp_path: Path, model_repository: Path
) -> None:
    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository, repository, ignore=shutil.ignore_patterns("__pycache__"))
    vendor = repository / "vendor_cxr_classifier"
    (vendor / "1").mkdir(parents=True)
    (vendor / "config.pbtxt").write_text(VENDOR_CONFIG)
    (vendor / "1" / "model.onnx").write_bytes(build_vendor_classifier().SerializeToString())

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\n[http]\nport = 0\n'
        f'[receiver]\nport = {port}\nallowed_calling_aes = ["STORESCU"]\n'
        f'[triton]\nmodel_repository = "{repository}"\n' + PIPELINE
    )
    bright, bright_m1, dark = tmp_path / "bright.dcm", tmp_path / "bright_m1.dcm", tmp_path / "dark.dcm"
    studies = {
        "bright": write_dx(bright, 0.8),
        "bright_mono1": write_dx(bright_m1, 0.8, monochrome1=True),
        "dark": write_dx(dark, 0.2),
    }
    gateway = Gateway(
        load_settings(config)
    ).start()  # its own Triton, serving the vendor folder as dropped in
    try:
        assert isinstance(gateway.triton_server, TritonServer)
        for path in (bright, bright_m1, dark):
            assert storescu([path], port=port, calling_ae="STORESCU").returncode == 0
        for ds in studies.values():
            wait_for(
                lambda uid=ds.StudyInstanceUID: [
                    e for e in gateway.audit.read() if e["event"] == "study_done" and e["study"] == uid
                ],
                timeout_s=90,
                what="classifier result",
            )
        results = tmp_path / "data" / "results"
        for name, path in (("bright", bright), ("bright_mono1", bright_m1)):
            uid = studies[name].StudyInstanceUID
            [sr_path] = sorted((results / uid).glob("SR_*.dcm"))
            [finding] = read_measurement_report(pydicom.dcmread(sr_path))
            assert finding.region is None  # an image-level finding, no box
            assert finding.finding_type.value == "112001" and finding.finding_site is not None
            assert finding.source_sop_instance_uid == studies[name].SOPInstanceUID
            assert (
                finding.algorithm_name == "Vendor CXR Opacity Classifier"
                and finding.algorithm_version == "2.3.0"
            )
            assert finding.measurement("CONFIDENCE") == pytest.approx(expected_probability(path), abs=2e-3)
            assert dciodvfy_errors(sr_path) == []
            [pr_path] = sorted((results / uid).glob("PR_*.dcm"))
            texts = [
                t.UnformattedTextValue
                for a in pydicom.dcmread(pr_path).GraphicAnnotationSequence
                if a.GraphicLayer == "AI_FINDINGS"
                for t in a.TextObjectSequence
            ]
            assert texts == [f"Opacity {finding.measurement('CONFIDENCE'):.0%}"]
            assert dciodvfy_errors(pr_path) == []
        # MONOCHROME1 is displayed inverted: the same anatomy gives the same answer as its MONOCHROME2 twin.
        confidences = [
            read_measurement_report(
                pydicom.dcmread(next((results / studies[n].StudyInstanceUID).glob("SR_*.dcm")))
            )[0].measurement("CONFIDENCE")
            for n in ("bright", "bright_mono1")
        ]
        assert confidences[0] == pytest.approx(confidences[1], abs=1e-6)
        dark_uid = studies["dark"].StudyInstanceUID
        assert expected_probability(dark) < 0.5
        assert read_measurement_report(pydicom.dcmread(next((results / dark_uid).glob("SR_*.dcm")))) == []
        assert not list((results / dark_uid).glob("PR_*.dcm"))
    finally:
        gateway.stop()


def test_silent_mode_records_results_but_sends_nothing(tmp_path: Path, triton: str) -> None:
    from gateway.demo.phantoms import Lesion, write_head_ct
    from tests.support.servers import Orthanc, WebhookReceiver

    orthanc = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    with WebhookReceiver() as webhook:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nstat_webhook_url = "{webhook.url}"\n'
            f'[http]\nport = 0\n[receiver]\nport = {port}\n[triton]\nurl = "{triton}"\n'
            f'[[peers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            '[[pipelines]]\nname = "shadow"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
            'mode = "silent"\nstat_threshold = 0.5\nmodalities = ["CT"]\ninput_size = [256, 256]\n'
            '[pipelines.labels]\n0 = "hemorrhage"\n'
        )
        gateway = Gateway(load_settings(config)).start()
        try:
            series = write_head_ct(
                tmp_path / "s", slices=12, lesions=(Lesion(x=260, y=250, slice=6),), seed=91
            )
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
            wait_for(
                lambda: [e for e in gateway.audit.read() if e["event"] == "study_done"],
                timeout_s=60,
                what="analysis",
            )
            [analysed] = [e for e in gateway.audit.read() if e["event"] == "series_analysed"]
            assert analysed["mode"] == "silent" and analysed["findings"] >= 1  # recorded ...
            assert analysed["destination"] == "" and analysed["stat"] is False  # ... but not sent, no STAT
            assert list((tmp_path / "data" / "results" / series.study_uid).glob("SR_*.dcm"))
            assert not list((tmp_path / "data" / "outbox").rglob("*.json"))
            assert not list((tmp_path / "data" / "results" / series.study_uid).glob("HL7_*"))
            assert webhook.events == []
            assert [
                s for s in orthanc.series_of_study(series.study_uid) if s["MainDicomTags"]["Modality"] == "SR"
            ] == []
        finally:
            gateway.stop()
            orthanc.stop()
