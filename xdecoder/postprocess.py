"""From decoder outputs to panoptic, semantic and referring results at the image's original size.

Same arithmetic as the official post-processing, organised so memory grows with the number of kept
queries rather than with all of them: class scores decide which queries survive before any mask is
resized, and masks are resized a few at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_CHUNK = 8


@dataclass(frozen=True)
class Geometry:
    """Where one image sits in the model input: padded batch size, its valid (resized) size, and the
    size results are wanted at (the original image)."""

    padded_size: tuple[int, int]
    valid_size: tuple[int, int]
    output_size: tuple[int, int]


def upsample_masks(masks: Tensor, geometry: Geometry) -> Tensor:
    """Mask logits [N, h, w] at stride 4 -> [N, H, W] float32 at output size, as the official code does:
    bicubic (antialiased) to the padded input size, crop the padding, bicubic again to the output."""
    full = F.interpolate(
        masks[None].float(), size=geometry.padded_size, mode="bicubic", align_corners=False, antialias=True
    )
    cropped = full[..., : geometry.valid_size[0], : geometry.valid_size[1]]
    out = F.interpolate(cropped, size=geometry.output_size, mode="bicubic", align_corners=False, antialias=True)
    return out[0]


def group_probabilities(logits: Tensor, text_to_label: Tensor | None, num_labels: int) -> Tensor:
    """softmax over the K+1 texts (the last is "background") -> [Q, L+1] label probabilities: texts
    that are synonyms of one label add up. `text_to_label` [K] maps texts to labels (None: identity)."""
    probs = logits.float().softmax(dim=-1)
    if text_to_label is None:
        return probs
    grouped = torch.zeros(probs.shape[0], num_labels + 1, device=probs.device)
    grouped[:, :num_labels].index_add_(1, text_to_label, probs[:, :-1])
    grouped[:, num_labels] = probs[:, -1]
    return grouped


@dataclass
class PanopticSegment:
    id: int
    label_index: int
    is_thing: bool
    score: float
    mask_score: float
    area: int


@dataclass
class KeptQueries:
    """Queries that passed the class-score filter: index, score and label, in query order."""

    index: Tensor
    score: Tensor
    label: Tensor


def keep_queries(probs: Tensor, object_mask_threshold: float) -> KeptQueries:
    scores, labels = probs.max(dim=-1)
    background = probs.shape[1] - 1
    keep = (labels != background) & (scores > object_mask_threshold)
    index = keep.nonzero()[:, 0]
    return KeptQueries(index, scores[index], labels[index])


def panoptic(
    probs: Tensor,
    masks: Tensor,
    is_thing: list[bool],
    geometry: Geometry,
    object_mask_threshold: float,
    overlap_threshold: float,
) -> tuple[Tensor, list[PanopticSegment]]:
    """probs [Q, L+1] (last: background), masks [Q, h, w] logits at stride 4 ->
    (id map [H, W] int32 with 0 for no segment, segments in id order)."""
    kept = keep_queries(probs, object_mask_threshold)
    height, width = geometry.output_size
    id_map = torch.zeros(height, width, dtype=torch.int32, device=masks.device)
    if len(kept.index) == 0:
        return id_map, []

    # Pass 1: owner of every pixel = argmax over kept queries of score * sigmoid(mask) (first index
    # wins ties, as torch.argmax), plus each query's own foreground and its mean probability there.
    best = torch.full((height, width), -1.0, device=masks.device)
    owner = torch.zeros(height, width, dtype=torch.long, device=masks.device)
    foreground = torch.empty(len(kept.index), height, width, dtype=torch.bool, device=masks.device)
    mask_scores = torch.zeros(len(kept.index), device=masks.device)
    for start in range(0, len(kept.index), MASK_CHUNK):
        chunk = kept.index[start : start + MASK_CHUNK]
        sigmoid = upsample_masks(masks[chunk], geometry).sigmoid()
        for offset, prob in enumerate(sigmoid):
            k = start + offset
            weighted = kept.score[k] * prob
            better = weighted > best
            best = torch.where(better, weighted, best)
            owner[better] = k
            foreground[k] = prob >= 0.5
            area = foreground[k].sum()
            mask_scores[k] = (prob * foreground[k]).sum() / area.clamp(min=1)

    # Pass 2: keep a query's pixels if it owns most of its own foreground; stuff labels share a segment.
    segments: list[PanopticSegment] = []
    stuff_segment: dict[int, PanopticSegment] = {}
    owned_areas = torch.bincount(owner.flatten(), minlength=len(kept.index)).tolist()
    for k in range(len(kept.index)):
        mask = (owner == k) & foreground[k]
        original_area = int(foreground[k].sum())
        if owned_areas[k] == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if owned_areas[k] / original_area < overlap_threshold:
            continue
        label = int(kept.label[k])
        score, mask_score = float(kept.score[k]), float(mask_scores[k])
        if not is_thing[label] and label in stuff_segment:
            segment = stuff_segment[label]
            segment.score = max(segment.score, score)
            segment.mask_score = max(segment.mask_score, mask_score)
            id_map[mask] = segment.id
            continue
        segment = PanopticSegment(len(segments) + 1, label, is_thing[label], score, mask_score, 0)
        segments.append(segment)
        if not segment.is_thing:
            stuff_segment[label] = segment
        id_map[mask] = segment.id
    areas = torch.bincount(id_map.flatten().long(), minlength=len(segments) + 1).tolist()
    for segment in segments:
        segment.area = areas[segment.id]
    return id_map, segments


def semantic(probs: Tensor, masks: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """Per-pixel label = argmax_l sum_q p(l|q) * sigmoid(mask_q) over the L labels (background left out).
    Returns (label map [H, W] int32, its score [H, W] float32)."""
    label_probs = probs[:, :-1]
    total = torch.zeros(label_probs.shape[1], *geometry.output_size, device=masks.device)
    for start in range(0, masks.shape[0], MASK_CHUNK):
        sigmoid = upsample_masks(masks[start : start + MASK_CHUNK], geometry).sigmoid()
        total += torch.einsum("ql,qhw->lhw", label_probs[start : start + MASK_CHUNK], sigmoid)
    score, label = total.max(dim=0)
    return label.to(torch.int32), score


@dataclass
class ReferringMatch:
    query: Tensor  # [P] index of the grounding query chosen for each prompt
    similarity: Tensor  # [P] its score (clamped exp(logit_scale) * cosine)
    probability: Tensor  # [P] softmax over the grounding queries of that score: how clearly it won
    masks: Tensor  # [P, H, W] bool at output size
    mask_scores: Tensor  # [P] mean sigmoid inside each mask


def referring(similarity: Tensor, grounding_masks: Tensor, geometry: Geometry) -> ReferringMatch:
    """similarity [Q-1, P] of grounding queries to prompts; grounding_masks [Q-1, h, w] -> each prompt
    takes its most similar query's mask, binarised at logit > 0."""
    similarity = similarity.float()
    best, query = similarity.max(dim=0)
    probability = similarity.softmax(dim=0).max(dim=0).values
    logits = upsample_masks(grounding_masks[query], geometry)
    masks = logits > 0
    sigmoid = logits.sigmoid()
    mask_scores = (sigmoid * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
    return ReferringMatch(query, best, probability, masks, mask_scores)
