"""Async gRPC client for the Triton ensembles: many slices per request, chunks sent concurrently.

A series is split into requests of at most ``max_slices_per_request`` slices; the chunks go out together so
Triton's dynamic batcher can merge them (and chunks of other studies) into large detector batches.
The gateway's priority is passed on every request; Triton's priority 1 is the highest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gateway.domain import Priority
from gateway.errors import InferenceError, InferenceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRITON_PRIORITY = {Priority.STAT: 1, Priority.URGENT: 2, Priority.ROUTINE: 3}
DETECTION_WIDTHS = (7, 10)  # per-slice boxes; boxes of 3D objects with first slice, last slice, voxels
_MAX_MESSAGE = 2**31 - 1
# gRPC's default reconnect backoff grows to 2 minutes; a gateway must notice a restarted Triton within seconds.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True, kw_only=True)
class DetectionOutput:
    """What a detection ensemble answered for a whole series."""

    # [K, 7]: slice_index (in the series), class_id, score, x0, y0, x1, y1 (normalised);
    # [K, 10] from 3D models: + first slice, last slice, voxel count on the model grid
    detections: np.ndarray
    slice_scores: np.ndarray  # [N]
    study_score: float
    model_name: str
    model_version: str
    requests: int
    seconds: float
    mask: np.ndarray | None = None  # [N, H, W] uint8, when requested


@dataclass(frozen=True, kw_only=True)
class _Chunk:
    detections: np.ndarray
    slice_scores: np.ndarray
    study_score: float
    mask: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class ScoresOutput:
    """What a classification model answered for a whole series: one probability row per slice."""

    scores: np.ndarray  # [N, classes]
    model_name: str
    model_version: str
    requests: int
    seconds: float


NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}


class TritonClient:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        max_slices_per_request: int = 32,
        observe: Callable[[str, float, int], None] | None = None,
    ) -> None:
        """``observe(model, seconds, slices)`` is called after every successful request (metrics)."""
        import tritonclient.grpc.aio as grpcclient

        self._module = grpcclient
        self.url = url
        self.timeout_s = timeout_s
        self.max_slices_per_request = max_slices_per_request
        self._client = grpcclient.InferenceServerClient(url=url, channel_args=CHANNEL_ARGS)
        self._versions: dict[str, str] = {}
        self._observe = observe

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, model: str | None = None) -> bool:
        try:
            if model is None:
                return bool(await self._client.is_server_ready(client_timeout=5.0))
            return bool(await self._client.is_model_ready(model, client_timeout=5.0))
        except Exception:
            return False

    async def model_version(self, model: str) -> str:
        if model not in self._versions:
            try:
                meta = await self._client.get_model_metadata(model, client_timeout=self.timeout_s)
            except Exception as exc:
                raise InferenceUnavailable(f"Triton at {self.url}: model {model!r} metadata: {exc}") from exc
            versions = sorted(meta.versions, key=lambda v: int(v) if v.isdigit() else 0)
            self._versions[model] = versions[-1] if versions else "unknown"
        return self._versions[model]

    async def _infer_chunk(
        self,
        model: str,
        chunk: np.ndarray,
        priority: Priority,
        want_mask: bool,
        input_name: str,
        extra: dict[str, np.ndarray],
    ) -> _Chunk:
        grpc = self._module
        tensors = []
        for name, array in {input_name: chunk, **extra}.items():
            tensor = grpc.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            tensors.append(tensor)
        names = ["DETECTIONS", "SLICE_SCORES", "STUDY_SCORE"] + (["MASK"] if want_mask else [])
        outputs = [grpc.InferRequestedOutput(n) for n in names]
        result = await self._call(model, tensors, outputs, priority)
        detections = result.as_numpy("DETECTIONS")
        slice_scores = result.as_numpy("SLICE_SCORES")
        study_score = result.as_numpy("STUDY_SCORE")
        if detections is None or slice_scores is None or study_score is None:
            raise InferenceError(f"model {model!r} answered without DETECTIONS / SLICE_SCORES / STUDY_SCORE")
        if slice_scores.shape[0] != chunk.shape[0]:
            raise InferenceError(
                f"model {model!r} returned {slice_scores.shape[0]} slice scores for {chunk.shape[0]} slices"
            )
        mask = result.as_numpy("MASK") if want_mask else None
        if want_mask and (mask is None or mask.shape[0] != chunk.shape[0]):
            raise InferenceError(f"model {model!r} did not return a MASK for every slice")
        width = detections.shape[-1] if detections.ndim == 2 else 0
        if width not in DETECTION_WIDTHS:
            raise InferenceError(
                f"model {model!r} DETECTIONS must be [K, 7] or [K, 10], got {detections.shape}"
            )
        return _Chunk(
            detections=np.asarray(detections, dtype=np.float32),
            slice_scores=np.asarray(slice_scores, dtype=np.float32),
            study_score=float(np.max(study_score)) if study_score.size else 0.0,
            mask=mask,
        )

    async def classify(
        self,
        model: str,
        tensor: np.ndarray,
        *,
        input_name: str,
        output_name: str,
        priority: Priority = Priority.ROUTINE,
    ) -> ScoresOutput:
        """Run a per-image classifier over [N, ...] images of one series; returns [N, classes] scores."""
        if tensor.ndim < 3 or tensor.shape[0] == 0:
            raise InferenceError(f"expected a non-empty batch of images, got shape {tensor.shape}")
        started = time.perf_counter()
        version = await self.model_version(model)
        starts, parts = await self._in_chunks(
            tensor, lambda chunk: self._scores_chunk(model, chunk, input_name, output_name, priority)
        )
        return ScoresOutput(
            scores=np.concatenate(parts, axis=0),
            model_name=model,
            model_version=version,
            requests=len(starts),
            seconds=time.perf_counter() - started,
        )

    async def _scores_chunk(
        self, model: str, chunk: np.ndarray, input_name: str, output_name: str, priority: Priority
    ) -> np.ndarray:
        grpc = self._module
        datatype = NUMPY_TO_TRITON.get(chunk.dtype)
        if datatype is None:
            raise InferenceError(f"unsupported input dtype {chunk.dtype} for model {model!r}")
        tensor = grpc.InferInput(input_name, list(chunk.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(chunk))
        result = await self._call(model, [tensor], [grpc.InferRequestedOutput(output_name)], priority)
        scores = result.as_numpy(output_name)
        if scores is None or scores.ndim != 2 or scores.shape[0] != chunk.shape[0]:
            shape = None if scores is None else scores.shape
            raise InferenceError(f"model {model!r} output {output_name!r} must be [N, classes]; got {shape}")
        return np.asarray(scores, dtype=np.float32)

    async def _in_chunks(
        self, array: np.ndarray, call: Callable[[np.ndarray], Awaitable[T]], step: int | None = None
    ) -> tuple[list[int], list[T]]:
        """Split along the first axis into requests of at most ``step`` (default max_slices_per_request)
        and send them together."""
        step = step or self.max_slices_per_request
        starts = list(range(0, array.shape[0], step))
        results = await asyncio.gather(*(call(array[s : s + step]) for s in starts))
        return starts, list(results)

    async def _call(self, model: str, inputs: list[Any], outputs: list[Any], priority: Priority) -> Any:
        started = time.perf_counter()
        try:
            result = await self._client.infer(
                model,
                inputs,
                outputs=outputs,
                priority=TRITON_PRIORITY[priority],
                client_timeout=self.timeout_s,
            )
            if self._observe is not None:
                self._observe(model, time.perf_counter() - started, int(inputs[0].shape()[0]))
            return result
        except Exception as exc:
            text = str(exc)
            # Unreachable, timed out, or model not loaded are transient; anything else is the model's answer.
            transient = any(
                s in text
                for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "not found", "not ready", "unavailable")
            )
            error = InferenceUnavailable if transient else InferenceError
            raise error(f"Triton {self.url} model {model!r}: {text.strip()[:500]}") from exc

    async def detect(
        self,
        model: str,
        stack: np.ndarray,
        *,
        priority: Priority = Priority.ROUTINE,
        want_mask: bool = False,
        input_name: str = "HU",
        whole_volume: bool = False,
        extra_inputs: dict[str, np.ndarray] | None = None,
    ) -> DetectionOutput:
        """Run a detection ensemble over a [N, H, W] stack of one series (in one request when ``whole_volume``;
        ``extra_inputs`` go with every request)."""
        if stack.ndim != 3 or stack.shape[0] == 0:
            raise InferenceError(f"expected a non-empty [N, H, W] stack, got shape {stack.shape}")
        started = time.perf_counter()
        version = await self.model_version(model)
        extra = extra_inputs or {}
        starts, answers = await self._in_chunks(
            stack,
            lambda chunk: self._infer_chunk(model, chunk, priority, want_mask, input_name, extra),
            step=stack.shape[0] if whole_volume else None,
        )
        widths = {a.detections.shape[1] for a in answers}
        if len(widths) > 1:
            raise InferenceError(f"model {model!r} answered DETECTIONS of different widths {sorted(widths)}")
        detections = []
        for offset, chunk in zip(starts, answers, strict=True):
            shifted = chunk.detections.copy()
            shifted[:, 0] += offset
            if shifted.shape[1] == 10:
                shifted[:, 7:9] += offset
            detections.append(shifted)
        masks = [a.mask for a in answers if a.mask is not None]
        return DetectionOutput(
            detections=np.concatenate(detections, axis=0),
            slice_scores=np.concatenate([a.slice_scores for a in answers]),
            study_score=max(a.study_score for a in answers),
            mask=np.concatenate(masks, axis=0) if want_mask else None,
            model_name=model,
            model_version=version,
            requests=len(starts),
            seconds=time.perf_counter() - started,
        )
