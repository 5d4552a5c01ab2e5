"""The whole X-Decoder: image encoder (FocalNet + pixel decoder), language encoder and decoder.

Module names follow the official checkpoints (`backbone`, `sem_seg_head.pixel_decoder`,
`sem_seg_head.predictor`, `sem_seg_head.predictor.lang_encoder`), so `state_dict()` keys and shapes equal
the official ones except two derived entries we do not keep (`criterion.empty_weight`, a loss weight,
and `sem_seg_head.predictor.self_attn_mask`, a constant mask we build on the fly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbone import FocalNet
from .captioning import caption_support
from .config import XDecoderConfig
from .language import LanguageEncoder
from .pixel_decoder import PixelDecoder, PixelDecoderOutput
from .transformer_decoder import DecoderOutput, GroundingTokens, XDecoderTransformer

# Checkpoint entries that are not model state: the official loss weights and a constant buffer.
IGNORED_CHECKPOINT_KEYS = frozenset({"criterion.empty_weight", "sem_seg_head.predictor.self_attn_mask"})


@dataclass
class ImageBatch:
    """Normalised images padded to a common size divisible by 32: `pixels` [B, 3, Hp, Wp] and each
    image's valid (unpadded) size."""

    pixels: Tensor
    sizes: list[tuple[int, int]]


@dataclass
class ImageFeatures:
    backbone: dict[str, Tensor]
    pixel: PixelDecoderOutput


class SegmentationHead(nn.Module):
    """Container that gives the checkpoint its `sem_seg_head.` prefix."""

    def __init__(self, pixel_decoder: PixelDecoder, predictor: XDecoderTransformer):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


class XDecoderModel(nn.Module):
    def __init__(self, config: XDecoderConfig):
        super().__init__()
        self.config = config
        # Image-text retrieval: the pooled stride-32 backbone features [backbone_dim] into the joint space [D].
        self.backbone_proj = nn.Parameter(torch.zeros(config.backbone_dim, config.dim_proj))
        self.backbone = FocalNet(config.backbone)
        language = LanguageEncoder(config.text, config.dim_proj)
        pixel_decoder = PixelDecoder(
            self.backbone.out_channels,
            config.pixel_decoder,
            num_heads=config.decoder.nheads,
            dim_feedforward=config.decoder.dim_feedforward,
        )
        predictor = XDecoderTransformer(
            config.decoder,
            in_channels=config.pixel_decoder.conv_dim,
            mask_dim=config.pixel_decoder.mask_dim,
            dim_proj=config.dim_proj,
            language_encoder=language,
        )
        self.sem_seg_head = SegmentationHead(pixel_decoder, predictor)
        self.reset_constants()

    def reset_constants(self) -> None:
        """(Re)create the tensors that are not in checkpoints (needed after loading into a meta model)."""
        device = "cpu" if self.backbone_proj.is_meta else self.backbone_proj.device
        mean = torch.tensor(self.config.pixel_mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.config.pixel_std, device=device).view(3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    # Readable names for the parts (the attribute names above are fixed by the checkpoint format).
    @property
    def pixel_decoder(self) -> PixelDecoder:
        return self.sem_seg_head.pixel_decoder

    @property
    def decoder(self) -> XDecoderTransformer:
        return self.sem_seg_head.predictor

    @property
    def language(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    @property
    def num_queries(self) -> int:
        return self.config.decoder.num_queries

    @property
    def caption_support(self) -> str | None:
        """Why this model cannot caption as the official code does, or None when it can."""
        return caption_support(self.config)

    @property
    def can_caption(self) -> bool:
        """The model has the captioning weights and a shape the official captioning supports."""
        return self.caption_support is None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def prepare_images(self, images: list[Tensor]) -> ImageBatch:
        """RGB images [3, h_i, w_i] in 0..255 (any dtype) -> normalised, zero-padded batch."""
        divisor = self.config.size_divisibility
        sizes = [tuple(img.shape[-2:]) for img in images]
        height = -(-max(h for h, _ in sizes) // divisor) * divisor
        width = -(-max(w for _, w in sizes) // divisor) * divisor
        dtype = self.pixel_mean.dtype
        pixels = torch.zeros(len(images), 3, height, width, device=self.device, dtype=dtype)
        for i, img in enumerate(images):
            h, w = sizes[i]
            pixels[i, :, :h, :w] = (img.to(self.device, dtype) - self.pixel_mean) / self.pixel_std
        return ImageBatch(pixels, sizes)

    def encode_image(self, pixels: Tensor) -> ImageFeatures:
        """The expensive part, run once per image whatever is asked of it. pixels [B, 3, Hp, Wp]."""
        features = self.backbone(pixels)
        return ImageFeatures(features, self.pixel_decoder(features))

    def decode(
        self,
        features: ImageFeatures,
        class_embeddings: Tensor | None,
        grounding: GroundingTokens | None = None,
        all_layer_masks: bool = False,
        caption_context: bool = False,
    ) -> DecoderOutput:
        pixel = features.pixel
        return self.decoder(
            pixel.multi_scale, pixel.mask_features, class_embeddings, grounding, all_layer_masks, caption_context
        )

    def backbone_embedding(self, features: ImageFeatures) -> Tensor:
        """The retrieval ensemble's image embedding [B, D]: the stride-32 backbone map averaged over all its
        positions (padding included, as officially), @ backbone_proj; not normalised."""
        return features.backbone["res5"].float().mean(dim=(2, 3)) @ self.backbone_proj.float()

    def decoder_embedding(self, output: DecoderOutput) -> Tensor:
        """The image's decoder embedding [B, D]: the final re-pooled class query @ class_embed; not normalised."""
        return output.final.captions[:, output.num_queries - 1]

    def forward(
        self,
        pixels: Tensor,
        class_embeddings: Tensor | None,
        grounding: GroundingTokens | None = None,
        all_layer_masks: bool = False,
    ) -> DecoderOutput:
        return self.decode(self.encode_image(pixels), class_embeddings, grounding, all_layer_masks)


def build_model(config: XDecoderConfig) -> XDecoderModel:
    """A randomly initialised model (build under `torch.device("meta")` to get shapes without memory)."""
    return XDecoderModel(config)
