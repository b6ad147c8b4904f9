import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gateway.core.errors import DecodeError
from gateway.demo.phantoms import write_head_ct
from preprocessing.decode import decode_file
from preprocessing.geometry import order_slices
from preprocessing.normalize import apply_window, prepare_stack, rescale_to_hu, resize_bilinear


def test_slices_are_ordered_by_position_not_instance_number(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path, slices=6, rows=64, cols=64, reverse_instance_numbers=True)
    images = [decode_file(p) for p in reversed(series.paths)]  # hand them over shuffled
    images = [images[i] for i in (2, 0, 5, 1, 4, 3)]
    order = order_slices(images)
    assert order.method == "geometry"
    ordered = [images[i] for i in order.indices]
    z = [img.image_position[2] for img in ordered]  # type: ignore[index]
    assert z == sorted(z)
    assert [img.sop_instance_uid for img in ordered] == list(series.sop_uids)
    assert order.spacing_mm == pytest.approx(5.0)
    # Instance numbers run the other way, so sorting by them would have reversed the stack.
    assert [img.instance_number for img in ordered] == [6, 5, 4, 3, 2, 1]


def test_oblique_stack_is_ordered_along_its_normal(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path, slices=4, rows=32, cols=32)
    images = [decode_file(p) for p in series.paths]
    c, s = np.cos(0.4), np.sin(0.4)
    iop = (1.0, 0.0, 0.0, 0.0, c, s)
    normal = np.cross(iop[:3], iop[3:])
    tilted = [
        dataclasses.replace(
            img, image_orientation=iop, image_position=tuple(float(v) for v in normal * (10 - 3 * k))
        )
        for k, img in enumerate(images)
    ]
    order = order_slices(tilted)
    assert order.indices == (3, 2, 1, 0)


def test_mixed_sizes_and_orientations_are_refused(tmp_path: Path) -> None:
    a = write_head_ct(tmp_path / "a", slices=2, rows=32, cols=32)
    b = write_head_ct(tmp_path / "b", slices=1, rows=48, cols=48)
    images = [decode_file(p) for p in a.paths]
    with pytest.raises(DecodeError, match="mixes image sizes"):
        order_slices([*images, decode_file(b.paths[0])])
    rotated = dataclasses.replace(images[1], image_orientation=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    with pytest.raises(DecodeError, match="orientations"):
        order_slices([images[0], rotated])


def test_missing_geometry_falls_back_to_instance_number(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path, slices=3, rows=32, cols=32, reverse_instance_numbers=False)
    images = [dataclasses.replace(decode_file(p), image_position=None) for p in reversed(series.paths)]
    order = order_slices(images)
    assert order.method == "instance_number"
    assert [images[i].instance_number for i in order.indices] == [1, 2, 3]


def test_rescale_and_window() -> None:
    stored = np.array([[0, 1024, 1064, 2048]], dtype=np.uint16)
    hu = rescale_to_hu(np, stored, 1.0, -1024.0)
    np.testing.assert_allclose(hu, [[-1024, 0, 40, 1024]])
    windowed = apply_window(np, hu, center=40.0, width=80.0)
    np.testing.assert_allclose(windowed, [[0.0, 0.0, 0.5, 1.0]])
    with pytest.raises(ValueError):
        apply_window(np, hu, 40.0, 0.0)


def test_resize_integer_factor_averages_blocks() -> None:
    stack = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = resize_bilinear(np, stack, (2, 2))
    np.testing.assert_allclose(out[0], [[2.5, 4.5], [10.5, 12.5]])


def test_resize_non_integer_factor_is_bilinear_and_preserves_constants() -> None:
    ramp = np.tile(np.arange(10, dtype=np.float32), (1, 10, 1))
    out = resize_bilinear(np, ramp, (7, 7))
    assert out.shape == (1, 7, 7)
    assert np.all(np.diff(out[0, 0]) > 0)  # still a monotone ramp
    const = np.full((2, 9, 13), 5.0, dtype=np.float32)
    np.testing.assert_allclose(resize_bilinear(np, const, (4, 6)), 5.0)


def test_prepare_stack_hu_and_window(tmp_path: Path) -> None:
    series = write_head_ct(tmp_path, slices=2, rows=256, cols=256)
    images = [decode_file(p) for p in series.paths]
    hu = prepare_stack(images, size=(32, 32), intensity="hu", hu_clip=(-1024.0, 3071.0))
    assert hu.shape == (2, 32, 32) and hu.dtype == np.float32
    assert hu.min() == pytest.approx(-1000, abs=5)  # air
    assert 20 < float(np.median(hu[:, 12:20, 12:20])) < 45  # brain
    win = prepare_stack(
        images, size=(32, 32), intensity="window", hu_clip=(-1024.0, 3071.0), window=(40.0, 80.0)
    )
    assert float(win.min()) == 0.0 and float(win.max()) == 1.0


def test_model_layouts_channels_and_dtype() -> None:
    from preprocessing.normalize import to_model_layout

    stack = np.linspace(0, 1, 2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    assert to_model_layout(stack, layout="NHW", channels=1, dtype="FP32").shape == (2, 4, 5)
    nchw = to_model_layout(stack, layout="NCHW", channels=3, dtype="FP32")
    assert nchw.shape == (2, 3, 4, 5) and np.array_equal(nchw[:, 2], stack)
    nhwc = to_model_layout(stack, layout="NHWC", channels=3, dtype="UINT8", scale=1.0)
    assert nhwc.shape == (2, 4, 5, 3) and nhwc.dtype == np.uint8 and nhwc.max() == 255 and nhwc.min() == 0
    shifted = to_model_layout(stack, layout="NHW", channels=1, dtype="FP32", scale=2.0, offset=-1.0)
    np.testing.assert_allclose(shifted, stack * 2 - 1, atol=1e-6)


def test_monochrome1_is_mirrored_over_the_stored_range() -> None:
    from preprocessing.normalize import invert_stored

    stored = np.array([[0, 100, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(invert_stored(np, stored, 12, False), [[4095, 3995, 0]])
    np.testing.assert_array_equal(
        invert_stored(np, np.array([[-2048, 0, 2047]]), 12, True), [[2047, -1, -2048]]
    )
