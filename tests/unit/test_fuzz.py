"""Property-based fuzzing of the parse / decode / preprocess / interpret entry points.

Bounded for CI; run longer with GATEWAY_FUZZ_EXAMPLES=5000 make unit PYTEST_ARGS="-k fuzz".
The property everywhere: bad input ends in the gateway's own error types (a clear reason), never in a crash,
and what does come out is well-formed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ensemble_steps.detection import heatmap_to_detections, hyperdensity_channels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.triton import DetectionOutput
from gateway.config.settings import load_settings
from gateway.core.errors import DecodeError, InvalidInstanceError
from gateway.demo.phantoms import write_head_ct
from gateway.ingest.spool import Spool
from gateway.orchestration.interpret import interpret
from preprocessing.normalize import resize_bilinear
from preprocessing.series import load_series, model_input

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[pydicom.Dataset, bytes]:
    path = write_head_ct(tmp_path_factory.mktemp("seed"), slices=1, rows=32, cols=32).paths[0]
    raw = path.read_bytes()
    offset = raw.index(b"DICM") + 4
    meta_len = int.from_bytes(raw[offset + 8 : offset + 12], "little")
    return pydicom.dcmread(path).file_meta, raw[offset + 12 + meta_len :]


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=6,
)


def mutate(body: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(body)
    for op, pos, value in ops:
        if not data:
            break
        pos %= len(data)
        if op == "flip":
            data[pos] ^= value
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes([value]) * 4
    return bytes(data)


@FUZZ
@given(ops=mutations)
def test_fuzz_store_then_decode_never_crashes(seed_file, tmp_path_factory, ops) -> None:
    meta, body = seed_file
    spool = Spool(tmp_path_factory.mktemp("spool"))
    try:
        record = spool.store(meta, mutate(body, ops), calling_ae="FUZZ")
    except InvalidInstanceError:
        return  # refused with a reason: fine
    assert record.path.exists() and record.path.is_relative_to(spool.root)
    try:
        loaded = load_series([record.path])
        stack = model_input(loaded, size=(16, 16), intensity="hu", hu_clip=(-1024.0, 3071.0), window=None)
    except DecodeError:
        return
    assert stack.shape == (1, 16, 16) and np.isfinite(stack).all()


@FUZZ
@given(
    stack=arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40)),
        elements=st.floats(-5000, 5000, width=32),
    ),
    out=st.tuples(st.integers(1, 33), st.integers(1, 33)),
)
def test_fuzz_resize_keeps_shape_and_range(stack, out) -> None:
    resized = resize_bilinear(np, stack, out)
    assert resized.shape == (stack.shape[0], *out)
    assert resized.min() >= stack.min() - 1e-2 and resized.max() <= stack.max() + 1e-2


@FUZZ
@given(
    heat=arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.just(1), st.integers(4, 24), st.integers(4, 24)),
        elements=st.one_of(st.floats(0, 1, width=32), st.just(float("nan"))),
    )
)
def test_fuzz_postprocess_outputs_are_well_formed(heat) -> None:
    detections, slices, study = heatmap_to_detections(heat, threshold=0.5)
    assert detections.shape[1] == 7 and slices.shape == (heat.shape[0],) and study.shape == (1,)
    assert np.isfinite(detections).all()
    if len(detections):
        assert (detections[:, 3:] >= 0).all() and (detections[:, 3:] <= 1).all()
        assert (detections[:, 5] > detections[:, 3]).all() and (detections[:, 6] > detections[:, 4]).all()
    channels = hyperdensity_channels(np.nan_to_num(heat[:, 0]) * 200.0)
    assert channels.shape == (heat.shape[0], 2, *heat.shape[2:]) and ((channels >= 0) & (channels <= 1)).all()


@FUZZ
@given(
    rows=arrays(
        np.float32,
        st.tuples(st.integers(0, 12), st.just(7)),
        elements=st.one_of(st.floats(-3, 3, width=32), st.sampled_from([float("nan"), float("inf"), 0.5])),
    )
)
def test_fuzz_interpret_only_writes_valid_findings(tmp_path_factory, rows) -> None:
    images = load_series(write_head_ct(tmp_path_factory.mktemp("s"), slices=2, rows=16, cols=16).paths).images
    output = DetectionOutput(
        detections=rows,
        slice_scores=np.zeros(2, np.float32),
        study_score=float("nan"),
        model_name="m",
        model_version="1",
        requests=1,
        seconds=0.0,
    )
    result = interpret(output, images, load_settings().pipelines[0])
    assert result.study_score == 0.0  # a NaN score is never propagated
    for finding in result.findings:
        x0, y0, x1, y1 = finding.bbox
        assert 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16 and 0.5 <= finding.confidence <= 1.0


def test_spool_refuses_a_dataset_whose_sop_class_differs_from_the_request(seed_file, tmp_path: Path) -> None:
    from gateway.core.errors import DatasetMismatchError, dimse_status_for

    meta, body = seed_file
    wrong = pydicom.dataset.FileMetaDataset(meta)
    wrong.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR announced, CT sent
    with pytest.raises(DatasetMismatchError) as info:
        Spool(tmp_path).store(wrong, body, calling_ae="X")
    assert dimse_status_for(info.value) == 0xA900
