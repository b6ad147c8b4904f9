#!/usr/bin/env python3
"""Build the reference ONNX detectors of model_repository/ deterministically (no downloads, no training).

The head CT hyperdensity detector is a fixed-weight convolutional network over the two channels made by the
ensemble's preprocess step (blood-band membership, bone membership):

    density = mean of the blood channel over a 7x7 neighbourhood            (Conv, fixed weights)
    near_bone = max of the bone channel over a 5x5 neighbourhood            (MaxPool)
    heat = sigmoid(gain * (density - 0.55) - bone_gain * near_bone)         (Mul, Sub, Sigmoid)

The same inputs always give byte-identical files: run it twice and compare sha256.
It is a reference model for exercising the pipeline, NOT a clinically validated detector.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent / "model_repository"
OPSET = 17
IR_VERSION = 8


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def build_head_ct_detector(kernel: int = 7, bone_kernel: int = 5) -> onnx.ModelProto:
    conv_w = np.zeros((1, 2, kernel, kernel), dtype=np.float32)
    conv_w[0, 0] = 1.0 / (kernel * kernel)
    initializers = [
        _const("density_w", conv_w),
        _const("density_b", np.array([-0.55], dtype=np.float32)),
        _const("gain", np.array(12.0, dtype=np.float32)),
        _const("bone_gain", np.array(20.0, dtype=np.float32)),
        _const("bone_start", np.array([1], dtype=np.int64)),
        _const("bone_end", np.array([2], dtype=np.int64)),
        _const("channel_axis", np.array([1], dtype=np.int64)),
    ]
    pad = kernel // 2
    bpad = bone_kernel // 2
    nodes = [
        helper.make_node(
            "Conv",
            ["INPUT", "density_w", "density_b"],
            ["density"],
            pads=[pad, pad, pad, pad],
            name="density_conv",
        ),
        helper.make_node(
            "Slice", ["INPUT", "bone_start", "bone_end", "channel_axis"], ["bone"], name="bone_channel"
        ),
        helper.make_node(
            "MaxPool",
            ["bone"],
            ["near_bone"],
            kernel_shape=[bone_kernel, bone_kernel],
            pads=[bpad, bpad, bpad, bpad],
            strides=[1, 1],
            name="bone_dilate",
        ),
        helper.make_node("Mul", ["density", "gain"], ["density_logit"], name="density_gain"),
        helper.make_node("Mul", ["near_bone", "bone_gain"], ["bone_logit"], name="bone_gain_mul"),
        helper.make_node("Sub", ["density_logit", "bone_logit"], ["logit"], name="suppress_bone"),
        helper.make_node("Sigmoid", ["logit"], ["HEATMAP"], name="heat"),
    ]
    return _finish(
        nodes,
        initializers,
        "head_ct_hyperdensity_detector",
        "Reference head CT hyperdensity detector (fixed weights). Not clinically validated.",
        channels=2,
    )


def _mean_kernel(channels: int, channel: int, size: int) -> np.ndarray:
    weights = np.zeros((1, channels, size, size), dtype=np.float32)
    weights[0, channel] = 1.0 / (size * size)
    return weights


def _finish(nodes: list, initializers: list, name: str, doc: str, channels: int) -> onnx.ModelProto:
    """[N, channels, H, W] INPUT -> [N, 1, H, W] HEATMAP graph of fixed weights, checked."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("HEATMAP", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dicom-ai-gateway/scripts/build_models.py",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _mean_conv(name: str, source: str, channels: int, channel: int, size: int, initializers: list) -> Any:
    initializers.append(_const(f"{name}_w", _mean_kernel(channels, channel, size)))
    pad = size // 2
    return helper.make_node("Conv", [source, f"{name}_w"], [name], pads=[pad] * 4, name=name)


def _gate(name: str, source: str, gain: float, centre: float, initializers: list) -> list:
    """sigmoid(gain * (source - centre))"""
    initializers += [
        _const(f"{name}_c", np.array(centre, dtype=np.float32)),
        _const(f"{name}_g", np.array(gain, dtype=np.float32)),
    ]
    return [
        helper.make_node("Sub", [source, f"{name}_c"], [f"{name}_d"], name=f"{name}_sub"),
        helper.make_node("Mul", [f"{name}_d", f"{name}_g"], [f"{name}_l"], name=f"{name}_mul"),
        helper.make_node("Sigmoid", [f"{name}_l"], [name], name=f"{name}_sigmoid"),
    ]


def build_lung_nodule_detector(core: int, context: int) -> onnx.ModelProto:
    """Chest CT, input [tissue, air] memberships: a tissue blob (mean tissue over core x core) surrounded by
    aerated lung (mean air over context x context). The two reference detectors differ in scale."""
    init: list = []
    nodes = [
        _mean_conv("core", "INPUT", 2, 0, core, init),
        _mean_conv("context", "INPUT", 2, 1, context, init),
        *_gate("blob", "core", 12.0, 0.6, init),
        *_gate("aerated", "context", 14.0, 0.6, init),
        helper.make_node("Mul", ["blob", "aerated"], ["HEATMAP"], name="heat"),
    ]
    return _finish(
        nodes,
        init,
        f"lung_nodule_detector_{core}_{context}",
        "Reference lung nodule detector. Fixed weights; not clinically validated.",
        2,
    )


def build_opacity_detector(core: int, context: int, threshold: float) -> onnx.ModelProto:
    """Chest radiograph, input [normalised image, lung field]: local brightness excess (mean over core x core
    minus mean over context x context) inside the lung field. The two reference detectors differ in scale."""
    init: list = []
    nodes = [
        _mean_conv("core", "INPUT", 2, 0, core, init),
        _mean_conv("context", "INPUT", 2, 0, context, init),
        _mean_conv("field", "INPUT", 2, 1, core, init),
        helper.make_node("Sub", ["core", "context"], ["excess"], name="excess"),
        *_gate("bright", "excess", 40.0, threshold, init),
        helper.make_node("Mul", ["bright", "field"], ["HEATMAP"], name="heat"),
    ]
    return _finish(
        nodes,
        init,
        f"cxr_opacity_detector_{core}_{context}",
        "Reference CXR opacity detector. Fixed weights; not clinically validated.",
        2,
    )


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "ct_head_hyperdensity_detector/1/model.onnx": build_head_ct_detector,
    "ct_chest_nodule_detector_small/1/model.onnx": lambda: build_lung_nodule_detector(3, 9),
    "ct_chest_nodule_detector_large/1/model.onnx": lambda: build_lung_nodule_detector(7, 25),
    "cxr_opacity_detector_small/1/model.onnx": lambda: build_opacity_detector(5, 21, 0.06),
    "cxr_opacity_detector_large/1/model.onnx": lambda: build_opacity_detector(11, 41, 0.045),
}


def build_all(repo: Path) -> dict[str, str]:
    """Write every model file; return relative path -> sha256."""
    digests = {}
    for rel, builder in MODELS.items():
        data = builder().SerializeToString(deterministic=True)
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=REPO, help="model repository to write into")
    args = parser.parse_args(argv)
    for rel, digest in build_all(args.repository).items():
        print(f"{digest}  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
