"""A synthetic segmentation world made by our own code, and a tiny X-Decoder pre-trained on it.

Two stuff classes ("grass", "water") fill each image on either side of a wavy border; two thing classes ("ball": a
checkered disc, "brick": a rectangle with mortar lines) sit on top, several per image, some touching or overlapping
(the one drawn later is on top). Every class has a texture, not a flat colour. Some objects also have a referring
phrase ("the leftmost ball", "the biggest brick").

Scenes come as Label Studio results (`Scene.regions`: polygons in percent, the stuff drawn as coarse polygons that
run under the things, as annotators draw them), so that they can go through the backend's own correction code, and
as ready targets (`Scene.target()`: one mask per thing, one per stuff label, every pixel in at most one).

A `Domain` sets the look: `PRETRAIN` is where the tiny model learns (`pretrain_tiny_model`); `SHIFTED` (other tints,
smaller and more crowded things, steeper borders) is where the corrections come from in `bench/learning.py`.

Importable from a checkout: `from bench.synthetic_world import SHIFTED, make_scenes, pretrain_tiny_model`. A
pre-trained model is cached under the given folder, so a second call with the same arguments costs a load.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend.brush import polygon_to_mask
from xdecoder import Predictor, XDecoderConfig, XDecoderModel, build_model, load_model, save_checkpoint
from xdecoder.config import BackboneConfig, DecoderConfig, PixelDecoderConfig, TextConfig
from xdecoder.training import FineTuneConfig, FineTuner, SegmentationTarget

STUFF = ("grass", "water")
THINGS = ("ball", "brick")
LABELS = STUFF + THINGS
REFERRING = {"leftmost ball": "the leftmost ball", "biggest brick": "the biggest brick"}  # label -> its prompt
IMAGE_SIZE = 96

# The Label Studio config the scenes' regions belong to (`Scene.regions` name its controls).
LABEL_CONFIG = f"""
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image">
    <Label value="grass" stuff="true"/>
    <Label value="water" stuff="true"/>
    <Label value="ball"/>
    <Label value="brick"/>
    {"".join(f'<Label value="{label}" prompt="{prompt}"/>' for label, prompt in REFERRING.items())}
  </PolygonLabels>
</View>
"""


@dataclass(frozen=True)
class Domain:
    """How a world's images look. Colours are RGB means; sizes in pixels of an IMAGE_SIZE image."""

    grass: tuple[int, int, int] = (70, 150, 60)
    water: tuple[int, int, int] = (50, 90, 190)
    ball: tuple[int, int, int] = (230, 150, 40)
    brick: tuple[int, int, int] = (180, 60, 50)
    ball_radius: tuple[int, int] = (10, 16)
    brick_side: tuple[int, int] = (16, 28)
    things_per_image: tuple[int, int] = (1, 3)
    border_slope: float = 0.2  # of the grass/water border, in rows per column
    texture_period: float = 6.0  # pixels per stripe/wave/check


PRETRAIN = Domain()
SHIFTED = Domain(
    grass=(120, 150, 50),
    water=(40, 120, 160),
    ball=(240, 110, 90),
    brick=(120, 60, 140),
    ball_radius=(6, 11),
    brick_side=(14, 24),
    things_per_image=(3, 6),
    border_slope=0.8,
    texture_period=4.0,
)


@dataclass
class Scene:
    """image [H, W, 3] uint8; regions: Label Studio polygon results, stuff first, things in drawing order."""

    image: np.ndarray
    regions: list[dict] = field(default_factory=list)

    def target(self) -> SegmentationTarget:
        """The scene's panoptic target (label indices into LABELS) and referring prompts, resolved as the backend
        resolves corrections."""
        from backend.finetune import regions_to_target
        from backend.label_config import PanopticVocabulary, ProjectSpec

        image = ProjectSpec.parse(LABEL_CONFIG).images[0]
        return regions_to_target(self.regions, image, PanopticVocabulary.of(image.controls), self.image.shape)


def polygon_region(label: str, points: np.ndarray, size: int) -> dict:
    """A Label Studio polygon result from points [N, 2] (x, y) in pixels of a size x size image."""
    percent = np.clip(points / size * 100.0, 0.0, 100.0).round(3).tolist()
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "polygonlabels",
        "value": {"points": percent, "closed": True, "polygonlabels": [label]},
    }


