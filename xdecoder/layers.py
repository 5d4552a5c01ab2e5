"""Small building blocks shared by the model parts.

Attribute names follow the official checkpoints (`in_proj_weight`, `out_proj`, `layers.N`, `norm`), so
state dicts load without renaming.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameter layout, on batch-first tensors.

    `blocked` is a boolean mask broadcastable to [B, heads, Lq, Lk]; True means "may not attend"
    (the convention of the official code). Rows must keep at least one allowed key.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        """query [B, Lq, C], key/value [B, Lk, C] -> [B, Lq, C]. `causal`: position i sees keys <= i."""
        q, k, v = self.project(query, key, value)
        return self.attend(q, k, v, None if blocked is None else ~blocked, causal)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections, split into heads: each [B, heads, L, C / heads]."""
        dim = query.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is not key:
            return self.query_projection(query), *self.project_keys_values(key, value)
        q, k = F.linear(query, w[: 2 * dim], b[: 2 * dim]).chunk(2, dim=-1)
        v = F.linear(value, w[2 * dim :], b[2 * dim :])
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def project_keys_values(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Key and value projections alone (keys that many queries reuse): each [B, heads, L, C / heads]."""
        dim = key.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        k = F.linear(key, w[dim : 2 * dim], b[dim : 2 * dim])
        v = F.linear(value, w[2 * dim :], b[2 * dim :])
        return self._split_heads(k), self._split_heads(v)

    def query_projection(self, query: Tensor) -> Tensor:
        """[B, L, C] -> [B, heads, L, C / heads]."""
        dim = query.shape[-1]
        return self._split_heads(F.linear(query, self.in_proj_weight[:dim], self.in_proj_bias[:dim]))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, causal: bool = False) -> Tensor:
        """Scaled dot-product attention of projected heads, then the output projection -> [B, Lq, C]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


class MLP(nn.Module):
    """Linear layers with ReLU between them (`layers.0`, `layers.1`, ...)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ConvNorm(nn.Conv2d):
    """Conv2d followed by GroupNorm(32) and an optional ReLU; the norm is a child named `norm`, so the
    keys are `<name>.weight` and `<name>.norm.weight`, as in the official checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size == (1, 1):
            # A 1x1 conv is a per-pixel matmul; as one it runs several times faster on channels_last input.
            weight = self.weight.view(self.out_channels, self.in_channels)
            x = F.linear(x.permute(0, 2, 3, 1), weight).permute(0, 3, 1, 2)
        else:
            x = super().forward(x)
        x = self.norm(x)
        return F.relu(x, inplace=True) if self.relu else x


def add_upsampled(target: Tensor, source: Tensor) -> Tensor:
    """target + nearest-upsampled source ([B, C, H, W] + [B, C, h, w]), written into `target`.

    The usual FPN step. For an exact 2x step on channels_last tensors the upsampling is a broadcast,
    so the upsampled map is never materialised (same values as F.interpolate(mode="nearest"))."""
    (height, width), (h, w) = target.shape[-2:], source.shape[-2:]
    channels_last = target.is_contiguous(memory_format=torch.channels_last) and source.is_contiguous(
        memory_format=torch.channels_last
    )
    if (height, width) == (2 * h, 2 * w) and channels_last:
        batch, channels = target.shape[:2]
        grid = target.permute(0, 2, 3, 1).view(batch, h, 2, w, 2, channels)
        grid.add_(source.permute(0, 2, 3, 1).reshape(batch, h, 1, w, 1, channels))
        return target
    return target.add_(F.interpolate(source, size=(height, width), mode="nearest"))


def sine_position_embedding(height: int, width: int, num_feats: int, device: torch.device) -> Tensor:
    """DETR's normalised sine embedding of a [height, width] grid -> [1, 2 * num_feats, height, width].

    The first `num_feats` channels encode y, the rest x; within each, sin and cos alternate.
    """
    return _sine_position_embedding(height, width, num_feats, str(device))


@lru_cache(maxsize=32)
def _sine_position_embedding(height: int, width: int, num_feats: int, device: str) -> Tensor:
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)

    def encode(positions: Tensor) -> Tensor:  # [n] -> [n, num_feats]
        angles = positions[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0).contiguous()
