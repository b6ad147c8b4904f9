"""The gateway's Triton path against a real tritonserver: shared-memory and gRPC transport give the same answer,
several endpoints with one dead, and cross-study batching that cuts a shared request back into each study's
answer exactly as if the study had been sent alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from clients.triton import DetectionOutput, TritonClient
from gateway.core.domain import Priority
from gateway.core.errors import InferenceUnavailable
from gateway.demo.phantoms import Lesion, write_head_ct
from gateway.inference.batcher import CrossStudyBatcher
from gateway.inference.server import free_port
from preprocessing.series import load_series, model_input

pytestmark = pytest.mark.integration
MODEL = "ct_head_hyperdensity"


def _stack(folder: Path, slices: int, seed: int, lesion_slice: int | None) -> np.ndarray:
    lesions = () if lesion_slice is None else (Lesion(x=150, y=110, slice=lesion_slice, radius_mm=9.0),)
    series = write_head_ct(
        folder, slices=slices, rows=256, cols=256, pixel_mm=0.9, lesions=lesions, seed=seed
    )
    loaded = load_series(list(series.paths))
    return model_input(loaded, size=(256, 256), intensity="hu", hu_clip=(-1024.0, 3071.0), window=None)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = tmp_path_factory.mktemp("stacks")
    return [
        _stack(root / "a", 5, 1, 2),
        _stack(root / "b", 7, 2, None),
        _stack(root / "c", 3, 3, 1),
        _stack(root / "d", 20, 4, 12),
    ]


def _same(a: DetectionOutput, b: DetectionOutput) -> None:
    np.testing.assert_allclose(a.detections, b.detections, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.slice_scores, b.slice_scores, rtol=0, atol=1e-6)
    assert a.study_score == pytest.approx(b.study_score, abs=1e-6)


def test_shared_memory_and_grpc_payload_give_the_same_answer(triton: str, stacks: list[np.ndarray]) -> None:
    async def run() -> tuple[list[DetectionOutput], list[DetectionOutput], list[dict[str, object]], int]:
        shm = TritonClient(triton, transport="shared_memory", max_slices_per_request=8)
        grpc = TritonClient(triton, transport="grpc", max_slices_per_request=8)
        try:
            by_shm = [await shm.detect(MODEL, s, want_mask=True) for s in stacks]
            by_grpc = [await grpc.detect(MODEL, s, want_mask=True) for s in stacks]
            status = await shm._endpoints[0].client.get_system_shared_memory_status(as_json=True)
            return by_shm, by_grpc, shm.endpoints, len(status.get("regions", {}))
        finally:
            await shm.close()
            await grpc.close()

    by_shm, by_grpc, endpoints, regions = asyncio.run(run())
    assert endpoints[0]["transport"] == "shared_memory"
    assert regions >= 1, "Triton has no shared-memory region of the client registered"
    for a, b in zip(by_shm, by_grpc, strict=True):
        _same(a, b)
        assert a.mask is not None and b.mask is not None and np.array_equal(a.mask, b.mask)
    assert (
        len(by_shm[0].detections) >= 1 and len(by_shm[1].detections) == 0
    )  # the lesion study finds something


def test_a_dead_endpoint_is_skipped_and_the_live_one_serves(triton: str, stacks: list[np.ndarray]) -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def run() -> tuple[DetectionOutput, bool, list[dict[str, object]]]:
        client = TritonClient(f"{dead},{triton}", timeout_s=10.0)
        try:
            output = await client.detect(MODEL, stacks[0])  # may first hit the dead one, then retries
            ready = await client.is_ready()
            await client.detect(MODEL, stacks[2])
            return output, ready, client.endpoints
        finally:
            await client.close()

    output, ready, endpoints = asyncio.run(run())
    assert ready
    assert [e["ready"] for e in endpoints] == [False, True]
    assert endpoints[1]["requests"] >= 2
    assert len(output.detections) >= 1


def test_only_dead_endpoints_raise_unavailable(stacks: list[np.ndarray]) -> None:
    async def run() -> None:
        client = TritonClient(f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}", timeout_s=3.0)
        try:
            await client.detect(MODEL, stacks[0])
        finally:
            await client.close()

    with pytest.raises(InferenceUnavailable):
        asyncio.run(run())


def test_cross_study_batching_shares_requests_and_answers_each_study_as_if_alone(
    triton: str, stacks: list[np.ndarray]
) -> None:
    studies_per_request: list[int] = []

    async def run() -> tuple[list[DetectionOutput], list[DetectionOutput]]:
        client = TritonClient(triton, max_slices_per_request=16)
        batcher = CrossStudyBatcher(
            client, max_slices=16, max_delay_s=0.5, observe=lambda _m, n: studies_per_request.append(n)
        )
        try:
            alone = [await client.detect(MODEL, s, want_mask=True) for s in stacks]
            shared = await asyncio.gather(*(batcher.detect(MODEL, s, want_mask=True) for s in stacks))
            return alone, list(shared)
        finally:
            await client.close()

    alone, shared = asyncio.run(run())
    # 5 + 7 + 3 + 20 = 35 slices in requests of at most 16: three requests, one shared by four studies (they are
    # observed as they complete, which under load need not be the order they were sent in)
    assert sorted(studies_per_request) == [1, 1, 4]
    for a, s in zip(alone, shared, strict=True):
        np.testing.assert_allclose(s.detections, a.detections, rtol=0, atol=1e-6)
        np.testing.assert_allclose(s.slice_scores, a.slice_scores, rtol=0, atol=1e-6)
        assert s.mask is not None and a.mask is not None and np.array_equal(s.mask, a.mask)
        assert s.study_score == pytest.approx(float(a.slice_scores.max()), abs=1e-6)
    # 5 + 7 + 3 fill 15 of the first request; the 20-slice study takes its last slot, all 16 of the second and
    # 3 of the third, and is still stitched back exactly
    assert [s.requests for s in shared] == [1, 1, 1, 3]
    assert any(len(s.detections) for s in shared) and len(shared[1].detections) == 0


def test_stat_work_does_not_wait_for_a_batch_to_fill(triton: str, stacks: list[np.ndarray]) -> None:
    async def run() -> DetectionOutput:
        client = TritonClient(triton)
        batcher = CrossStudyBatcher(client, max_slices=512, max_delay_s=3600.0)
        try:
            return await asyncio.wait_for(batcher.detect(MODEL, stacks[0], priority=Priority.STAT), 60)
        finally:
            await client.close()

    # With an hour's batching delay, only STAT's no-wait rule lets this answer arrive within the minute.
    assert asyncio.run(run()).requests == 1
