"""Model configuration: the sizes and switches that decide the architecture and the state-dict shapes.

Three ways to get one:
  * the presets `XDecoderConfig.focalt()` / `XDecoderConfig.focall()` (the official checkpoints),
  * `XDecoderConfig.from_official_yaml(...)` (the official `configs/xdecoder/*.yaml` schema),
  * `XDecoderConfig.from_state_dict(...)` (read the sizes off a checkpoint's tensor shapes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

BackboneVariant = Literal["focal_dw", "focal"]

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class BackboneConfig:
    """FocalNet. `focal_dw` (Focal-T) has depthwise convs around each block and a padding-3 stem;
    `focal` (Focal-L) has neither and normalises the residual branches instead of the sums."""

    variant: BackboneVariant = "focal_dw"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    focal_levels: tuple[int, ...] = (3, 3, 3, 3)
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    mlp_ratio: float = 4.0
    use_postln: bool = True
    use_postln_in_modulation: bool = False
    use_layerscale: bool = True
    scaling_modulator: bool = True
    patch_norm: bool = True

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class PixelDecoderConfig:
    """FPN with a transformer encoder on the stride-32 map (`transformer_encoder_fpn`)."""

    conv_dim: int = 512
    mask_dim: int = 512
    transformer_layers: int = 6


@dataclass(frozen=True)
class DecoderConfig:
    """The X-Decoder transformer decoder. `num_queries` counts the object queries plus the one class query;
    `dec_layers` is the official DEC_LAYERS, of which one is the prediction on the learnable queries, so
    the decoder has `dec_layers - 1` transformer layers. The pixel decoder's encoder shares `nheads` and
    `dim_feedforward` (as in the official code). `captioning`: the checkpoint has the captioning head;
    `captioning_steps`: tokens a caption may have (the official CAPTIONING.STEP)."""

    hidden_dim: int = 512
    num_queries: int = 101
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 10
    enforce_input_proj: bool = False
    captioning: bool = True
    captioning_steps: int = 50


@dataclass(frozen=True)
class TextConfig:
    """CLIP-style causal text transformer."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class XDecoderConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dim_proj: int = 512
    backbone_dim: int = 768
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    size_divisibility: int = 32

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def focalt(cls, num_queries: int = 101) -> XDecoderConfig:
        """Focal-T (`xdecoder_focalt_*.pt`)."""
        return cls(decoder=DecoderConfig(num_queries=num_queries))

    @classmethod
    def focall(cls, num_queries: int = 201) -> XDecoderConfig:
        """Focal-L (`xdecoder_focall_last.pt` has 201 queries, `..._oq101.pt` 101)."""
        return cls(
            backbone=BackboneConfig(variant="focal", embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(4, 4, 4, 4)),
            decoder=DecoderConfig(num_queries=num_queries),
            backbone_dim=1536,
        )

    def with_queries(self, num_queries: int) -> XDecoderConfig:
        return replace(self, decoder=replace(self.decoder, num_queries=num_queries))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> XDecoderConfig:
        """Inverse of `to_dict` (as stored next to our own checkpoints)."""

        def tuples(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            backbone=BackboneConfig(**tuples(data["backbone"])),
            pixel_decoder=PixelDecoderConfig(**data["pixel_decoder"]),
            decoder=DecoderConfig(**data["decoder"]),
            text=TextConfig(**data["text"]),
            **tuples({k: v for k, v in data.items() if k not in ("backbone", "pixel_decoder", "decoder", "text")}),
        )

    # ------------------------------------------------------------------------------ official yaml
    @classmethod
    def from_official_yaml(cls, source: str | Path | Mapping[str, Any]) -> XDecoderConfig:
        """Read the official X-Decoder config schema (a path to a yaml file, or the parsed mapping).

        Only the architecture keys are read; options the official code offers but no released
        X-Decoder checkpoint uses (pre-norm decoder, box head, other pixel decoders) raise ValueError.
        """
        if isinstance(source, Mapping):
            cfg = source
        else:
            with open(source, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
        model = _section(cfg, "MODEL")
        backbone = _section(model, "BACKBONE")
        focal = _section(backbone, "FOCAL")
        encoder = _section(model, "ENCODER")
        decoder = _section(model, "DECODER")
        text = _section(model, "TEXT")

        variant = backbone.get("NAME")
        if variant not in ("focal_dw", "focal"):
            raise ValueError(f"unsupported backbone MODEL.BACKBONE.NAME={variant!r} (expected focal_dw or focal)")
        if encoder.get("NAME", "transformer_encoder_fpn") != "transformer_encoder_fpn":
            raise ValueError(f"unsupported pixel decoder MODEL.ENCODER.NAME={encoder.get('NAME')!r}")
        if encoder.get("NORM", "GN") != "GN":
            raise ValueError(f"unsupported MODEL.ENCODER.NORM={encoder.get('NORM')!r} (only GN)")
        if decoder.get("NAME", "xdecoder") != "xdecoder":
            raise ValueError(f"unsupported decoder MODEL.DECODER.NAME={decoder.get('NAME')!r}")
        if decoder.get("PRE_NORM", False):
            raise ValueError("MODEL.DECODER.PRE_NORM=true is not supported (no released checkpoint uses it)")
        if decoder.get("DETECTION", False):
            raise ValueError("MODEL.DECODER.DETECTION=true (box head) is not supported")
        if not decoder.get("MASK", True):
            raise ValueError("MODEL.DECODER.MASK=false is not supported: this package predicts masks")
        if not focal.get("USE_CONV_EMBED", True) or focal.get("PATCH_SIZE", 4) != 4:
            raise ValueError("only the overlapped conv patch embedding (USE_CONV_EMBED, PATCH_SIZE 4) is supported")
        if not text.get("AUTOGRESSIVE", True):
            raise ValueError("MODEL.TEXT.AUTOGRESSIVE=false is not supported (the CLIP encoder is causal)")
        tokenizer = text.get("TOKENIZER", "clip")
        if tokenizer != "clip":
            raise ValueError(f"unsupported MODEL.TEXT.TOKENIZER={tokenizer!r}")

        input_cfg = cfg.get("INPUT", {}) or {}
        return cls(
            backbone=BackboneConfig(
                variant=variant,
                embed_dim=int(focal["EMBED_DIM"]),
                depths=tuple(int(d) for d in focal["DEPTHS"]),
                focal_levels=tuple(int(d) for d in focal["FOCAL_LEVELS"]),
                focal_windows=tuple(int(d) for d in focal["FOCAL_WINDOWS"]),
                mlp_ratio=float(focal.get("MLP_RATIO", 4.0)),
                use_postln=bool(focal.get("USE_POSTLN", False)),
                use_postln_in_modulation=bool(focal.get("USE_POSTLN_IN_MODULATION", False)),
                use_layerscale=bool(focal.get("USE_LAYERSCALE", False)),
                scaling_modulator=bool(focal.get("SCALING_MODULATOR", False)),
                patch_norm=bool(focal.get("PATCH_NORM", True)),
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=int(encoder["CONVS_DIM"]),
                mask_dim=int(encoder["MASK_DIM"]),
                transformer_layers=int(encoder["TRANSFORMER_ENC_LAYERS"]),
            ),
            decoder=DecoderConfig(
                hidden_dim=int(decoder["HIDDEN_DIM"]),
                num_queries=int(decoder["NUM_OBJECT_QUERIES"]),
                nheads=int(decoder["NHEADS"]),
                dim_feedforward=int(decoder["DIM_FEEDFORWARD"]),
                dec_layers=int(decoder["DEC_LAYERS"]),
                enforce_input_proj=bool(decoder.get("ENFORCE_INPUT_PROJ", False)),
                captioning=bool((decoder.get("CAPTIONING") or {}).get("ENABLED", False)),
                captioning_steps=int((decoder.get("CAPTIONING") or {}).get("STEP", 50)),
            ),
            text=TextConfig(
                width=int(text["WIDTH"]),
                layers=int(text["LAYERS"]),
                heads=int(text["HEADS"]),
                context_length=int(text.get("CONTEXT_LENGTH", 77)),
            ),
            dim_proj=int(model["DIM_PROJ"]),
            backbone_dim=int(model.get("BACKBONE_DIM", int(focal["EMBED_DIM"]) * 8)),
            pixel_mean=tuple(float(v) for v in input_cfg.get("PIXEL_MEAN", PIXEL_MEAN)),
            pixel_std=tuple(float(v) for v in input_cfg.get("PIXEL_STD", PIXEL_STD)),
            size_divisibility=int(decoder.get("SIZE_DIVISIBILITY", 32)),
        )

    # ------------------------------------------------------------------------------ from weights
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> XDecoderConfig:
        """Read the architecture off a checkpoint's tensor shapes.

        Head counts and normalisation placement leave no trace in the weights: they are taken from
        the official configs (8 decoder heads, text heads = width / 64, post-LN blocks, scaling
        modulator). Pass an explicit config for models that differ there.
        """
        shapes = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"cannot infer the X-Decoder config: checkpoint has no {key!r}")
            return shapes[key]

        def count(pattern: str) -> int:
            regex = re.compile(pattern)
            return len({m.group(1) for k in shapes if (m := regex.match(k))})

        stem = need("backbone.patch_embed.proj.weight")
        embed_dim = stem[0]
        num_stages = count(r"backbone\.layers\.(\d+)\.")
        depths = tuple(count(rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages))
        focal_levels = tuple(
            count(rf"backbone\.layers\.{i}\.blocks\.0\.modulation\.focal_layers\.(\d+)\.") for i in range(num_stages)
        )
        focal_windows = tuple(
            need(f"backbone.layers.{i}.blocks.0.modulation.focal_layers.0.0.weight")[-1] for i in range(num_stages)
        )
        mlp_hidden = need("backbone.layers.0.blocks.0.mlp.fc1.weight")[0]
        variant: BackboneVariant = "focal_dw" if "backbone.layers.0.blocks.0.dw1.weight" in shapes else "focal"

        query_feat = need("sem_seg_head.predictor.query_feat.weight")
        hidden_dim = query_feat[1]
        text_pos = need("sem_seg_head.predictor.lang_encoder.lang_encoder.positional_embedding")
        text_width = text_pos[1]
        if hidden_dim % 8 or text_width % 64:
            raise ValueError(
                "cannot infer attention head counts for this checkpoint's sizes "
                f"(hidden {hidden_dim}, text width {text_width}); pass an explicit config"
            )
        conv_dim = need("sem_seg_head.pixel_decoder.adapter_1.weight")[0]
        return cls(
            backbone=BackboneConfig(
                variant=variant,
                embed_dim=embed_dim,
                depths=depths,
                focal_levels=focal_levels,
                focal_windows=focal_windows,
                mlp_ratio=mlp_hidden / embed_dim,
                use_postln_in_modulation="backbone.layers.0.blocks.0.modulation.ln.weight" in shapes,
                use_layerscale="backbone.layers.0.blocks.0.gamma_1" in shapes,
                patch_norm="backbone.patch_embed.norm.weight" in shapes,
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=conv_dim,
                mask_dim=need("sem_seg_head.pixel_decoder.mask_features.weight")[0],
                transformer_layers=count(r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
            ),
            decoder=DecoderConfig(
                hidden_dim=hidden_dim,
                num_queries=query_feat[0],
                nheads=8,
                dim_feedforward=need("sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight")[0],
                dec_layers=count(r"sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.") + 1,
                enforce_input_proj=("sem_seg_head.predictor.input_proj.0.weight" in shapes and conv_dim == hidden_dim),
                captioning="sem_seg_head.predictor.caping_embed" in shapes,
            ),
            text=TextConfig(
                width=text_width,
                layers=count(r"sem_seg_head\.predictor\.lang_encoder\.lang_encoder\.resblocks\.(\d+)\."),
                heads=text_width // 64,
                context_length=text_pos[0],
                vocab_size=need("sem_seg_head.predictor.lang_encoder.lang_encoder.token_embedding.weight")[0],
            ),
            dim_proj=need("sem_seg_head.predictor.class_embed")[1],
            backbone_dim=need("backbone_proj")[0],
        )


def _section(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = cfg.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"official config has no {key} section")
    return value
