"""Frame validation and preprocessing: the one definition shared by training and runtime.

A frame is an HxW or HxWxC numpy array of uint8 or uint16 (BGR by default, the OpenCV
convention). The pixel scale comes from the dtype (255 or 65535), never from the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .errors import InputError, message
from .registry import COLORS, check_choice

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "check_frame", "to_rgb", "resize_image", "prepare", "prepare_batch"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_CHANNELS = {"gray": 1, "bgr": 3, "rgb": 3, "bgra": 4, "rgba": 4}


def check_frame(frame: object, color: str = "bgr") -> np.ndarray:
    """Validate one frame and return it (in native byte order); raise InputError naming what is wrong.

    >>> check_frame(np.zeros((4, 6, 3), np.uint8)).shape
    (4, 6, 3)
    """
    color = check_choice("color", color, COLORS)
    if not isinstance(frame, np.ndarray):
        raise InputError(message("frame", type(frame).__name__, "a numpy.ndarray", "pass the image as a numpy array (cv2.imread gives one)"))
    if frame.dtype.kind == "u" and frame.dtype.itemsize == 2 and not frame.dtype.isnative:
        frame = frame.astype(np.uint16)  # big-endian 16-bit (some camera SDKs, FITS/TIFF readers): same values, native order
    if frame.dtype not in _SCALE:
        raise InputError(message("frame dtype", frame.dtype, "uint8 or uint16", "convert with frame.astype(np.uint8) after scaling to 0..255"))
    if frame.ndim not in (2, 3):
        raise InputError(message("frame shape", frame.shape, "HxW or HxWxC", "pass one image; use infer_batch for several"))
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(message("frame shape", frame.shape, "a non-empty image", "check the camera or file delivered pixels"))
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    expected = _CHANNELS[color]
    if channels != expected:
        raise InputError(
            message("frame channels", f"{channels} (shape {frame.shape})", f"{expected} for color='{color}'", "pass the matching color= option (gray, bgr, rgb, bgra, rgba)")
        )
    if not frame.flags.c_contiguous:
        raise InputError(message("frame memory layout", "a non-contiguous view", "a C-contiguous array", "pass np.ascontiguousarray(frame)"))
    return frame


def to_rgb(frame: np.ndarray, color: str = "bgr") -> np.ndarray:
    """Convert a validated frame to HxWx3 RGB of the same dtype."""
    color = check_choice("color", color, COLORS)
    if frame.ndim == 2 or frame.shape[2] == 1:
        gray = frame if frame.ndim == 2 else frame[:, :, 0]
        return np.repeat(gray[:, :, None], 3, axis=2)
    if color == "bgr":
        return frame[:, :, ::-1]
    if color == "bgra":
        return frame[:, :, 2::-1]
    if color == "rgba":
        return frame[:, :, :3]
    return frame


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased resize: area averaging along an axis that shrinks, bilinear along one that grows.

    Plain bilinear sampling (cv2.INTER_LINEAR) reads only 2x2 source pixels per output pixel, so a
    5x reduction skips 80 % of the rows and columns: a thin scratch or pin-hole vanishes or aliases
    into noise. Area averaging keeps every source pixel's contribution (as PIL / torchvision's
    antialiased resize that the reference implementation trains with).

    >>> img = np.zeros((10, 10), np.uint8); img[:, 4] = 250   # a 1-pixel line
    >>> int(resize_image(img, 2, 2).max())                      # averaged in, not skipped
    50
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if w > width:  # shrink x by area, keep y
        image = cv2.resize(image, (width, h), interpolation=cv2.INTER_AREA)
    if h > height:
        image = cv2.resize(image, (image.shape[1], height), interpolation=cv2.INTER_AREA)
    if image.shape[:2] != (height, width):  # what is left grows: bilinear
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image


def prepare(
    frame: np.ndarray,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    color: str = "bgr",
) -> np.ndarray:
    """Frame -> normalised float32 CHW tensor of the model's input size.

    Resize (:func:`resize_image`: area averaging when shrinking, bilinear when enlarging) happens
    on the original dtype, then the dtype's full scale maps to [0, 1] and the per-channel mean/std
    are applied.

    >>> prepare(np.full((10, 12), 128, np.uint8), 64, color="gray").shape
    (3, 64, 64)
    """
    frame = check_frame(frame, color)
    scale = _SCALE[frame.dtype]
    # resize first: it works per channel, so this equals resizing the RGB image, on far fewer pixels
    frame = resize_image(frame, image_size, image_size)
    rgb = np.ascontiguousarray(to_rgb(frame, color))
    x = rgb.astype(np.float32) * np.float32(1.0 / scale)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def prepare_batch(
    frames: Sequence[np.ndarray],
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    color: str = "bgr",
) -> np.ndarray:
    """Several frames -> float32 NCHW batch (see :func:`prepare`)."""
    if len(frames) == 0:
        raise InputError(message("frames", "an empty sequence", "at least one frame", "pass a non-empty list of frames"))
    return np.stack([prepare(f, image_size, mean, std, color) for f in frames])
