"""Triton Python model: two detectors' heat maps -> fused opacity boxes. The math lives in ensemble_steps.radiograph."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.radiograph import opacities
from ensemble_steps.step import execute, parameters


class TritonPythonModel:
    def initialize(self, args):
        self.threshold = float(parameters(args).get("threshold", "0.3"))

    def execute(self, requests):
        def run(small, large):
            return opacities(small, large, threshold=self.threshold)

        outputs = ["DETECTIONS", "SLICE_SCORES", "STUDY_SCORE"]
        return execute(pb_utils, requests, run, ["HEAT_SMALL", "HEAT_LARGE"], outputs, "postprocess")
