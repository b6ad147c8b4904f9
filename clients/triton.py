"""Async gRPC client for the Triton ensembles: many slices per request, chunks sent concurrently.

A series is split into requests of at most ``max_slices_per_request`` slices; the chunks go out together so
Triton's dynamic batcher can merge them (and chunks of other studies) into large detector batches.
The gateway's priority is passed on every request; Triton's priority 1 is the highest.

Several endpoints may be given (a cluster of Triton servers with the same models): each request goes to the
ready endpoint with the fewest requests in flight, and a request that finds its endpoint unavailable is tried
once on another. Input tensors travel in system shared memory when the endpoint is on this host
(``transport = "auto"`` or ``"shared_memory"``), in the gRPC message otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from clients.triton_shm import SharedMemoryPool
from gateway.core.domain import Priority
from gateway.core.errors import InferenceError, InferenceUnavailable

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
class DetectionChunk:
    """One request's answer from a detection ensemble."""

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


# gRPC status codes of Triton errors that say "not now" (unreachable, timed out, overloaded, model not loaded or
# not ready); any other code is the server's answer about this request and retrying would give the same.
TRANSIENT_STATUS = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"}
)


def is_transient(exc: BaseException) -> bool:
    """Classify a failed request by its status code (``StatusCode.UNAVAILABLE`` ...), not by its message."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        return status.rsplit(".", 1)[-1] in TRANSIENT_STATUS
    return isinstance(exc, (OSError, ConnectionError, TimeoutError, asyncio.TimeoutError))


NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}
TRANSPORTS = ("auto", "shared_memory", "grpc")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def split_urls(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:8001, b:8001"`` or a list -> the endpoint URLs, in order, without blanks."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in parts if p.strip())


class Answer:
    """Triton's answer to one request; outputs received in shared memory were copied out already."""

    def __init__(self, result: Any, received: dict[str, np.ndarray]) -> None:
        self._result = result
        self._received = received

    def as_numpy(self, name: str) -> np.ndarray | None:
        if name in self._received:
            return self._received[name]
        array = self._result.as_numpy(name)
        return None if array is None else np.asarray(array)


@dataclass(eq=False)
class _Endpoint:
    url: str
    client: Any  # tritonclient.grpc.aio.InferenceServerClient
    shm: SharedMemoryPool | None  # None: tensors go in the gRPC message
    in_flight: int = 0
    ready: bool = True
    requests: int = 0
    shm_failed: bool = False


