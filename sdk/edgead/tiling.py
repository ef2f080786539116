"""Tiled inference: small defects in large frames.

A frame squeezed to the model size loses what is smaller than a few pixels after the squeeze (a
pin-hole on a 640 px PCB image at 128 px, a scratch on a 5-megapixel line-camera frame). With a
tiling, the frame is cut into overlapping tiles of ``tile`` frame pixels, each tile is resized to the
model input (no resize at all when ``tile`` equals the model size), all tiles run as one batch, and
the tile maps are stitched back into one frame map. The layout only depends on the frame size, so
training, calibration, evaluation and the runtime cut every frame the same way; it is part of the
bundle (``manifest.input.tiling``).

Stitching is a weighted mean: inside a tile's map the cells the network did not see (the padding
band of an unpadded PDN) weigh ``MARGIN_WEIGHT``, the rest 1, so wherever tiles overlap the map comes
from a tile that saw the place, and a constant map stitches to the same constant. The image score is
the maximum of the tile scores.

>>> t = Tiling(tile=256, overlap=64)
>>> [(y, x) for y, x, _, _ in t.layout(640, 640)][:4]
[(0, 0), (0, 192), (0, 384), (192, 0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .errors import ConfigError, InputError, message

__all__ = ["Tiling", "axis_starts", "MARGIN_WEIGHT"]

MARGIN_WEIGHT = 1e-3
MIN_TILE = 32


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis: the fewest tiles of ``tile`` pixels that overlap by at
    least ``overlap``, spread evenly from 0 to ``length - tile``; one tile when the axis fits in one.

    >>> axis_starts(640, 256, 64), axis_starts(200, 256, 64), axis_starts(256, 256, 64)
    ([0, 192, 384], [0], [0])
    """
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``tile`` frame pixels overlapping by at least ``overlap`` pixels."""

    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        for name, value in (("tile", self.tile), ("overlap", self.overlap)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(message(f"tiling {name}", repr(value), "an integer", "e.g. Tiling(tile=256, overlap=64)"))
        if self.tile < MIN_TILE:
            raise ConfigError(message("tiling tile", self.tile, f"at least {MIN_TILE} frame pixels", "use the model size (e.g. 256) for full resolution"))
        if not 0 <= self.overlap <= self.tile // 2:
            raise ConfigError(message("tiling overlap", self.overlap, f"0 <= overlap <= tile/2 ({self.tile // 2})", "use a quarter of the tile, e.g. 64 for 256"))

    def layout(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Tiles of a ``height`` x ``width`` frame as (y0, x0, tile_h, tile_w), row by row."""
        if height < 1 or width < 1:
            raise InputError(message("frame size for tiling", (height, width), "a non-empty frame", "check the camera or file delivered pixels"))
        th, tw = min(self.tile, height), min(self.tile, width)
        return [(y, x, th, tw) for y in axis_starts(height, self.tile, self.overlap) for x in axis_starts(width, self.tile, self.overlap)]

    def cut(self, frame: np.ndarray) -> list[np.ndarray]:
        """The tiles of ``frame`` (C-contiguous copies), in :meth:`layout` order."""
        return [np.ascontiguousarray(frame[y : y + h, x : x + w]) for y, x, h, w in self.layout(frame.shape[0], frame.shape[1])]

    def stitch(self, maps: np.ndarray, height: int, width: int, pad: int) -> np.ndarray:
        """Stitch (T, s, s) tile maps at model resolution into one (height, width) float32 frame map.

        ``pad`` is the number of border cells of each map that the network did not see (the PDN padding);
        they weigh :data:`MARGIN_WEIGHT` so that an overlapping tile's seen cells decide there.
        """
        layout = self.layout(height, width)
        if maps.ndim != 3 or maps.shape[0] != len(layout):
            raise InputError(message("tile maps", maps.shape, f"({len(layout)}, s, s) for a {height}x{width} frame", "pass one map per tile of Tiling.layout"))
        s = maps.shape[1]
        weight = np.full((s, s), MARGIN_WEIGHT, np.float32)
        weight[pad : s - pad, pad : s - pad] = 1.0
        acc = np.zeros((height, width), np.float64)
        total = np.zeros((height, width), np.float64)
        for m, (y, x, h, w) in zip(maps, layout, strict=True):
            wt = cv2.resize(weight, (w, h), interpolation=cv2.INTER_LINEAR)
            acc[y : y + h, x : x + w] += cv2.resize(np.ascontiguousarray(m, np.float32), (w, h), interpolation=cv2.INTER_LINEAR) * wt
            total[y : y + h, x : x + w] += wt
        return (acc / total).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"tile": int(self.tile), "overlap": int(self.overlap)}

    @classmethod
    def from_dict(cls, d: object) -> Tiling:
        if not isinstance(d, dict) or set(d) != {"tile", "overlap"}:
            raise ConfigError(message("tiling", repr(d), "{'tile': int, 'overlap': int}", "re-export the bundle"))
        return cls(d["tile"], d["overlap"])
