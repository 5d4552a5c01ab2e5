"""Fine-tuning X-Decoder on annotators' corrections: matching, losses, one optimisation step, evaluation.

The training objective is the official one (Mask2Former's set criterion as X-Decoder configures it):

* every decoder output (the prediction on the learnable queries and after each layer) is matched to the
  image's target masks by the Hungarian algorithm (`HungarianMatcher`) and supervised (`SegmentationLoss`):
  class cross-entropy over the text logits, mask BCE and dice on sampled points; matched queries learn
  their target, the other object queries learn "background";
* referring prompts (a sentence and its mask) optionally add a grounding loss on the grounding queries.

`FineTuner` is the cheap recipe for corrections: the backbone and the text encoder stay frozen, the pixel
decoder and the decoder learn (AdamW, warmup, gradient clipping, bf16 autocast on CUDA).
`trained_state()` gives only the tensors training changes, so a fine-tuned version is a small delta on
top of its base checkpoint. `Augmentation` jitters a training example (xdecoder.evaluation scores the
result).

Target masks are at the model input's resolution: an image's masks [T, h, w] cover the image as it went
into `model.prepare_images` (already resized); the loss pads them bottom/right to the padded batch size
as the images are padded. Point coordinates are (x, y) in [0, 1] over the padded input, so the stride-4
mask logits and the full-resolution targets are sampled at the same places.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .language import LanguageEncoder
from .model import XDecoderModel
from .text import PromptEmbeddings, grounding_tokens, prompt_embeddings
from .tokenizer import get_tokenizer
from .transformer_decoder import DecoderOutput, QueryPredictions

# Mask logits are predicted at stride 4 of the padded input.
MASK_STRIDE = 4

# Decoder parameters that inference never uses (the captioning head, kept so official checkpoints load
# strictly): they would get no gradient, so they stay out of the trained set and of every stored delta.
UNUSED_DECODER_PARAMETERS = frozenset(
    {"sem_seg_head.predictor.caping_embed", "sem_seg_head.predictor.pos_embed_caping.weight"}
)


@dataclass
class SegmentationTarget:
    """What one image should segment.

    labels [T] int64: label index of each target mask (into the labels the class embeddings stand for).
    masks [T, h, w] bool: one mask per thing instance / per stuff label, at the image's model-input size.
    prompts / prompt_masks [P, h, w] bool: optional referring sentences and the mask each one means.
    """

    labels: Tensor
    masks: Tensor
    prompts: Sequence[str] = ()
    prompt_masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.masks.ndim != 3 or len(self.labels) != len(self.masks):
            raise ValueError(
                f"labels [T] and masks [T, h, w] expected, got {tuple(self.labels.shape)} and {tuple(self.masks.shape)}"
            )
        if isinstance(self.prompts, str):
            raise ValueError("prompts must be a list of sentences, not a single string")
        num_prompt_masks = 0 if self.prompt_masks is None else len(self.prompt_masks)
        if num_prompt_masks != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {num_prompt_masks} prompt masks")
        if self.prompt_masks is not None and self.prompt_masks.shape[1:] != self.masks.shape[1:]:
            raise ValueError("prompt masks and masks must have the same size")


# ---------------------------------------------------------------------------------------------- points
def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of maps [M, H, W] at points [M, P, 2] ((x, y) in [0, 1]) -> [M, P]."""
    grid = 2.0 * points[:, None] - 1.0
    return F.grid_sample(maps[:, None], grid, align_corners=False)[:, 0, 0]


