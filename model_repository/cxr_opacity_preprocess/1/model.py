"""Triton Python model: normalised radiographs -> [image, lung field]. The math lives in preprocessing.radiograph."""

import triton_python_backend_utils as pb_utils

from preprocessing.radiograph import radiograph_channels
from preprocessing.triton_step import execute


class TritonPythonModel:
    def execute(self, requests):
        fn = lambda image: (radiograph_channels(image),)  # noqa: E731
        return execute(pb_utils, requests, fn, ["IMAGE"], ["CHANNELS"], "preprocess")
