"""Triton Python model: HU volume -> [tissue, air] channels. The math lives in ensemble_steps.lung."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.lung import lung_channels
from ensemble_steps.step import execute


class TritonPythonModel:
    def execute(self, requests):
        return execute(
            pb_utils, requests, lambda hu: (lung_channels(hu),), ["HU"], ["CHANNELS"], "preprocess"
        )
