"""From decoder outputs to panoptic, semantic and referring results at the image's original size.

Same arithmetic as the official post-processing, organised so that memory does not grow with the number of
queries: class scores decide which queries survive before any mask is resized, masks are resized a few at a
time, and the panoptic merge keeps a few maps of the output size whatever the number of kept queries.
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
    (id map [H, W] int32 with 0 for no segment, segments in id order).

    One pass over the kept queries at output size, a few whole-image operations each, written into buffers made
    once: at 12 MP every operation on a full-size map costs milliseconds, and a new 48 MB map costs its page faults.
    """
    kept = keep_queries(probs, object_mask_threshold)
    height, width = geometry.output_size
    device = masks.device
    count = len(kept.index)
    if count == 0:
        return torch.zeros(height, width, dtype=torch.int32, device=device), []

    # Pass 1: the owner of every pixel is the argmax over kept queries of score * sigmoid(mask) (the first index
    # wins ties, as torch.argmax), and whether the pixel is in its owner's own foreground (sigmoid >= 0.5); each
    # query's foreground area and its mean probability there.
    best = torch.full((height, width), -1.0, device=device)
    owner = torch.zeros(height, width, dtype=torch.long, device=device)
    in_owner_foreground = torch.zeros(height, width, dtype=torch.bool, device=device)
    weighted = torch.empty(height, width, device=device)
    better = torch.empty(height, width, dtype=torch.bool, device=device)
    foreground = torch.empty(height, width, dtype=torch.bool, device=device)
    foreground_areas = torch.zeros(count, dtype=torch.long, device=device)
    mask_scores = torch.zeros(count, device=device)
    for start in range(0, count, MASK_CHUNK):
        sigmoid = upsample_masks(masks[kept.index[start : start + MASK_CHUNK]], geometry).sigmoid_()
        for k, prob in enumerate(sigmoid, start):
            torch.mul(kept.score[k], prob, out=weighted)
            torch.gt(weighted, best, out=better)
            torch.fmax(best, weighted, out=best)  # fmax: a NaN probability wins no pixel, as it fails `better`
            owner.masked_fill_(better, k)
            torch.ge(prob, 0.5, out=foreground)
            torch.where(better, foreground, in_owner_foreground, out=in_owner_foreground)
            area = foreground.sum()
            foreground_areas[k] = area
            mask_scores[k] = torch.mul(prob, foreground, out=weighted).sum() / area.clamp(min=1)

    # Pass 2: a query keeps the pixels it owns within its foreground if it owns most of its foreground; stuff
    # labels share one segment.
    owned_areas = torch.bincount(owner.flatten(), minlength=count).tolist()
    kept_areas = torch.bincount(owner[in_owner_foreground], minlength=count).tolist()
    foreground_areas = foreground_areas.tolist()
    segments: list[PanopticSegment] = []
    stuff_segment: dict[int, PanopticSegment] = {}
    segment_of_query = [0] * count
    for k in range(count):
        if min(owned_areas[k], foreground_areas[k], kept_areas[k]) == 0:
            continue
        if owned_areas[k] / foreground_areas[k] < overlap_threshold:
            continue
        label = int(kept.label[k])
        score, mask_score = float(kept.score[k]), float(mask_scores[k])
        if not is_thing[label] and label in stuff_segment:
            segment = stuff_segment[label]
            segment.score = max(segment.score, score)
            segment.mask_score = max(segment.mask_score, mask_score)
        else:
            segment = PanopticSegment(len(segments) + 1, label, is_thing[label], score, mask_score, 0)
            segments.append(segment)
            if not segment.is_thing:
                stuff_segment[label] = segment
        segment.area += kept_areas[k]
        segment_of_query[k] = segment.id
    id_map = torch.tensor(segment_of_query, dtype=torch.int32, device=device)[owner]
    return id_map.masked_fill_(~in_owner_foreground, 0), segments


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
