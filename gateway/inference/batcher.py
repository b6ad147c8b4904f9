"""Cross-study batching: one Triton request carries the slices of several studies.

A one-image radiograph or a 24-slice head CT alone makes a small request, and every request costs a round trip
and a pass through each Python step of an ensemble. The batcher keeps, per model, priority and input signature,
a lane of pending slices; a lane is sent when it holds ``max_slices`` slices or when its oldest slice has waited
``max_delay_s`` (STAT lanes do not wait), whichever comes first. The answer is cut back into each study's slices.

This is for per-slice models only (``input_scope = "slice"``), which must treat every slice on its own; a study's
score is then the maximum of its own slice scores (the model's STUDY_SCORE describes the whole, mixed, batch).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.triton import DetectionChunk, DetectionOutput, ScoresOutput, TritonClient, stitch_detections
from gateway.core.domain import Priority


@dataclass(eq=False)
class _Piece:
    caller: int
    array: np.ndarray
    future: asyncio.Future[tuple[Any, int]]  # (this piece's part of the answer, request number)


@dataclass(eq=False)
class _Lane:
    send: Callable[[np.ndarray], Any]  # coroutine function: the whole batch -> the model's answer
    cut: Callable[[Any, int, int], Any]  # (answer, start, stop) -> one piece's part
    pieces: list[_Piece] = field(default_factory=list)
    slices: int = 0
    timer: asyncio.TimerHandle | None = None


class CrossStudyBatcher:
    def __init__(
        self,
        client: TritonClient,
        *,
        max_slices: int,
        max_delay_s: float,
        observe: Callable[[str, int], None] | None = None,
    ) -> None:
        """``observe(model, studies)`` is called with the number of studies in every request sent (metrics)."""
        if max_slices < 1:
            raise ValueError("max_slices must be >= 1")
        self.client = client
        self.max_slices = max_slices
        self.max_delay_s = max_delay_s
        self._observe = observe
        self._lanes: dict[Hashable, _Lane] = {}
        self._callers = itertools.count()
        self._requests = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

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
        """Like ``TritonClient.detect``, sharing requests with other studies; a whole volume or extra inputs
        (3D models) go straight to the client, unshared."""
        if whole_volume or extra_inputs:
            return await self.client.detect(
                model,
                stack,
                priority=priority,
                want_mask=want_mask,
                input_name=input_name,
                whole_volume=whole_volume,
                extra_inputs=extra_inputs,
            )
        started = time.perf_counter()
        version = await self.client.model_version(model)
        stack = np.ascontiguousarray(stack, dtype=np.float32)

        async def send(batch: np.ndarray) -> DetectionChunk:
            return await self.client.infer_detections(model, batch, priority, want_mask, input_name, {})

        key = ("detect", model, priority, input_name, want_mask, stack.shape[1:])
        starts, parts, requests = await self._run(key, stack, send, _cut_detections, priority)
        detections, slice_scores, mask = stitch_detections(model, starts, parts, want_mask)
        return DetectionOutput(
            detections=detections,
            slice_scores=slice_scores,
            study_score=float(slice_scores.max()) if slice_scores.size else 0.0,
            mask=mask,
            model_name=model,
            model_version=version,
            requests=requests,
            seconds=time.perf_counter() - started,
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
        """Like ``TritonClient.classify``, sharing requests with other studies."""
        started = time.perf_counter()
        version = await self.client.model_version(model)

        async def send(batch: np.ndarray) -> np.ndarray:
            return await self.client.infer_scores(model, batch, input_name, output_name, priority)

        key = ("classify", model, priority, input_name, output_name, tensor.shape[1:], tensor.dtype.str)
        _, parts, requests = await self._run(key, tensor, send, lambda scores, a, b: scores[a:b], priority)
        return ScoresOutput(
            scores=np.concatenate(parts, axis=0),
            model_name=model,
            model_version=version,
            requests=requests,
            seconds=time.perf_counter() - started,
        )

    async def _run(
        self,
        key: Hashable,
        array: np.ndarray,
        send: Callable[[np.ndarray], Any],
        cut: Callable[[Any, int, int], Any],
        priority: Priority,
    ) -> tuple[list[int], list[Any], int]:
        """Put the series' slices into the lane's batches; returns each piece's start, its answer, and the
        number of distinct requests they went in."""
        if array.shape[0] == 0:
            raise ValueError("nothing to infer: empty series")
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(send=send, cut=cut)
        caller = next(self._callers)
        loop = asyncio.get_running_loop()
        starts, futures = [], []
        start = 0
        while start < array.shape[0]:
            take = min(self.max_slices - lane.slices, array.shape[0] - start)
            piece = _Piece(caller=caller, array=array[start : start + take], future=loop.create_future())
            lane.pieces.append(piece)
            lane.slices += take
            starts.append(start)
            futures.append(piece.future)
            start += take
            if lane.slices >= self.max_slices:
                self._flush(key)
        if lane.pieces and lane.timer is None:
            delay = 0.0 if priority is Priority.STAT else self.max_delay_s  # STAT does not wait for company
            lane.timer = loop.call_later(delay, self._flush, key)
        answers = await asyncio.gather(*futures)
        return starts, [part for part, _ in answers], len({number for _, number in answers})

    def _flush(self, key: Hashable) -> None:
        lane = self._lanes[key]
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        pieces, lane.pieces, lane.slices = lane.pieces, [], 0
        if pieces:
            task = asyncio.get_running_loop().create_task(self._send(key, lane, pieces))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, key: Hashable, lane: _Lane, pieces: list[_Piece]) -> None:
        number = next(self._requests)
        batch = pieces[0].array if len(pieces) == 1 else np.concatenate([p.array for p in pieces], axis=0)
        try:
            answer = await lane.send(batch)
        except BaseException as exc:
            for piece in pieces:
                if not piece.future.done():
                    piece.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if self._observe is not None and isinstance(key, tuple):
            self._observe(str(key[1]), len({p.caller for p in pieces}))
        offset = 0
        for piece in pieces:
            stop = offset + piece.array.shape[0]
            if not piece.future.done():
                piece.future.set_result((lane.cut(answer, offset, stop), number))
            offset = stop


def _cut_detections(answer: DetectionChunk, start: int, stop: int) -> DetectionChunk:
    """The rows, scores and mask of slices [start, stop) of a batch, with slice numbers made piece-relative."""
    rows = answer.detections[(answer.detections[:, 0] >= start) & (answer.detections[:, 0] < stop)].copy()
    rows[:, 0] -= start
    scores = answer.slice_scores[start:stop]
    return DetectionChunk(
        detections=rows,
        slice_scores=scores,
        study_score=float(scores.max()) if scores.size else 0.0,
        mask=None if answer.mask is None else answer.mask[start:stop],
    )