def random_points(count: int, num_points: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniformly random points [count, num_points, 2] on like's device, in its dtype."""
    return torch.rand(count, num_points, 2, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def uncertain_points(
    mask_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend's training points for mask logits [M, h, w] -> [M, num_points, 2].

    `importance_sample_ratio` of the points are the most uncertain (logit nearest 0) among
    `oversample_ratio * num_points` random candidates, so the loss concentrates on boundaries; the rest
    are uniformly random. Uncertainty is measured on the interpolated logit at each candidate.
    """
    candidates = random_points(len(mask_logits), int(num_points * oversample_ratio), mask_logits, generator)
    uncertainty = -point_sample(mask_logits, candidates).abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    most_uncertain = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, most_uncertain[..., None].expand(-1, -1, 2))
    uniform = random_points(len(mask_logits), num_points - num_uncertain, mask_logits, generator)
    return torch.cat((chosen, uniform), dim=1)


def sampled_points(num_points: int, mask_logits: Tensor) -> int:
    """Points to sample on mask logits [..., h, w]: `num_points`, at most 4 per logit cell. The official 12544
    points are meant for inputs of about 1024 pixels a side; on a small input more than a few points per stride-4
    cell resample the same bilinear values and only cost time (a 96-pixel image has 576 cells)."""
    return min(num_points, 4 * mask_logits.shape[-2] * mask_logits.shape[-1])


def pad_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks [T, h, w] -> float [T, H, W], zero-padded bottom/right like the images of a batch."""
    height, width = masks.shape[-2:]
    if height > size[0] or width > size[1]:
        raise ValueError(f"masks of size {(height, width)} do not fit the padded input {size}")
    return F.pad(masks.float(), (0, size[1] - width, 0, size[0] - height))


# ----------------------------------------------------------------------------------- mask costs, losses
def pairwise_mask_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of every prediction against every target: logits [N, P], targets [T, P] -> [N, T]."""
    positive = F.softplus(-logits)  # BCE where the target is 1
    negative = F.softplus(logits)  # BCE where the target is 0
    return (positive @ targets.t() + negative @ (1 - targets).t()) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (with +1 smoothing) of every prediction against every target: [N, P], [T, P] -> [N, T]."""
    probs = logits.sigmoid()
    overlap = 2 * probs @ targets.t()
    return 1 - (overlap + 1) / (probs.sum(dim=1)[:, None] + targets.sum(dim=1)[None, :] + 1)


def mask_bce_and_dice(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair BCE (mean over points) and dice of logits [M, P] against targets [M, P] -> two [M]."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(dim=1) + 1) / (probs.sum(dim=1) + targets.sum(dim=1) + 1)
    return bce, dice


def label_log_probabilities(logits: Tensor, text_to_label: Tensor | None) -> Tensor:
    """Text logits [..., K+1] (last "background") -> label log-probabilities [..., L+1] (last background).

    Texts that are synonyms of one label (`text_to_label` [K] maps texts to labels; None: one text per
    label) add their probabilities, as `postprocess.group_probabilities` does at inference.
    """
    log_probs = logits.float().log_softmax(dim=-1)
    if text_to_label is None:
        return log_probs
    num_texts = log_probs.shape[-1] - 1
    num_labels = int(text_to_label.max()) + 1
    # log of the 0/1 text -> label membership, so a logsumexp over texts sums each label's probabilities.
    membership = torch.full((num_texts, num_labels), -math.inf, device=log_probs.device)
    membership[torch.arange(num_texts, device=log_probs.device), text_to_label.to(log_probs.device)] = 0.0
    grouped = torch.logsumexp(log_probs[..., :-1, None] + membership, dim=-2)
    return torch.cat((grouped, log_probs[..., -1:]), dim=-1)


# --------------------------------------------------------------------------------------------- matcher
@dataclass(frozen=True)
class HungarianMatcher:
    """One-to-one assignment of predictions to targets minimising

        class_weight * -p(target | prediction) + mask_weight * BCE + dice_weight * dice,

    the mask terms on `num_points` uniformly random points shared by all predictions and targets.
    Predictions that get no target are the ones the loss pushes to "background".
    """

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544

    @torch.no_grad()
    def cost_matrix(
        self,
        target_probs: Tensor,
        mask_logits: Tensor,
        target_masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """target_probs [N, T]: how likely prediction n is target t's class (for referring: that prompt t
        picks query n); mask_logits [N, h, w] at stride 4; target_masks [T, H, W] at the padded input
        size (4h, 4w) -> cost [N, T] float32 on the CPU."""
        mask_logits = mask_logits.float()
        points = random_points(1, sampled_points(self.num_points, mask_logits), mask_logits, generator)
        predicted = point_sample(mask_logits, points.expand(len(mask_logits), -1, -1))
        wanted = point_sample(target_masks.float(), points.expand(len(target_masks), -1, -1))
        cost = (
            self.class_weight * -target_probs.float()
            + self.mask_weight * pairwise_mask_bce(predicted, wanted)
            + self.dice_weight * pairwise_dice(predicted, wanted)
        )
        return cost.cpu()

    def __call__(
        self,
        target_probs: Tensor,
        mask_logits: Tensor,
        target_masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Arguments as `cost_matrix` -> (prediction indices [M], target indices [M]), int64 on the
        predictions' device, M = min(N, T), ordered by prediction index."""
        device = mask_logits.device
        if len(target_masks) == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        rows, columns = linear_sum_assignment(self.cost_matrix(target_probs, mask_logits, target_masks, generator))
        return torch.as_tensor(rows, device=device), torch.as_tensor(columns, device=device)


# ------------------------------------------------------------------------------------------------ loss
@dataclass(frozen=True)
class LossConfig:
    """Weights and sampling of the official X-Decoder criterion (Focal-T config). The matcher uses the
    class, mask and dice weights as its costs, as the official code does."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    background_weight: float = 0.1  # class weight of "background" in the cross-entropy (NO_OBJECT_WEIGHT)
    grounding_mask_weight: float = 1.0
    grounding_dice_weight: float = 1.0
    # The official GCLASS_WEIGHT 0.4 times its extra weight 2.0 for sentence (not class-name) prompts.
    grounding_class_weight: float = 0.8
    grounding_layers: int = 3  # the grounding loss supervises only the last outputs (TOP_GROUNDING_LAYERS)
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


class SegmentationLoss:
    """The set criterion with deep supervision: the loss of every output in `output.layers`, summed.

    Per output, on the object queries (rows 0..Q-2; the class query is not supervised here, as in the
    official code) matched to each image's targets independently:
      class      class_weight * cross-entropy of the label log-probabilities, over all object queries of
                 the batch (unmatched ones -> background, weighted background_weight), weighted mean;
      mask_bce   mask_weight * BCE, mean over `num_points` uncertainty-sampled points, summed over
                 matched masks and divided by the number of target masks in the batch (at least 1);
      mask_dice  dice_weight * dice on the same points, normalised the same way.
    Referring targets add, on the grounding queries (rows Q..) of the last `grounding_layers` outputs,
    each prompt matched to one query (class cost: softmax over queries of the prompt similarity):
      grounding_bce / grounding_dice   as above, divided by the number of prompts in the batch;
      grounding_class  cross-entropy over queries pushing each prompt's matched query up (mean over a
                 image's prompts, then over images with prompts).
    The official hashing of duplicate sentences (soft targets when one sentence names several masks) is
    left out: here every prompt has one mask.

    Returns weighted, layer-summed terms under those names plus their sum under "loss".
    """

    def __init__(self, config: LossConfig | None = None, text_to_label: Tensor | None = None):
        self.config = config or LossConfig()
        self.matcher = HungarianMatcher(
            self.config.class_weight, self.config.mask_weight, self.config.dice_weight, self.config.num_points
        )
        self.text_to_label = text_to_label

    def __call__(
        self,
        output: DecoderOutput,
        targets: Sequence[SegmentationTarget],
        prompt_embeddings: Sequence[Tensor | None] = (),
        language: LanguageEncoder | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """output: decoded with `all_layer_masks=True` (and the prompts' grounding tokens, if any);
        targets: one per image; prompt_embeddings: per image the pooled prompt embeddings [P, D] (or
        None), with `language` for their similarity to the queries."""
        return self.combine([self.sums(output, targets, prompt_embeddings, language, generator)])

    def sums(
        self,
        output: DecoderOutput,
        targets: Sequence[SegmentationTarget],
        prompt_embeddings: Sequence[Tensor | None] = (),
        language: LanguageEncoder | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """The terms of one share of a batch before their normalisation (arguments as `__call__`):
        {"LAYER/TERM": (weighted sum, count)}; a term is the sum over all shares of the batch divided by the
        count over all shares (`combine`), so a batch split across processes (or forwarded image by image)
        gets the loss of the whole batch. Every share has the same keys: a term it has nothing for is (0, 0)."""
        if len(targets) != output.final.masks.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {output.final.masks.shape[0]} images")
        grounded = [i for i, embeddings in enumerate(prompt_embeddings) if embeddings is not None]
        if grounded and language is None:
            raise ValueError("the grounding loss needs the language encoder")
        padded_size = tuple(MASK_STRIDE * s for s in output.final.masks.shape[-2:])
        masks = [pad_masks(t.masks.to(output.final.masks.device), padded_size) for t in targets]
        sums: dict[str, tuple[Tensor, Tensor]] = {}
        first_grounded_layer = len(output.layers) - self.config.grounding_layers
        for index, layer in enumerate(output.layers):
            terms = self._panoptic_terms(layer, output.num_queries, targets, masks, generator)
            if index >= first_grounded_layer:
                terms |= self._grounding_terms(
                    layer, output.num_queries, targets, padded_size, prompt_embeddings, language, generator
                )
            sums |= {f"{index}/{name}": value for name, value in terms.items()}
        return sums

    @staticmethod
    def combine(
        shares: Sequence[dict[str, tuple[Tensor, Tensor]]], sum_across: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The loss of a batch from the `sums` of its shares: the weighted terms summed over the outputs, and their
        total "loss". sum_across(counts [K]) -> the counts summed over every process's shares (an all-reduce), when
        `shares` are only this process's part of the batch. A term no share has anything for (the grounding terms
        of a batch without prompts) adds 0 and is not listed."""
        keys = list(shares[0])
        counts = torch.stack([sum(share[key][1] for share in shares) for key in keys])
        if sum_across is not None:
            counts = sum_across(counts)
        totals: dict[str, Tensor] = {}
        loss: Tensor | int = 0
        counted: set[str] = set()
        for key, count in zip(keys, counts, strict=True):
            name = key.split("/", 1)[1]
            # A zero count comes with a zero sum: the term is then 0 (its graph kept, for zero gradients).
            value = sum(share[key][0] for share in shares) / count.clamp(min=torch.finfo(count.dtype).tiny)
            totals[name] = totals[name] + value if name in totals else value
            loss = loss + value
            if bool(count > 0):
                counted.add(name)
        return {name: value for name, value in totals.items() if name in counted} | {"loss": loss}

    def _panoptic_terms(
        self,
        layer: QueryPredictions,
        num_queries: int,
        targets: Sequence[SegmentationTarget],
        target_masks: list[Tensor],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        config = self.config
        object_rows = num_queries - 1
        log_probs = label_log_probabilities(layer.logits[:, :object_rows], self.text_to_label)  # [B, Q-1, L+1]
        mask_logits = layer.masks[:, :object_rows].float()
        background = log_probs.shape[-1] - 1
        classes = torch.full(log_probs.shape[:2], background, dtype=torch.int64, device=log_probs.device)
        matched_logits, matched_targets = [], []
        for i, target in enumerate(targets):
            labels = target.labels.to(log_probs.device)
            if len(labels) and int(labels.max()) >= background:
                raise ValueError(f"target label {int(labels.max())} but only {background} labels")
            target_probs = log_probs[i].detach().exp()[:, labels]
            queries, matched = self.matcher(target_probs, mask_logits[i].detach(), target_masks[i], generator)
            classes[i, queries] = labels[matched]
            matched_logits.append(mask_logits[i, queries])
            matched_targets.append(target_masks[i][matched])
        class_weights = torch.ones(background + 1, device=log_probs.device)
        class_weights[background] = config.background_weight
        # The weighted mean cross-entropy, as its sum and the sum of its weights.
        class_loss = F.nll_loss(log_probs.transpose(1, 2), classes, weight=class_weights, reduction="sum")
        class_count = class_weights[classes].sum()
        num_masks = log_probs.new_tensor(float(sum(len(t.labels) for t in targets)))
        bce, dice = self._mask_terms(torch.cat(matched_logits), torch.cat(matched_targets), generator)
        return {
            "class": (config.class_weight * class_loss, class_count),
            "mask_bce": (config.mask_weight * bce, num_masks),
            "mask_dice": (config.dice_weight * dice, num_masks),
        }

    def _grounding_terms(
        self,
        layer: QueryPredictions,
        num_queries: int,
        targets: Sequence[SegmentationTarget],
        padded_size: tuple[int, int],
        prompt_embeddings: Sequence[Tensor | None],
        language: LanguageEncoder,
        generator: torch.Generator | None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        config = self.config
        mask_logits = layer.masks[:, num_queries:].float()
        if not any(embeddings is not None for embeddings in prompt_embeddings):
            zero = (mask_logits.sum() * 0.0, mask_logits.new_zeros(()))
            return {"grounding_class": zero, "grounding_bce": zero, "grounding_dice": zero}
        class_losses, matched_logits, matched_targets = [], [], []
        for i, embeddings in enumerate(prompt_embeddings):
            if embeddings is None:
                continue
            similarity = language.grounding_similarity(layer.captions[i, num_queries:].float(), embeddings)  # [Q-1, P]
            prompt_masks = pad_masks(targets[i].prompt_masks.to(mask_logits.device), padded_size)
            target_probs = similarity.detach().softmax(dim=0)
            queries, prompts = self.matcher(target_probs, mask_logits[i].detach(), prompt_masks, generator)
            class_losses.append(-similarity.log_softmax(dim=0)[queries, prompts].mean())
            matched_logits.append(mask_logits[i, queries])
            matched_targets.append(prompt_masks[prompts])
        num_prompts = mask_logits.new_tensor(float(sum(len(m) for m in matched_targets)))
        bce, dice = self._mask_terms(torch.cat(matched_logits), torch.cat(matched_targets), generator)
        # The mean over the images with prompts of each one's mean class loss.
        images_with_prompts = mask_logits.new_tensor(float(len(class_losses)))
        return {
            "grounding_class": (config.grounding_class_weight * torch.stack(class_losses).sum(), images_with_prompts),
            "grounding_bce": (config.grounding_mask_weight * bce, num_prompts),
            "grounding_dice": (config.grounding_dice_weight * dice, num_prompts),
        }

    def _mask_terms(
        self, mask_logits: Tensor, target_masks: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Summed BCE and dice of matched mask logits [M, h, w] against targets [M, H, W]."""
        if len(mask_logits) == 0:
            zero = mask_logits.sum() * 0.0  # keeps the graph (and the gradients' zeros) alike in every case
            return zero, zero
        config = self.config
        num_points = sampled_points(config.num_points, mask_logits)
        points = uncertain_points(
            mask_logits.detach(), num_points, config.oversample_ratio, config.importance_sample_ratio, generator
        )
        wanted = point_sample(target_masks, points)
        bce, dice = mask_bce_and_dice(point_sample(mask_logits, points), wanted)
        return bce.sum(), dice.sum()


# --------------------------------------------------------------------------------------- augmentation
# A prompt that names a side means the other object once the image is mirrored.
SIDED_PROMPT = re.compile(r"\b(left|right)", re.IGNORECASE)


@dataclass(frozen=True)
class Augmentation:
    """Light augmentation of a training example, the same geometry for the image and every mask: a random scale
    in `scale_range` (image bilinear, masks nearest), a random crop back to the input size when scaled up, and a
    horizontal flip with probability `flip_probability` unless a referring prompt names a side (left/right)."""

    scale_range: tuple[float, float] = (0.8, 1.25)
    flip_probability: float = 0.5

    def __call__(
        self, image: Tensor, target: SegmentationTarget, generator: torch.Generator
    ) -> tuple[Tensor, SegmentationTarget]:
        """image [3, h, w] uint8, target masks [T, h, w] -> the augmented pair, [3, h', w'] and [T', h', w'] (h', w'
        at most h, w). Targets (and prompts) that the crop leaves empty are dropped; if none is left, the pair is
        returned unchanged."""
        height, width = image.shape[-2:]
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand((), generator=generator))
        size = (max(8, round(height * scale)), max(8, round(width * scale)))
        top = int(torch.randint(0, max(size[0] - height, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(size[1] - width, 0) + 1, (), generator=generator))
        flip = float(torch.rand((), generator=generator)) < self.flip_probability and not any(
            SIDED_PROMPT.search(prompt) for prompt in target.prompts
        )

        def transform(maps: Tensor, mode: str) -> Tensor:  # [N, h, w] -> [N, h', w']
            resized = F.interpolate(
                maps[None].float(), size=size, mode=mode, **({"antialias": True} if mode == "bilinear" else {})
            )[0]
            cropped = resized[:, top : top + height, left : left + width]
            return cropped.flip(-1) if flip else cropped

        masks = transform(target.masks, "nearest") > 0.5
        kept = masks.flatten(1).any(dim=1)
        if not bool(kept.any()):
            return image, target
        prompts, prompt_masks = list(target.prompts), None
        if target.prompt_masks is not None:
            prompt_masks = transform(target.prompt_masks, "nearest") > 0.5
            kept_prompts = prompt_masks.flatten(1).any(dim=1)
            prompts = [p for p, keep in zip(prompts, kept_prompts.tolist(), strict=True) if keep]
            prompt_masks = prompt_masks[kept_prompts] if prompts else None
        augmented = transform(image, "bilinear").round().clamp(0, 255).to(torch.uint8)
        return augmented, SegmentationTarget(target.labels[kept], masks[kept], prompts, prompt_masks)


# ---------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuneConfig:
    """Optimiser and schedule. The learning rate rises linearly over `warmup_steps` steps, then stays,
    multiplied by `decay_factor` at each step count in `decay_steps`."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.05  # not on biases, norms and embeddings
    max_grad_norm: float = 5.0
    warmup_steps: int = 10
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    autocast: bool = True  # bf16 autocast on CUDA (never on the CPU, where it is slower)
    seed: int = 0  # of the point sampling
    loss: LossConfig = field(default_factory=LossConfig)

    def learning_rate_factor(self, step: int) -> float:
        """Multiplier of `learning_rate` for the optimiser step with index `step` (0-based)."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warmup * self.decay_factor ** sum(step >= s for s in self.decay_steps)


def trainable_parameters(model: XDecoderModel) -> dict[str, nn.Parameter]:
    """The pixel decoder's and the decoder's parameters (not the text encoder inside the decoder, not the
    unused captioning head), by state-dict name."""
    language_prefix = "sem_seg_head.predictor.lang_encoder."
    return {
        name: param
        for name, param in model.named_parameters()
        if name.startswith("sem_seg_head.")
        and not name.startswith(language_prefix)
        and name not in UNUSED_DECODER_PARAMETERS
    }


class FineTuner:
    """Optimisation steps on a model: the backbone (with `backbone_proj`) and the language encoder are
    frozen, the pixel decoder and the decoder train.

    The tuner owns the model: it turns off `requires_grad` of the frozen parameters (their tensors may
    be shared with a served model: nothing here writes them) and leaves the model in eval mode after
    each step. text_to_label [K]: label index of each class-embedding row but "background", when labels
    have synonyms (targets then hold label indices); None: one row per label. parameters: what trains, by
    state-dict name, in place of `trainable_parameters(model)` (pre-training from scratch trains the backbone too).
    """

    def __init__(
        self,
        model: XDecoderModel,
        config: FineTuneConfig | None = None,
        *,
        text_to_label: Tensor | None = None,
        parameters: dict[str, nn.Parameter] | None = None,
    ):
        self.model = model
        self.config = config or FineTuneConfig()
        self.text_to_label = None if text_to_label is None else text_to_label.to(model.device)
        self.loss = SegmentationLoss(self.config.loss, self.text_to_label)
        self.parameters = trainable_parameters(model) if parameters is None else parameters
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.parameters)
        # Biases and norm scales are the 1-D parameters; embeddings are the learnt queries and level
        # embeddings. Decaying them towards 0 has no regularising meaning.
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        no_decay = [p for p in self.parameters.values() if p.ndim <= 1 or id(p) in embeddings]
        decay = [p for p in self.parameters.values() if not (p.ndim <= 1 or id(p) in embeddings)]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.config.learning_rate,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.config.learning_rate_factor)
        self.generator = torch.Generator(device=model.device).manual_seed(self.config.seed)
        self.steps_done = 0

    def step(
        self,
        images: Sequence[Tensor],
        targets: Sequence[SegmentationTarget],
        class_embeddings: Tensor,
        *,
        generators: Sequence[torch.Generator] | None = None,
        sum_across: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """One optimisation step on a batch.

        images: RGB [3, h_i, w_i] uint8 at model-input size; targets: one per image, masks [T, h_i, w_i];
        class_embeddings [K+1, D] L2-normalised, "background" last (e.g. `Predictor.class_embeddings`).
        generators: one per image, for its random draws: each image then goes through the model on its own
        (no padding to its neighbours' size), so how a batch is split across processes changes nothing; None: one
        forward of the whole batch with the tuner's generator.
        sum_across(tensor) -> that tensor summed over the processes that share the batch (an all-reduce): with it,
        `images` are this process's part of a global batch, the loss is normalised over the global batch and the
        gradients are summed across processes before clipping, so every process takes the same step.
        Returns the loss terms of the (global) batch (see SegmentationLoss), "loss", and the gradient norm before
        clipping.
        """
        model = self.model
        self._check(images, targets, class_embeddings)
        if generators is not None and len(generators) != len(images):
            raise ValueError(f"{len(generators)} generators for {len(images)} images: one per image expected")
        # The embeddings may come from inference mode (the embedding cache), whose tensors autograd
        # cannot save: copy them.
        class_embeddings = class_embeddings.to(model.device).clone()
        if generators is None:
            parts = [(list(images), list(targets), self.generator)]
        else:
            parts = [([image], [target], g) for image, target, g in zip(images, targets, generators, strict=True)]
        model.sem_seg_head.train()
        try:
            shares = [self._loss_sums(*part, class_embeddings) for part in parts]
            losses = self.loss.combine(shares, sum_across)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if sum_across is not None:
                self._sum_gradients(sum_across)
            grad_norm = nn.utils.clip_grad_norm_(list(self.parameters.values()), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.steps_done += 1
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model.eval()
        reported = torch.stack([value.detach().float() for value in losses.values()])
        if sum_across is not None:  # each process's terms are its share of the global batch's
            reported = sum_across(reported)
        return dict(zip(losses, reported.tolist(), strict=True)) | {"grad_norm": float(grad_norm)}

    def _loss_sums(
        self,
        images: list[Tensor],
        targets: list[SegmentationTarget],
        generator: torch.Generator,
        class_embeddings: Tensor,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """`SegmentationLoss.sums` of one forward of `images`."""
        model = self.model
        prompts = [self._embed_prompts(t.prompts) for t in targets]
        batch = model.prepare_images(images)
        with self._autocast():
            # The frozen backbone has no parameter that needs a gradient, so autograd keeps none of
            # its activations: only the pixel decoder and the decoder build a graph.
            features = model.encode_image(batch.pixels)
            output = model.decode(features, class_embeddings, grounding_tokens(prompts), all_layer_masks=True)
        pooled = [None if p is None else p.pooled for p in prompts]
        return self.loss.sums(output, targets, pooled, model.language, generator)

    def _sum_gradients(self, sum_across: Callable[[Tensor], Tensor]) -> None:
        """Every trained parameter's gradient summed across processes, in one flat all-reduce (a parameter this
        process's share gave no gradient counts as zeros)."""
        parameters = list(self.parameters.values())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
        summed = sum_across(flat)
        for parameter, gradient in zip(parameters, summed.split([p.numel() for p in parameters]), strict=True):
            parameter.grad = gradient.view_as(parameter)

    def trained_state(self) -> dict[str, Tensor]:
        """CPU copies of the trained tensors by state-dict name: the delta to store on top of the base
        checkpoint (base state updated with these = the fine-tuned model)."""
        return {name: param.detach().to("cpu", copy=True) for name, param in self.parameters.items()}

    def _embed_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings | None:
        if not prompts:
            return None
        language = self.model.language
        embedded = prompt_embeddings(language, get_tokenizer(language.context_length), prompts)
        # Outside inference mode, so that autograd may save them.
        return PromptEmbeddings([t.clone() for t in embedded.tokens], embedded.pooled.clone())

    def _check(self, images: Sequence[Tensor], targets: Sequence[SegmentationTarget], class_embeddings: Tensor) -> None:
        if not images or len(images) != len(targets):
            raise ValueError(f"{len(images)} images and {len(targets)} targets: one target per image expected")
        for image, target in zip(images, targets, strict=True):
            if target.masks.shape[1:] != image.shape[-2:]:
                raise ValueError(f"target masks {tuple(target.masks.shape[1:])} for an image {tuple(image.shape)}")
        num_texts = class_embeddings.shape[0] - 1
        if self.text_to_label is not None and len(self.text_to_label) != num_texts:
            raise ValueError(f"text_to_label has {len(self.text_to_label)} entries for {num_texts} class texts")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast and self.model.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
