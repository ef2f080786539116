"""Frame validation and preprocessing: dtype-driven scale, colour orders, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edgead.errors import ConfigError, InputError
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, check_frame, prepare, prepare_batch


def _expected(rgb01: np.ndarray) -> np.ndarray:
    return ((rgb01 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


def test_bgr_is_reversed_to_rgb_and_scaled_by_dtype() -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(1, 255, size=(64, 64, 3), dtype=np.uint8)
    out = prepare(bgr, 64)
    np.testing.assert_allclose(out, _expected(bgr[:, :, ::-1] / 255.0), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32 and out.flags.c_contiguous


def test_uint16_scale_comes_from_dtype_not_from_data() -> None:
    dark = np.full((64, 64), 1000, np.uint16)  # a dark 16-bit frame must not be stretched
    out = prepare(dark, 64, color="gray")
    np.testing.assert_allclose(out[:, 0, 0], (1000 / 65535.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-5)


@pytest.mark.parametrize(("color", "channels"), [("rgb", 3), ("bgra", 4), ("rgba", 4), ("gray", 1)])
def test_colour_orders_agree(color: str, channels: int) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(1, 255, size=(32, 32, 3), dtype=np.uint8)
    if color == "gray":
        rgb[:] = rgb[:, :, :1]
        frame = np.ascontiguousarray(rgb[:, :, 0])
    elif color == "rgb":
        frame = rgb
    else:
        alpha = np.full((32, 32, 1), 7, np.uint8)
        frame = np.ascontiguousarray(np.concatenate([rgb[:, :, ::-1] if color == "bgra" else rgb, alpha], axis=2))
    assert (frame.shape[2] if frame.ndim == 3 else 1) == channels
    np.testing.assert_allclose(prepare(frame, 32, color=color), _expected(rgb / 255.0), rtol=1e-5, atol=1e-5)


def test_resize_to_model_size_and_batch() -> None:
    frames = [np.zeros((30, 50, 3), np.uint8) + 1, np.zeros((480, 640, 3), np.uint8) + 2]
    batch = prepare_batch(frames, 128)
    assert batch.shape == (2, 3, 128, 128)


@pytest.mark.parametrize(
    ("frame", "color", "match"),
    [
        ([[1, 2]], "bgr", "numpy.ndarray"),
        (np.zeros((4, 4, 3), np.float32), "bgr", "dtype"),
        (np.zeros((2, 4, 4, 3), np.uint8), "bgr", "HxW or HxWxC"),
        (np.zeros((0, 4, 3), np.uint8), "bgr", "non-empty"),
        (np.zeros((4, 4, 4), np.uint8), "bgr", "channels"),
        (np.zeros((4, 8, 3), np.uint8)[:, ::2], "bgr", "contiguous"),
    ],
)
def test_bad_frames_are_refused_with_a_fix(frame: object, color: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        check_frame(frame, color)
    assert "how to fix" in str(info.value)


def test_unknown_colour_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'bgr'"):
        check_frame(np.zeros((4, 4, 3), np.uint8), "bgrr")
    with pytest.raises(InputError, match="at least one frame"):
        prepare_batch([], 64)
