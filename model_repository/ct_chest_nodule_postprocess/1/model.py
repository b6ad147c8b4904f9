"""Triton Python model: two detectors' heat maps -> fused, 3D-linked nodules. The math lives in ensemble_steps.lung."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.lung import nodules
from ensemble_steps.step import execute, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.threshold = float(params.get("threshold", "0.3"))
        self.max_elongation = float(params.get("max_elongation", "2.0"))

    def execute(self, requests):
        def run(small, large, channels, spacing):
            return nodules(
                small, large, channels, spacing, threshold=self.threshold, max_elongation=self.max_elongation
            )

        inputs = ["HEAT_SMALL", "HEAT_LARGE", "CHANNELS", "SPACING"]
        outputs = ["DETECTIONS", "SLICE_SCORES", "STUDY_SCORE"]
        return execute(pb_utils, requests, run, inputs, outputs, "postprocess")
