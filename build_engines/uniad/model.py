"""UniAD ("A Unified Model for Multi-class Anomaly Detection", You et al., NeurIPS 2022), written to export.

A frozen ImageNet backbone gives a feature grid (``backbones.StageGrid``: several stages resized to one grid and
concatenated); a transformer reconstructs it and the anomaly map is the per-token L2 distance between the
reconstruction and the features. What makes it one model for many products, as the paper:

* the encoder and both decoder attentions are *neighbour-masked*: a token may not attend to its own k x k
  neighbourhood, so it cannot copy itself through ("identical shortcut");
* the decoder's queries are learned per layer (an embedding of the token grid for each layer);
* in training the input features are jittered (Gaussian noise scaled by each token's norm / C).

Unlike the reference code, the neighbour mask is not built in Python per forward pass: it is a constant additive
bias (0 / -inf) registered as a buffer of the token grid, so the ONNX graph has no data-dependent control flow.
Attention is written with plain matmul/softmax (exports to MatMul/Softmax, which TensorRT parses).

>>> m = UniAD(in_channels=32, grid=(4, 4), hidden=16, heads=2, layers=(1, 1), ffn=32, neighbourhood=3).eval()
>>> m(torch.randn(2, 32, 4, 4)).shape
torch.Size([2, 32, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError, message

# a finite "minus infinity": exp(-1e4) is 0 in fp32 and fp16 alike, and it survives graph simplifiers and FP16
# engines (onnxsim folded the -inf constants of the mask into wrong values: 0.2 relative error after simplification)
MASKED = -1.0e4

__all__ = ["MASKED", "neighbour_mask", "sine_position_embedding", "feature_jitter", "UniAD", "anomaly_map", "image_score"]


def neighbour_mask(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Additive attention bias (T, T), T = h*w: ``MASKED`` where the key lies in the query's ``size`` x ``size``
    neighbourhood (the token itself included), 0 elsewhere.

    >>> bool((neighbour_mask((3, 3), 3)[4] == MASKED).all())  # the centre token sees nothing in a 3x3 grid
    True
    """
    h, w = grid
    if size < 1 or size % 2 == 0:
        raise ConfigError(message("neighbourhood", size, "an odd size >= 1", "use 7 (the paper's 7x7)"))
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = ((ys[:, None] - ys[None, :]).abs() <= size // 2) & ((xs[:, None] - xs[None, :]).abs() <= size // 2)
    return torch.zeros(h * w, h * w).masked_fill(near, MASKED)


def sine_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine/cosine position embedding (T, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ConfigError(message("hidden dimension", dim, "a multiple of 4 (sine embedding of rows and columns)", "use 256"))
    h, w = grid
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half) // 2) / half)
    ys = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w).reshape(-1, 1) / freq
    xs = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w).reshape(-1, 1) / freq

    def interleave(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([v[:, 0::2].sin(), v[:, 1::2].cos()], dim=2).flatten(1)

    return torch.cat([interleave(ys), interleave(xs)], dim=1)


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, C) tokens plus Gaussian noise of std ``scale`` x ||token|| / C, with probability ``prob`` per batch."""
    if prob <= 0 or torch.rand((), generator=generator).item() > prob:
        return tokens
    norms = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
    noise = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype).to(tokens.device)
    return tokens + noise * norms * scale


class Attention(nn.Module):
    """Multi-head attention with an optional additive bias (the neighbour mask), written to export."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(message("heads", heads, f"a divisor of the hidden dimension {dim}", "use 8 heads for 256"))
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, d = query.shape
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, h, d // h).transpose(1, 2)  # (B, heads, T, d/h)

        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        att = (q @ k.transpose(-1, -2)) * self.scale
        if bias is not None:
            att = att + bias
        att = self.drop(att.softmax(dim=-1))
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x, bias)))
        return self.norm2(x + self.drop2(self.ff(x)))


