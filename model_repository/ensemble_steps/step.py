"""The request loop shared by the reference ensembles' Triton Python-backend steps.

Each step's ``model.py`` names its input and output tensors and one numpy function; this module runs that
function per request and turns an exception into that request's error (one bad request never fails the others
that Triton batched with it). ``pb_utils`` is passed in: it only exists inside the Triton Python backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model's config.pbtxt as strings."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def execute(
    pb_utils: Any,
    requests: Sequence[Any],
    fn: Callable[..., tuple[np.ndarray, ...]],
    inputs: Sequence[str],
    outputs: Sequence[str],
    step: str,
) -> list[Any]:
    responses = []
    for request in requests:
        try:
            arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in inputs]
            results = fn(*arrays)
            if len(results) != len(outputs):
                raise ValueError(f"{step} produced {len(results)} outputs, expected {len(outputs)}")
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(a))
                for name, a in zip(outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        except Exception as exc:
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{step}: {exc}")))
    return responses
