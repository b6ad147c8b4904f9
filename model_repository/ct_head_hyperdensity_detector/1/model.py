"""Triton Python model running an ONNX file with onnxruntime on CPU.

Requests merged by Triton's dynamic batcher are concatenated into one onnxruntime run and split back,
so batching across studies really happens in one model execution.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        path = os.path.join(
            args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx")
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.onnx_input = self.session.get_inputs()[0].name
        self.onnx_output = self.session.get_outputs()[0].name

    def execute(self, requests):
        arrays, sizes, responses = [], [], [None] * len(requests)
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            arrays.append(array.astype(self.input_dtype, copy=False))
            sizes.append(array.shape[0])
        try:
            merged = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
            result = self.session.run([self.onnx_output], {self.onnx_input: merged})[0]
        except Exception as exc:
            error = pb_utils.TritonError(f"detector: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        start = 0
        for i, size in enumerate(sizes):
            part = np.ascontiguousarray(result[start : start + size])
            start += size
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, part)])
        return responses
