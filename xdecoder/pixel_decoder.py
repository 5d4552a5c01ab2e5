"""Pixel decoder (`transformer_encoder_fpn`): a transformer encoder over the stride-32 features, then an
FPN top-down path to stride 4.

Backbone features {"res2".."res5"} -> PixelDecoderOutput:
  mask_features  [B, mask_dim, H/4, W/4]  (dotted with query embeddings to give mask logits)
  encoder_output [B, conv_dim, H/32, W/32] (transformer encoder output, before `layer_4`)
  multi_scale    3 maps at strides 32, 16, 8, each [B, conv_dim, h, w] (the decoder's memory)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .config import PixelDecoderConfig
from .layers import Attention, ConvNorm, add_upsampled, sine_position_embedding


@dataclass
class PixelDecoderOutput:
    mask_features: Tensor
    encoder_output: Tensor
    multi_scale: list[Tensor]


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (self-attention, ReLU FFN)."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x, pos [B, L, C] -> [B, L, C]."""
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, dim_feedforward) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, h, w] -> [B, C, h, w], every position attending to every other (padding included,
        as in the official code)."""
        batch, channels, height, width = x.shape
        pos = sine_position_embedding(height, width, channels // 2, x.device).to(x.dtype)
        tokens = x.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens, pos)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class TransformerEncoderHolder(nn.Module):
    """Exists only so the checkpoint keys read `transformer.encoder.layers.N`."""

    def __init__(self, encoder: TransformerEncoder):
        super().__init__()
        self.encoder = encoder


class PixelDecoder(nn.Module):
    def __init__(
        self,
        in_channels: tuple[int, int, int, int],
        config: PixelDecoderConfig,
        num_heads: int,
        dim_feedforward: int,
    ):
        super().__init__()
        conv_dim = config.conv_dim
        # Lateral 1x1 "adapters" and 3x3 output "layers" for res2..res4, named as in the checkpoints.
        for level, channels in enumerate(in_channels[:3], start=1):
            self.add_module(f"adapter_{level}", ConvNorm(channels, conv_dim, 1, relu=False))
            self.add_module(f"layer_{level}", ConvNorm(conv_dim, conv_dim, 3, relu=True))
        self.mask_features = nn.Conv2d(conv_dim, config.mask_dim, 3, padding=1)
        self.input_proj = nn.Conv2d(in_channels[3], conv_dim, 1)
        self.transformer = TransformerEncoderHolder(
            TransformerEncoder(conv_dim, num_heads, dim_feedforward, config.transformer_layers)
        )
        self.layer_4 = ConvNorm(conv_dim, conv_dim, 3, relu=True)

    def forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        encoder_output = self.transformer.encoder(self.input_proj(features["res5"]))
        y = self.layer_4(encoder_output)
        multi_scale = [y]
        for level, name in ((3, "res4"), (2, "res3"), (1, "res2")):
            lateral = getattr(self, f"adapter_{level}")(features[name])
            y = getattr(self, f"layer_{level}")(add_upsampled(lateral, y))
            if len(multi_scale) < 3:
                multi_scale.append(y)
        return PixelDecoderOutput(self.mask_features(y), encoder_output, multi_scale)
