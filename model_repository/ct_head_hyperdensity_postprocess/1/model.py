"""Triton Python model: heat maps -> detections and scores. The math lives in preprocessing.detection."""

import json

import triton_python_backend_utils as pb_utils

from preprocessing.detection import heatmap_to_detections, heatmap_to_mask


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.threshold = float(params.get("threshold", {}).get("string_value", "0.5"))
        self.mask_threshold = float(params.get("mask_threshold", {}).get("string_value", "0.5"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                heat = pb_utils.get_input_tensor_by_name(request, "HEATMAP").as_numpy()
                detections, slices, study = heatmap_to_detections(heat, threshold=self.threshold)
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("DETECTIONS", detections),
                            pb_utils.Tensor("SLICE_SCORES", slices),
                            pb_utils.Tensor("STUDY_SCORE", study),
                            pb_utils.Tensor("MASK", heatmap_to_mask(heat, self.mask_threshold)),
                        ]
                    )
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocess: {exc}"))
                )
        return responses
