"""config.pbtxt is read as Triton's ModelConfig message: comments and layout never change what a model is."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.inference.model_config import as_python_backend, declares_onnx_file, read_model_config
from gateway.inference.registry import composing_models

ENSEMBLE = """
name: "ens"  platform: "ensemble"  max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling { step [
  # { model_name: "old_step" model_version: -1 }   <- retired, commented out
  { model_name: "det" model_version: -1 input_map { key: "IN" value: "X" } output_map { key: "OUT" value: "Y" } }
] }
"""
DETECTOR = 'name: "det" backend:"onnxruntime" max_batch_size: 8  # native ONNX Runtime, on one line\n'


def _repository(tmp_path: Path) -> Path:
    for name, text in (("ens", ENSEMBLE), ("det", DETECTOR)):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text(text)
    return tmp_path


def test_a_commented_out_step_is_not_a_composing_model(tmp_path: Path) -> None:
    assert composing_models(_repository(tmp_path), "ens") == ["det", "ens"]


def test_an_onnx_model_written_on_one_line_is_recognised_and_shimmed(tmp_path: Path) -> None:
    config = read_model_config(_repository(tmp_path) / "det")
    assert declares_onnx_file(config)
    shim = as_python_backend(config)
    assert 'backend: "python"' in shim and "onnxruntime" not in shim and "max_batch_size: 8" in shim


def test_a_malformed_config_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.pbtxt").write_text('name: "bad"\nmax_batch_sise: 4\n')
    with pytest.raises(ConfigError, match=r"bad/config.pbtxt is not a valid Triton model configuration"):
        read_model_config(tmp_path / "bad")