class DecoderLayer(nn.Module):
    """A learned query per token; it attends to the encoder memory, then to the previous layer's output."""

    def __init__(self, tokens: int, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(tokens, dim))
        nn.init.normal_(self.query)
        self.attn_memory = Attention(dim, heads, dropout)
        self.attn_previous = Attention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self.query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        q = self.norm1(q + self.drop1(self.attn_memory(q + pos, memory + pos, memory, bias)))
        q = self.norm2(q + self.drop2(self.attn_previous(q + pos, previous + pos, previous, bias)))
        return self.norm3(q + self.drop3(self.ff(q)))


class UniAD(nn.Module):
    """Feature reconstruction transformer on a (C, h, w) feature grid: ``forward(features) -> reconstruction``.

    Reference sizes: hidden 256, 8 heads, 4 + 4 layers, FFN 1024, dropout 0.1, 7x7 neighbourhood masked in
    the encoder and both decoder attentions, jitter scale 20 with probability 1.
    """

    def __init__(
        self,
        in_channels: int,
        grid: tuple[int, int],
        *,
        hidden: int = 256,
        heads: int = 8,
        layers: tuple[int, int] = (4, 4),
        ffn: int = 1024,
        dropout: float = 0.1,
        neighbourhood: int = 7,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.grid = int(in_channels), (int(grid[0]), int(grid[1]))
        self.jitter_scale, self.jitter_prob = float(jitter_scale), float(jitter_prob)
        tokens = self.grid[0] * self.grid[1]
        self.input_proj = nn.Linear(in_channels, hidden)
        self.output_proj = nn.Linear(hidden, in_channels)
        self.encoder = nn.ModuleList(EncoderLayer(hidden, heads, ffn, dropout) for _ in range(layers[0]))
        self.decoder = nn.ModuleList(DecoderLayer(tokens, hidden, heads, ffn, dropout) for _ in range(layers[1]))
        self.final_norm = nn.LayerNorm(hidden)
        self.register_buffer("pos", sine_position_embedding(self.grid, hidden), persistent=False)
        # constant: part of the graph as an initializer, never a Python loop at run time
        self.register_buffer("mask", neighbour_mask(self.grid, neighbourhood) if neighbourhood else torch.zeros(tokens, tokens))
        for p in self.parameters():  # the reference initialises every matrix (queries included) this way
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = features.shape
        if (c, (h, w)) != (self.in_channels, self.grid):
            raise ConfigError(message("UniAD input", tuple(features.shape), f"(N, {self.in_channels}, {self.grid[0]}, {self.grid[1]})", "use the backbone grid the model was built for"))
        tokens = features.flatten(2).transpose(1, 2)  # (B, T, C)
        if self.training and self.jitter_prob > 0:
            tokens = feature_jitter(tokens, self.jitter_scale, self.jitter_prob, generator)
        x = self.input_proj(tokens)
        pos = self.pos.unsqueeze(0)
        mask = self.mask
        for layer in self.encoder:
            x = layer(x, pos, mask)
        memory, out = x, x
        for layer in self.decoder:
            out = layer(out, memory, pos, mask)
        out = self.output_proj(self.final_norm(out))
        return out.transpose(1, 2).reshape(b, c, h, w)


def anomaly_map(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w): L2 distance between the features and their reconstruction, per token."""
    return ((reconstruction - features) ** 2).sum(dim=1, keepdim=True).sqrt()


def image_score(amap: torch.Tensor, image_size: int, pool: int = 16) -> torch.Tensor:
    """(N,): the reference protocol, max of the ``pool`` x ``pool`` average-pooled map upsampled to the image."""
    up = F.interpolate(amap, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return F.avg_pool2d(up, pool, stride=1).amax(dim=(1, 2, 3)) if pool > 1 else up.amax(dim=(1, 2, 3))


def flops_per_image(model: UniAD) -> int:
    """Multiply-add FLOPs (x2) of the transformer on one feature grid (linear layers and attention matmuls)."""
    t = model.grid[0] * model.grid[1]
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features * t
    d = model.input_proj.out_features
    n_att = len(model.encoder) + 2 * len(model.decoder)
    total += n_att * 2 * (2 * t * t * d)
    return int(total)

