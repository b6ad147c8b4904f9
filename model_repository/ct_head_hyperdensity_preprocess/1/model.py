"""Triton Python model: HU slices -> model channels. The math lives in ensemble_steps.detection."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.detection import hyperdensity_channels
from ensemble_steps.step import execute


class TritonPythonModel:
    def execute(self, requests):
        return execute(
            pb_utils, requests, lambda hu: (hyperdensity_channels(hu),), ["HU"], ["CHANNELS"], "preprocess"
        )
