"""Triton Python model: heat maps -> detections, scores and mask. The math lives in ensemble_steps.detection."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.detection import heatmap_to_detections, heatmap_to_mask
from ensemble_steps.step import execute, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.threshold = float(params.get("threshold", "0.5"))
        self.mask_threshold = float(params.get("mask_threshold", "0.5"))

    def execute(self, requests):
        def run(heat):
            detections, slices, study = heatmap_to_detections(heat, threshold=self.threshold)
            return detections, slices, study, heatmap_to_mask(heat, self.mask_threshold)

        outputs = ["DETECTIONS", "SLICE_SCORES", "STUDY_SCORE", "MASK"]
        return execute(pb_utils, requests, run, ["HEATMAP"], outputs, "postprocess")
