"""Triton Python model: HU slices -> model channels. The math lives in preprocessing.detection."""

import json

import triton_python_backend_utils as pb_utils

from preprocessing.detection import hyperdensity_channels


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "CHANNELS")
        self.out_dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                hu = pb_utils.get_input_tensor_by_name(request, "HU").as_numpy()
                channels = hyperdensity_channels(hu).astype(self.out_dtype, copy=False)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("CHANNELS", channels)]))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess: {exc}")))
        return responses
