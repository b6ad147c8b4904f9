"""A model folder's ``config.pbtxt`` read as what it is: Triton's ``ModelConfig`` protobuf message (text format),
parsed with protobuf itself rather than patterns, so that comments, field order and formatting never change what
the gateway understands of a model."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from gateway.core.errors import ConfigError


def read_model_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(), ModelConfig())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except text_format.ParseError as exc:
        raise ConfigError(f"{path} is not a valid Triton model configuration: {exc}") from exc


def ensemble_step_models(config: ModelConfig) -> list[str]:
    """The models an ensemble's steps call (none for a plain model)."""
    return [step.model_name for step in config.ensemble_scheduling.step]


def runs_on_onnxruntime(config: ModelConfig) -> bool:
    return config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx"


def declares_onnx_file(config: ModelConfig) -> bool:
    """The folder's model is an ONNX file: native ONNX Runtime, or the generic runner's ``onnx_file`` parameter."""
    return runs_on_onnxruntime(config) or "onnx_file" in config.parameters


def as_python_backend(config: ModelConfig) -> str:
    """The same configuration served by Triton's Python backend (the generic ONNX runner), as text."""
    shim = ModelConfig()
    shim.CopyFrom(config)
    shim.platform = ""
    shim.backend = "python"
    return text_format.MessageToString(shim)
