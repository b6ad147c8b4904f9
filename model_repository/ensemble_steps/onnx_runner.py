"""Triton Python-backend model that runs an ONNX file with onnxruntime on CPU.

The ``nvidia-pytriton`` wheel's tritonserver has no native ONNX Runtime backend. When the gateway starts that
server, every model folder configured for the native backend (``backend: "onnxruntime"`` or
``platform: "onnxruntime_onnx"``) is served through this file instead (see ``gateway/inference/server.py``), so a
vendor's standard Triton ONNX folder works unchanged here and natively in the official Triton container.

Requests merged by Triton's dynamic batcher are concatenated into one onnxruntime run and split back.
"""

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(folder, params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        onnx_inputs = [i.name for i in self.session.get_inputs()]
        self.input_map = {
            name: name if name in onnx_inputs else onnx_inputs[k] for k, (name, _) in enumerate(self.inputs)
        }

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds: dict[str, np.ndarray] = {}
        sizes: list[int] = []
        try:
            for name, dtype in self.inputs:
                arrays = [
                    pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(dtype, copy=False)
                    for r in requests
                ]
                if not sizes:
                    sizes = [a.shape[0] for a in arrays]
                merged = np.concatenate(arrays, axis=0) if (self.batching and len(arrays) > 1) else arrays[0]
                feeds[self.input_map[name]] = merged
            if not self.batching and len(requests) > 1:
                raise RuntimeError("non-batching model received several requests at once")
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:
            error = pb_utils.TritonError(f"onnx runner: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses: list[Any] = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(
                    name, np.ascontiguousarray(out[start : start + size] if self.batching else out)
                )
                for name, out in zip(self.outputs, results, strict=True)
            ]
            start += size
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