class TritonClient:
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout_s: float = 60.0,
        max_slices_per_request: int = 32,
        observe: Callable[[str, float, int], None] | None = None,
        transport: str = "auto",
    ) -> None:
        """``url``: one endpoint or several (comma-separated or a list) serving the same models.
        ``observe(model, seconds, slices)`` is called after every successful request (metrics)."""
        import tritonclient.grpc.aio as grpcclient

        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        urls = split_urls(url)
        if not urls:
            raise ValueError("no Triton endpoint given")
        self._module = grpcclient
        from tritonclient.utils import triton_to_np_dtype

        self._triton_to_np = triton_to_np_dtype
        self.url = ",".join(urls)
        self.timeout_s = timeout_s
        self.max_slices_per_request = max_slices_per_request
        self._endpoints = []
        for i, u in enumerate(urls):
            client = grpcclient.InferenceServerClient(url=u, channel_args=CHANNEL_ARGS)
            local = u.rsplit(":", 1)[0] in _LOCAL_HOSTS
            use_shm = transport == "shared_memory" or (transport == "auto" and local)
            shm = SharedMemoryPool(client, tag=str(i)) if use_shm else None
            self._endpoints.append(_Endpoint(url=u, client=client, shm=shm))
        self._versions: dict[str, str] = {}
        self._observe = observe

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Per endpoint: url, ready, requests sent, requests in flight, transport in use."""
        return [
            {
                "url": e.url,
                "ready": e.ready,
                "requests": e.requests,
                "in_flight": e.in_flight,
                "transport": "shared_memory" if e.shm is not None and not e.shm_failed else "grpc",
            }
            for e in self._endpoints
        ]

    async def close(self) -> None:
        for endpoint in self._endpoints:
            if endpoint.shm is not None:
                await endpoint.shm.close()
            await endpoint.client.close()

    async def is_ready(self, model: str | None = None) -> bool:
        """Probe every endpoint (and remember which are ready); True when at least one is."""

        async def probe(endpoint: _Endpoint) -> bool:
            try:
                if model is None:
                    ok = bool(await endpoint.client.is_server_ready(client_timeout=5.0))
                else:
                    ok = bool(await endpoint.client.is_model_ready(model, client_timeout=5.0))
            except Exception:
                ok = False
            if model is None:
                endpoint.ready = ok
            return ok

        return any(await asyncio.gather(*(probe(e) for e in self._endpoints)))

    def _pick(self, exclude: _Endpoint | None = None) -> _Endpoint:
        """The ready endpoint with the fewest requests in flight (any endpoint when none is known ready)."""
        candidates = [e for e in self._endpoints if e is not exclude] or self._endpoints
        ready = [e for e in candidates if e.ready] or candidates
        return min(ready, key=lambda e: (e.in_flight, e.requests))

    async def model_version(self, model: str) -> str:
        if model not in self._versions:
            errors = []
            # Ready endpoints first; one that does not answer is marked down and the next asked.
            for endpoint in sorted(self._endpoints, key=lambda e: not e.ready):
                try:
                    meta = await endpoint.client.get_model_metadata(model, client_timeout=self.timeout_s)
                    break
                except Exception as exc:
                    endpoint.ready = False
                    errors.append(f"{endpoint.url}: {str(exc).strip()[:200]}")
            else:
                raise InferenceUnavailable(f"Triton model {model!r} metadata: {'; '.join(errors)}")
            versions = sorted(meta.versions, key=lambda v: int(v) if v.isdigit() else 0)
            self._versions[model] = versions[-1] if versions else "unknown"
        return self._versions[model]

    async def infer_detections(
        self,
        model: str,
        chunk: np.ndarray,
        priority: Priority,
        want_mask: bool,
        input_name: str,
        extra: dict[str, np.ndarray],
    ) -> DetectionChunk:
        inputs = {
            name: np.ascontiguousarray(array, dtype=np.float32)
            for name, array in {input_name: chunk, **extra}.items()
        }
        names = ["DETECTIONS", "SLICE_SCORES", "STUDY_SCORE"] + (["MASK"] if want_mask else [])
        result = await self.infer(model, inputs, names, priority)
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
        return DetectionChunk(
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
            tensor, lambda chunk: self.infer_scores(model, chunk, input_name, output_name, priority)
        )
        return ScoresOutput(
            scores=np.concatenate(parts, axis=0),
            model_name=model,
            model_version=version,
            requests=len(starts),
            seconds=time.perf_counter() - started,
        )

    async def infer_scores(
        self, model: str, chunk: np.ndarray, input_name: str, output_name: str, priority: Priority
    ) -> np.ndarray:
        if chunk.dtype not in NUMPY_TO_TRITON:
            raise InferenceError(f"unsupported input dtype {chunk.dtype} for model {model!r}")
        result = await self.infer(model, {input_name: np.ascontiguousarray(chunk)}, [output_name], priority)
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

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        priority: Priority,
        *,
        output_bytes: dict[str, int] | None = None,
    ) -> Answer:
        """One request on the least busy ready endpoint; an unavailable endpoint is marked down and the request
        tried once on another. ``output_bytes``: outputs whose size is known in advance, received in shared
        memory too when the inputs go that way."""
        endpoint = self._pick()
        try:
            return await self._call_on(endpoint, model, inputs, outputs, priority, output_bytes or {})
        except InferenceUnavailable as first:
            endpoint.ready = False  # the watcher's probe brings it back
            other = self._pick(exclude=endpoint)
            if other is endpoint or not other.ready:
                raise
            logger.warning("Triton %s unavailable (%s); request sent to %s", endpoint.url, first, other.url)
            return await self._call_on(other, model, inputs, outputs, priority, output_bytes or {})

    async def _call_on(
        self,
        endpoint: _Endpoint,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        priority: Priority,
        output_bytes: dict[str, int],
    ) -> Answer:
        grpc = self._module
        started = time.perf_counter()
        endpoint.in_flight += 1
        endpoint.requests += 1
        region = None
        try:
            tensors = [grpc.InferInput(n, list(a.shape), NUMPY_TO_TRITON[a.dtype]) for n, a in inputs.items()]
            requested = {n: grpc.InferRequestedOutput(n) for n in outputs}
            in_bytes = sum(a.nbytes for a in inputs.values())
            out_places: dict[str, int] = {}
            if endpoint.shm is not None and not endpoint.shm_failed:
                offset = -(-in_bytes // 64) * 64
                for name in outputs:
                    if name in output_bytes:
                        out_places[name] = offset
                        offset += -(-output_bytes[name] // 64) * 64
                region = await self._shm_region(endpoint, offset)
            if region is not None and endpoint.shm is not None:
                places = endpoint.shm.write(region, list(inputs.values()))
                for tensor, (offset, nbytes) in zip(tensors, places, strict=True):
                    tensor.set_shared_memory(region.name, nbytes, offset)
                for name, offset in out_places.items():
                    requested[name].set_shared_memory(region.name, output_bytes[name], offset)
            else:
                out_places = {}
                for tensor, array in zip(tensors, inputs.values(), strict=True):
                    tensor.set_data_from_numpy(array)
            result = await endpoint.client.infer(
                model,
                tensors,
                outputs=list(requested.values()),
                priority=TRITON_PRIORITY[priority],
                client_timeout=self.timeout_s,
            )
            copies = {}
            if region is not None:
                for name, offset in out_places.items():
                    meta = result.get_output(name)
                    dtype = np.dtype(self._triton_to_np(meta.datatype))
                    view: np.ndarray = np.ndarray(
                        tuple(meta.shape), dtype, buffer=region.memory.buf, offset=offset
                    )
                    copies[name] = view.copy()  # the region is reused as soon as this request ends
            if self._observe is not None:
                self._observe(model, time.perf_counter() - started, int(next(iter(inputs.values())).shape[0]))
            return Answer(result, copies)
        except Exception as exc:
            text = str(exc)
            transient = is_transient(exc)
            if region is not None and endpoint.shm is not None and "shared memory" in text.lower():
                # A restarted server has none of this client's registrations: register afresh, try again.
                endpoint.shm.forget()
                region = None
                transient = True
            error = InferenceUnavailable if transient else InferenceError
            raise error(f"Triton {endpoint.url} model {model!r}: {text.strip()[:500]}") from exc
        finally:
            endpoint.in_flight -= 1
            if region is not None and endpoint.shm is not None:
                endpoint.shm.release(region)

    async def _shm_region(self, endpoint: _Endpoint, nbytes: int) -> Any:
        """A shared-memory region for this request, or None after the endpoint refused one (then the payload)."""
        assert endpoint.shm is not None
        try:
            return await endpoint.shm.acquire(nbytes)
        except Exception as exc:
            endpoint.shm_failed = True
            logger.warning(
                "Triton %s cannot map this host's shared memory (%s); sending tensors in the gRPC message",
                endpoint.url,
                str(exc).strip()[:200],
            )
            return None

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
            lambda chunk: self.infer_detections(model, chunk, priority, want_mask, input_name, extra),
            step=stack.shape[0] if whole_volume else None,
        )
        detections, slice_scores, mask = stitch_detections(model, starts, answers, want_mask)
        return DetectionOutput(
            detections=detections,
            slice_scores=slice_scores,
            study_score=max(a.study_score for a in answers),
            mask=mask,
            model_name=model,
            model_version=version,
            requests=len(starts),
            seconds=time.perf_counter() - started,
        )


def stitch_detections(
    model: str, starts: list[int], answers: list[DetectionChunk], want_mask: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Answers for consecutive parts of a series (part i begins at slice ``starts[i]``) -> detections with
    series slice numbers, the series' slice scores, and its mask."""
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
    return (
        np.concatenate(detections, axis=0),
        np.concatenate([a.slice_scores for a in answers]),
        np.concatenate(masks, axis=0) if want_mask else None,
    )
