"""PatchCore ("Towards Total Recall in Industrial Anomaly Detection", Roth et al., CVPR 2022) on the shared feature grid,
written to export: no training, a memory bank of normal features.

The frozen backbone's feature grid (``backbones.StageGrid``, UniAD's input: Lite0 stages 2-5 at stride 16, chosen by
the probe, docs/results.md section 9) is standardised per channel with the statistics of the training goods; the
bank is a greedy coreset of the training goods' grid features. The anomaly map is each grid feature's Euclidean
distance to its nearest bank feature (the feature-distance families' map: a feature against its reconstruction,
here the nearest normal feature); the image score is the map's maximum. Differences from the paper: the grid is
UniAD's multi-stage grid, its neighbourhood aggregation (a k x k local mean of the grid, ``LocalGrid``) is optional
(``--aggregate``, off by default: measured in docs/results.md section 11), and the score is not re-weighted by the
density of the nearest bank feature's neighbours.

In the graph the distance is one GEMM against the bank (``|f|^2 - 2 f.b + |b|^2``, then ReduceMin): the bank and
its squared norms are constant initializers, so ONNX Runtime and TensorRT run it as a MatMul.

>>> from build_engines.backbones import StageGrid, load_backbone
>>> grid = StageGrid(load_backbone("efficientnet-lite0"), (2, 3, 4, 5), 16)
>>> g = PatchCoreGraph(grid, torch.zeros(256), torch.ones(256), torch.zeros(4, 256)).eval()
>>> [tuple(t.shape) for t in g(torch.zeros(2, 3, 64, 64))]
[(2, 1, 4, 4), (2,)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError, message

from ..backbones import StageGrid

__all__ = ["LocalGrid", "PatchCoreGraph", "check_aggregate"]


def check_aggregate(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ConfigError(message("--aggregate", k, "an odd neighbourhood size >= 1", "use 1 (none) or 3 (PatchCore's)"))
    return k


class LocalGrid(nn.Module):
    """The backbone grid, each cell optionally averaged with its ``aggregate`` x ``aggregate`` neighbourhood (PatchCore's
    local neighbourhood aggregation; 1 = none). Same shape and channels as the grid.

    >>> from build_engines.backbones import StageGrid, load_backbone
    >>> LocalGrid(StageGrid(load_backbone("efficientnet-lite0"), (2, 3, 4, 5), 16), 3)(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 256, 4, 4])
    """

    def __init__(self, grid: StageGrid, aggregate: int = 1) -> None:
        super().__init__()
        check_aggregate(aggregate)
        self.grid, self.aggregate, self.channels = grid.eval(), int(aggregate), grid.channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.grid(image)
        k = self.aggregate
        return F.avg_pool2d(f, k, 1, k // 2, count_include_pad=False) if k > 1 else f


class PatchCoreGraph(nn.Module):
    """image (N,3,S,S) ImageNet-normalised -> (anomaly_map (N,1,h,w), score (N,)): what the bundle's ONNX computes.

    ``mean``/``std`` (C,): per-channel statistics of the training goods' features; ``bank`` (B, C): standardised
    normal features.
    """

    def __init__(self, grid: StageGrid | LocalGrid, mean: torch.Tensor, std: torch.Tensor, bank: torch.Tensor) -> None:
        super().__init__()
        c = grid.channels
        if mean.shape != (c,) or std.shape != (c,) or bank.ndim != 2 or bank.shape[1] != c or bank.shape[0] < 1:
            raise ConfigError(message("PatchCore memory bank", f"mean {tuple(mean.shape)}, std {tuple(std.shape)}, bank {tuple(bank.shape)}",
                                      f"mean and std ({c},), bank (B, {c}) with B >= 1", "rebuild the run with this backbone and stages"))
        if not bool((std > 0).all()):
            raise ConfigError(message("PatchCore feature std", "a zero or negative channel std", "std > 0 in every channel", "rebuild the run"))
        self.grid = grid.eval()
        self.register_buffer("mean", mean.float().reshape(1, c, 1, 1))
        self.register_buffer("inv_std", (1.0 / std.float()).reshape(1, c, 1, 1))
        self.register_buffer("bank_t", bank.float().t().contiguous())  # (C, B): the GEMM's right-hand side
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1))  # (B,)

    @property
    def bank_size(self) -> int:
        return int(self.bank_t.shape[1])

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw grid features (N, C, h, w) -> standardised with the training goods' statistics."""
        return (raw - self.mean) * self.inv_std

    def distance_map(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w): Euclidean distance of each standardised feature to its nearest bank feature."""
        n, c, h, w = features.shape
        q = features.flatten(2).transpose(1, 2)  # (N, T, C)
        d2 = (q * q).sum(2, keepdim=True) - 2.0 * (q @ self.bank_t) + self.bank_sq  # (N, T, B)
        return d2.amin(2).clamp_min(0.0).sqrt().reshape(n, 1, h, w)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.distance_map(self.standardise(self.grid(image)))
        return amap, amap.amax(dim=(1, 2, 3))
