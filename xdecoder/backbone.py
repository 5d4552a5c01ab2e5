"""FocalNet image encoder, in the two flavours X-Decoder ships.

`focal_dw` (Focal-T): each block adds depthwise 3x3 convs (`dw1`, `dw2`) before the modulation and the
MLP, and normalises after each residual sum (post-LN). Stem: conv 7x7 stride 4 padding 3.
`focal` (Focal-L): no depthwise convs; post-LN normalises the branch before it is added. Stem padding 2.

Input [B, 3, H, W] (normalised, H and W multiples of 32) -> {"res2": [B, C, H/4, W/4], ...,
"res5": [B, 8C, H/32, W/32]}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BackboneConfig


class FocalModulation(nn.Module):
    """Gathers context with depthwise convs of growing kernels plus a global average, gates each level,
    and modulates a query projection with the sum."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, scaling: bool, postln: bool):
        super().__init__()
        self.focal_level = focal_level
        self.scaling = scaling
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim) if postln else None
        self.focal_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False),
                nn.GELU(),
            )
            for kernel in (focal_window + 2 * level for level in range(focal_level))
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        channels = x.shape[1]
        q, ctx, gates = torch.split(_per_pixel(self.f, x), (channels, channels, self.focal_level + 1), dim=1)
        ctx_all = 0
        for level, focal_layer in enumerate(self.focal_layers):
            ctx = focal_layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = F.gelu(ctx.mean(dim=(2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level :]
        if self.scaling:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = q * self.h(ctx_all)
        if self.ln is not None:
            out = _per_pixel(self.ln, out)
        return _per_pixel(self.proj, out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W] (applied per pixel)."""
        return _per_pixel(lambda t: self.fc2(F.gelu(self.fc1(t))), x)


class FocalBlock(nn.Module):
    """Modulation then MLP, each a residual branch with layer scale. Where the LayerNorm sits depends
    on the variant: pre-LN normalises the branch input; post-LN normalises the sum in `focal_dw` and
    the branch output in `focal` (each as the official code does)."""

    def __init__(self, dim: int, config: BackboneConfig, stage: int):
        super().__init__()
        self.depthwise = config.variant == "focal_dw"
        self.postln = config.use_postln
        if config.use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-4))
            self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-4))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if self.depthwise else None
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim,
            config.focal_levels[stage],
            config.focal_windows[stage],
            config.scaling_modulator,
            config.use_postln_in_modulation,
        )
        self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if self.depthwise else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        if self.dw1 is not None:
            x = x + self.dw1(x)
        x = self._residual(x, self.modulation, self.norm1, self.gamma_1)
        if self.dw2 is not None:
            x = x + self.dw2(x)
        return self._residual(x, self.mlp, self.norm2, self.gamma_2)

    def _residual(self, x: Tensor, branch: nn.Module, norm: nn.LayerNorm, gamma: Tensor | None) -> Tensor:
        scale = (lambda t: t) if gamma is None else (lambda t: t * gamma[:, None, None])
        if not self.postln:
            return x + scale(branch(_per_pixel(norm, x)))
        if self.depthwise:
            return _per_pixel(norm, x + scale(branch(x)))
        return x + scale(_per_pixel(norm, branch(x)))


class PatchEmbed(nn.Module):
    """Overlapping conv embedding followed by LayerNorm: the stem (7x7, stride 4) or a stage
    downsampler (3x3, stride 2, doubling the channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, norm: bool):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(out_channels) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.stride or width % self.stride:
            x = F.pad(x, (0, -width % self.stride, 0, -height % self.stride))
        x = self.proj(x)
        return x if self.norm is None else _per_pixel(self.norm, x)


class FocalStage(nn.Module):
    def __init__(self, dim: int, config: BackboneConfig, stage: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(FocalBlock(dim, config, stage) for _ in range(config.depths[stage]))
        self.downsample = PatchEmbed(dim, 2 * dim, 3, 2, 1, config.patch_norm) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class FocalNet(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        stem_padding = 3 if config.variant == "focal_dw" else 2
        dims = config.stage_dims
        self.patch_embed = PatchEmbed(3, config.embed_dim, 7, 4, stem_padding, config.patch_norm)
        self.layers = nn.ModuleList(
            FocalStage(dim, config, stage, downsample=stage < len(dims) - 1) for stage, dim in enumerate(dims)
        )
        for stage, dim in enumerate(dims):
            self.add_module(f"norm{stage}", nn.LayerNorm(dim))
        self.out_channels = dims

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [B, 3, H, W] -> {"res2": [B, C, H/4, W/4], "res3": ..., "res5": [B, 8C, H/32, W/32]}."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        outputs = {}
        for stage, layer in enumerate(self.layers):
            x = layer(x)
            outputs[f"res{stage + 2}"] = _per_pixel(getattr(self, f"norm{stage}"), x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outputs


def _per_pixel(module, x: Tensor) -> Tensor:
    """Apply a last-dimension module (Linear, LayerNorm) to every pixel of [B, C, H, W].

    Tensors here are kept in channels_last memory, so both permutes are free views.
    """
    return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