def _texture(kind: str, domain: Domain, rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float texture of one class over the whole image (cut out by its mask afterwards)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = domain.texture_period * rng.uniform(0.8, 1.25)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "grass":  # vertical blades
        pattern = np.sin(2 * math.pi * x / period + phase + 0.6 * np.sin(y / 5))
    elif kind == "water":  # horizontal waves
        pattern = np.sin(2 * math.pi * y / (1.6 * period) + phase + 0.8 * np.sin(x / 7))
    elif kind == "ball":  # checks
        pattern = np.sign(np.sin(2 * math.pi * x / period + phase) * np.sin(2 * math.pi * y / period + phase))
    else:  # brick: mortar lines
        pattern = np.where((np.mod(y + phase, period * 1.5) < 1.2) | (np.mod(x + phase, period * 2.5) < 1.2), -1.5, 0.5)
    colour = np.asarray(getattr(domain, kind), np.float32)
    noise = rng.normal(0, 12, (size, size, 1)).astype(np.float32)
    return colour + 35 * pattern[..., None] + noise


def _disc(center: np.ndarray, radius: float, corners: int = 20) -> np.ndarray:
    angles = np.linspace(0, 2 * math.pi, corners, endpoint=False)
    return center + radius * np.stack((np.cos(angles), np.sin(angles)), axis=1)


def _rectangle(center: np.ndarray, width: float, height: float, angle: float) -> np.ndarray:
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (width / 2, height / 2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return center + corners @ rotation.T


def make_scene(rng: np.random.Generator, domain: Domain = PRETRAIN, size: int = IMAGE_SIZE) -> Scene:
    """One random scene of `domain`."""
    regions = []
    # Stuff: grass below a wavy border, water above, each drawn by the annotator as one polygon to the image edge.
    xs = np.linspace(0, size, 9)
    border = size * rng.uniform(0.35, 0.65) + domain.border_slope * (xs - size / 2) * rng.choice((-1, 1))
    border = np.clip(border + rng.normal(0, 3, len(xs)), 4, size - 4)
    line = np.stack((xs, border), axis=1)
    water = np.concatenate(([[0, 0], [size, 0]], line[::-1]))
    grass = np.concatenate((line, [[size, size], [0, size]]))
    canvas = np.zeros((size, size, 3), np.float32)
    for label, polygon in (("water", water), ("grass", grass)):
        mask = polygon_to_mask((polygon / size * 100).tolist(), size, size)
        canvas[mask] = _texture(label, domain, rng, size)[mask]
        regions.append(polygon_region(label, polygon, size))
    # Things, in drawing order; about one in three placed against the previous one (touching or overlapping).
    things: list[tuple[str, np.ndarray, float]] = []
    for _ in range(rng.integers(domain.things_per_image[0], domain.things_per_image[1] + 1)):
        label = str(rng.choice(THINGS))
        if things and rng.random() < 0.35:
            center = things[-1][1].mean(axis=0) + rng.uniform(-1, 1, 2) * domain.ball_radius[1] * 1.2
        else:
            center = rng.uniform(0.15, 0.85, 2) * size
        if label == "ball":
            polygon = _disc(center, rng.uniform(*domain.ball_radius))
        else:
            side = rng.uniform(*domain.brick_side)
            polygon = _rectangle(center, side, side * rng.uniform(0.5, 0.8), rng.uniform(-0.5, 0.5))
        mask = polygon_to_mask((np.clip(polygon, 0, size) / size * 100).tolist(), size, size)
        if mask.sum() < 20:  # mostly outside the image
            continue
        canvas[mask] = _texture(label, domain, rng, size)[mask]
        regions.append(polygon_region(label, polygon, size))
        things.append((label, polygon, float(mask.sum())))
    # Referring phrases, for the objects they single out.
    balls = [(polygon[:, 0].mean(), polygon) for label, polygon, _ in things if label == "ball"]
    bricks = [(area, polygon) for label, polygon, area in things if label == "brick"]
    if balls:
        regions.append(polygon_region("leftmost ball", min(balls, key=lambda b: b[0])[1], size))
    if bricks:
        regions.append(polygon_region("biggest brick", max(bricks, key=lambda b: b[0])[1], size))
    return Scene(np.clip(canvas, 0, 255).astype(np.uint8), regions)


def make_scenes(seed: int, count: int, domain: Domain = PRETRAIN, size: int = IMAGE_SIZE) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, domain, size) for _ in range(count)]


# -------------------------------------------------------------------------------------------- the tiny model
def tiny_world_config(num_queries: int = 16) -> XDecoderConfig:
    """A model small enough to pre-train on the CPU in about a minute."""
    return XDecoderConfig(
        backbone=BackboneConfig(embed_dim=24, depths=(1, 1, 2, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3,) * 4),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, transformer_layers=1),
        decoder=DecoderConfig(hidden_dim=64, num_queries=num_queries, nheads=4, dim_feedforward=128, dec_layers=4),
        text=TextConfig(width=64, layers=2, heads=1),
        dim_proj=64,
        backbone_dim=192,
    )


def pretrain_tiny_model(
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 4,
    domain: Domain = PRETRAIN,
    cache_dir: Path | None = None,
    log_every: int = 0,
) -> XDecoderModel:
    """A tiny X-Decoder trained from random weights on `domain` (every part but the text encoder learns), in eval
    mode on the CPU. With `cache_dir`, the weights are kept there and loaded by the next call with the same
    arguments."""
    recipe = {"seed": seed, "steps": steps, "batch": batch_size, "domain": asdict(domain), "version": 1}
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cached = cache_dir / f"synthetic-world-{digest}.safetensors" if cache_dir else None
    if cached is not None and cached.is_file():
        return load_model(cached, device="cpu")
    torch.manual_seed(seed)
    model = build_model(tiny_world_config()).eval()
    with torch.no_grad():  # class scores decisive enough to pass the default object threshold once trained
        model.language.logit_scale.fill_(math.log(50.0))
    trainable = {name: p for name, p in model.named_parameters() if not name.startswith("language.")}
    config = FineTuneConfig(learning_rate=1e-3, warmup_steps=20, decay_steps=(int(steps * 0.8),), seed=seed)
    tuner = FineTuner(model, config, parameters=trainable)
    class_embeddings = Predictor(model, short_side=IMAGE_SIZE).class_embeddings(list(LABELS))
    scenes = make_scenes(seed + 1000, 256, domain)
    targets = [scene.target() for scene in scenes]
    images = [torch.from_numpy(scene.image).permute(2, 0, 1).contiguous() for scene in scenes]
    rng = np.random.default_rng(seed)
    for step in range(steps):
        batch = rng.choice(len(scenes), batch_size, replace=False)
        losses = tuner.step([images[i] for i in batch], [targets[i] for i in batch], class_embeddings)
        if log_every and (step + 1) % log_every == 0:
            print(f"pre-train step {step + 1}/{steps} loss {losses['loss']:.3f}", flush=True)
    model.eval()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, cached)
    return model
