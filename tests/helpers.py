"""Tiny random X-Decoder models built with our own code: every test but the parity ones uses these."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from xdecoder import XDecoderConfig, XDecoderModel, build_model, save_checkpoint
from xdecoder.config import BackboneConfig, DecoderConfig, PixelDecoderConfig, TextConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY_FIXTURES = SHARED / "fixtures" / "xdecoder_parity"
REFERENCE = SHARED / "reference"


# The official captioning needs as many queries as the text context (77): a captioning tiny model has 80.
CAPTIONING_QUERIES = 80


def tiny_config(variant: str = "focal_dw", num_queries: int | None = None, captioning: bool = False) -> XDecoderConfig:
    """Small enough to run in milliseconds; head counts are the ones `from_state_dict` infers. 11 queries, or with
    `captioning` 80 (a model that can caption: text width = projection = decoder width, queries >= 77)."""
    num_queries = num_queries or (CAPTIONING_QUERIES if captioning else 11)
    return XDecoderConfig(
        backbone=BackboneConfig(
            variant=variant, embed_dim=16, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3)
        ),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, transformer_layers=1),
        decoder=DecoderConfig(hidden_dim=64, num_queries=num_queries, nheads=8, dim_feedforward=128, dec_layers=4),
        text=TextConfig(width=64, layers=2, heads=1),
        dim_proj=64,
        backbone_dim=128,
    )


def tiny_model(
    seed: int = 0, variant: str = "focal_dw", num_queries: int | None = None, captioning: bool = False
) -> XDecoderModel:
    """Seeded random weights, with a temperature high enough that class scores are decisive."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(variant, num_queries, captioning))
    with torch.no_grad():
        model.language.logit_scale.fill_(math.log(60.0))
        for name, param in model.named_parameters():
            if name.endswith("gamma_1") or name.endswith("gamma_2"):
                param.fill_(0.5)
        # build_model leaves the retrieval projection and the captioning head at zero (official checkpoints replace
        # them); random values make rankings and captions depend on the image. Own generator: the global seed's
        # stream, which other tests rely on, stays as it was.
        generator = torch.Generator().manual_seed(seed)
        model.backbone_proj.normal_(std=0.5, generator=generator)
        if model.config.decoder.captioning:
            model.decoder.caping_embed.normal_(std=0.5, generator=generator)
    return model.eval()


def official_state_dict(model: XDecoderModel) -> dict[str, torch.Tensor]:
    """The model's weights as the official code saves them (with its two extra entries)."""
    state = dict(model.state_dict())
    queries = model.config.decoder.num_queries
    context = model.config.text.context_length
    state["sem_seg_head.predictor.self_attn_mask"] = torch.zeros(1, queries + context, queries + context).bool()
    state["criterion.empty_weight"] = torch.ones(134)
    return state


def write_tiny_checkpoint(path: Path, seed: int = 0, fmt: str = "pt", captioning: bool = False) -> Path:
    """An official-format `.pt` (plain state dict) or our `.safetensors` (config in the header)."""
    model = tiny_model(seed, captioning=captioning)
    if fmt == "safetensors":
        return save_checkpoint(model, path)
    torch.save(official_state_dict(model), path)
    return path


def backend_settings(checkpoint, model_dir, label_studio_url: str, **environment):
    """Backend settings on the CPU for a random model: thresholds at 0 so that it still returns regions, the stand-in
    Label Studio's token. `environment`: more settings by their variable names (REDIS_URL, XDECODER_SHORT_SIDE, ...)."""
    from backend.settings import Settings
    from tests.standin_ls import TOKEN

    return Settings(
        XDECODER_CHECKPOINT=str(checkpoint),
        XDECODER_DEVICE="cpu",
        XDECODER_OBJECT_MASK_THRESHOLD=0.0,
        XDECODER_OVERLAP_THRESHOLD=0.0,
        MODEL_DIR=str(model_dir),
        LABEL_STUDIO_URL=label_studio_url,
        LABEL_STUDIO_API_KEY=TOKEN,
        **environment,
    )


def subprocess_env(settings, **extra: str) -> dict[str, str]:
    """This process's environment with `settings` in it and the project on PYTHONPATH, for a subprocess (a worker,
    the CLI, the server); variables of settings that `settings` leaves unset are taken out, so none leaks in."""
    from pydantic import SecretStr

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None:
            for alias in field.validation_alias.choices:
                env.pop(alias, None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(value)
        env[field.validation_alias.choices[0]] = str(value)
    return env
