"""Triton Python model: normalised radiographs -> [image, lung field]. The math lives in ensemble_steps.radiograph."""

import triton_python_backend_utils as pb_utils
from ensemble_steps.radiograph import radiograph_channels
from ensemble_steps.step import execute


class TritonPythonModel:
    def execute(self, requests):
        fn = lambda image: (radiograph_channels(image),)  # noqa: E731
        return execute(pb_utils, requests, fn, ["IMAGE"], ["CHANNELS"], "preprocess")
