"""Triton Python model: HU volume -> [tissue, air] channels. The math lives in preprocessing.lung."""

import triton_python_backend_utils as pb_utils

from preprocessing.lung import lung_channels
from preprocessing.triton_step import execute


class TritonPythonModel:
    def execute(self, requests):
        return execute(
            pb_utils, requests, lambda hu: (lung_channels(hu),), ["HU"], ["CHANNELS"], "preprocess"
        )
