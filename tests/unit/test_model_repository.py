"""Every config.pbtxt parses, ensembles map to real tensors, and the ONNX build is deterministic."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ensemble_steps.detection import heatmap_to_detections, hyperdensity_channels
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.config.settings import default_model_repository, load_settings
from gateway.demo.phantoms import head_slice

REPO = default_model_repository()


def load_configs() -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(REPO.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name, f"{path}: name must match its folder"
        configs[config.name] = config
    return configs


def test_every_config_parses_and_has_a_version_folder() -> None:
    configs = load_configs()
    assert "ct_head_hyperdensity" in configs
    for name in configs:
        assert (REPO / name / "1").is_dir(), f"{name} needs a version folder"


def test_ensemble_maps_name_tensors_that_exist_on_step_models() -> None:
    configs = load_configs()
    ensembles = [c for c in configs.values() if c.platform == "ensemble"]
    assert ensembles
    for ensemble in ensembles:
        available = {i.name for i in ensemble.input}
        for step in ensemble.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs = {i.name for i in model.input}
            outputs = {o.name for o in model.output}
            for key, value in step.input_map.items():
                assert key in inputs, f"{step.model_name} has no input {key}"
                assert value in available, (
                    f"{ensemble.name}: {value} is not produced before {step.model_name}"
                )
            for key, value in step.output_map.items():
                assert key in outputs, f"{step.model_name} has no output {key}"
                available.add(value)
        for output in ensemble.output:
            assert output.name in available, f"{ensemble.name} output {output.name} is never produced"


def test_detector_uses_dynamic_batching_with_priorities() -> None:
    detector = load_configs()["ct_head_hyperdensity_detector"]
    assert detector.max_batch_size >= load_settings().triton.max_slices_per_request
    assert detector.HasField("dynamic_batching")
    assert detector.dynamic_batching.priority_levels == 3


def test_every_configured_pipeline_has_a_model() -> None:
    configs = load_configs()
    for pipeline in load_settings().pipelines:
        assert pipeline.model in configs


def _build_module():
    spec = importlib.util.spec_from_file_location("build_models", REPO.parent / "scripts" / "build_models.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_onnx_build_is_deterministic(tmp_path: Path) -> None:
    build = _build_module()
    first = build.build_all(tmp_path / "a")
    second = build.build_all(tmp_path / "b")
    assert first == second
    for rel, digest in first.items():
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).hexdigest() == digest
        built = REPO / rel
        assert built.exists(), "run `make models`"
        assert hashlib.sha256(built.read_bytes()).hexdigest() == digest, f"{rel} is stale: run `make models`"


@pytest.fixture(scope="module")
def detector() -> ort.InferenceSession:
    return ort.InferenceSession(str(REPO / "ct_head_hyperdensity_detector/1/model.onnx"))


def _phantom(lesion: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = head_slice(256, 256, 0.5, rng)
    if lesion:
        yy, xx = np.mgrid[0:256, 0:256]
        hu[(yy - 100) ** 2 + (xx - 150) ** 2 <= 8**2] = 72.0
    return hu[None].astype(np.float32)


def test_detector_finds_a_hyperdense_blob_where_it_is(detector: ort.InferenceSession) -> None:
    heat = detector.run(None, {"INPUT": hyperdensity_channels(_phantom(True, 0))})[0]
    detections, slice_scores, study = heatmap_to_detections(heat, threshold=0.5)
    assert len(detections) == 1
    _, cls, score, x0, y0, x1, y1 = detections[0]
    assert cls == 0 and score > 0.9
    assert abs((x0 + x1) / 2 * 256 - 150) < 3 and abs((y0 + y1) / 2 * 256 - 100) < 3
    assert study[0] == pytest.approx(slice_scores.max())


def test_detector_is_quiet_on_normal_brain_and_skull_edges(detector: ort.InferenceSession) -> None:
    for seed in range(3):
        heat = detector.run(None, {"INPUT": hyperdensity_channels(_phantom(False, seed))})[0]
        assert float(heat.max()) < 0.2


def test_heatmap_to_detections_handles_empty_and_nan() -> None:
    heat = np.zeros((2, 1, 16, 16), dtype=np.float32)
    heat[1, 0, 4:8, 4:8] = np.nan
    detections, slice_scores, study = heatmap_to_detections(heat)
    assert detections.shape == (0, 7)
    assert slice_scores.tolist() == [0.0, 0.0] and study.tolist() == [0.0]
