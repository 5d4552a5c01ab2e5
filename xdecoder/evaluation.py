"""Scores of predictions against target masks, accumulated over a set of images: per-class IoU and their mean,
panoptic quality (PQ, with its things and stuff parts) and referring cIoU.

* per-class IoU: pixels of the class in both the prediction (the label of the panoptic segment that owns the pixel)
  and the target, over pixels in either, summed over all images; pixels no target mask covers (void) are left out.
  The mean is over the classes with target pixels.
* PQ (Kirillov et al.): per class, a predicted and a target segment match when their IoU exceeds 0.5;
  PQ = sum of matched IoUs / (TP + FP/2 + FN/2). A predicted segment lying mostly (over half) on void is no false
  positive, and void pixels are not part of a match's union. PQ is the mean over the classes with a segment in
  the targets or the predictions; its things and stuff parts the means over those classes of each kind.
* referring cIoU: the intersection of every prompt's predicted and target mask, summed, over their union, summed.

Targets may be larger than the predictions (results made at a reduced size): they are then resized to the
prediction's size, nearest pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .image import nearest_indices
from .predictor import PanopticResult

VOID = -1
MATCH_IOU = 0.5


def masks_at(masks: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Target masks [T, h, w] -> bool [T, H, W] at a prediction's `size` (nearest pixel), which may be smaller than
    the targets but must have their shape (each side rounded to whole pixels)."""
    height, width = size
    if masks.shape[1:] != (height, width):
        scales = height / masks.shape[1], width / masks.shape[2]
        if max(scales) > 1 or abs(scales[0] - scales[1]) > 1 / height + 1 / width:
            raise ValueError(f"target masks {tuple(masks.shape[1:])} and prediction {(height, width)} differ in size")
        rows = torch.from_numpy(nearest_indices(masks.shape[1], height)).to(masks.device)
        cols = torch.from_numpy(nearest_indices(masks.shape[2], width)).to(masks.device)
        masks = masks[:, rows[:, None], cols]
    return masks.cpu().numpy().astype(bool)


@dataclass
class SegmentationScores:
    """Running sums over images. labels: the names `add_panoptic`'s target label indices point to; stuff: those of
    them that are amorphous (one segment per label)."""

    labels: Sequence[str]
    stuff: frozenset[str] = frozenset()
    intersection: np.ndarray = field(init=False)  # [L] pixels
    union: np.ndarray = field(init=False)  # [L] pixels
    target_pixels: np.ndarray = field(init=False)  # [L]
    matched_iou: np.ndarray = field(init=False)  # [L] sum of the IoUs of PQ's true positives
    true_positives: np.ndarray = field(init=False)  # [L]
    false_positives: np.ndarray = field(init=False)  # [L]
    false_negatives: np.ndarray = field(init=False)  # [L]
    referring_intersection: int = 0
    referring_union: int = 0
    referring_prompts: int = 0

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        self.stuff = frozenset(self.stuff)
        for name in ("intersection", "union", "target_pixels", "true_positives", "false_positives", "false_negatives"):
            setattr(self, name, np.zeros(len(self.labels), np.int64))
        self.matched_iou = np.zeros(len(self.labels), np.float64)

    def add_panoptic(self, result: PanopticResult, target_labels: Tensor, target_masks: Tensor) -> None:
        """One image: its panoptic result and its targets (labels [T] into `labels`, masks [T, h, w] bool, one
        segment each; where masks overlap, the later one counts)."""
        num_labels = len(self.labels)
        masks = masks_at(target_masks, result.id_map.shape)
        target_ids = np.zeros(result.id_map.shape, np.int64)  # 0: void, t + 1: target mask t
        for index, mask in enumerate(masks):
            target_ids[mask] = index + 1
        target_class = np.asarray([VOID, *target_labels.tolist()], np.int64)
        segment_class = {s.id: self.labels.index(s.label) for s in result.segments}
        predicted_ids = result.id_map.astype(np.int64)

        # Semantic IoU: every non-void target pixel against the class of the segment that owns it.
        semantic_target = target_class[target_ids]
        semantic_prediction = np.full(predicted_ids.shape, VOID, np.int64)
        for segment_id, label_index in segment_class.items():
            semantic_prediction[predicted_ids == segment_id] = label_index
        valid = semantic_target != VOID
        wanted, got = semantic_target[valid], semantic_prediction[valid]
        hits = np.bincount(wanted[wanted == got], minlength=num_labels)
        in_target = np.bincount(wanted, minlength=num_labels)
        in_prediction = np.bincount(got[got != VOID], minlength=num_labels)
        self.intersection += hits
        self.union += in_target + in_prediction - hits
        self.target_pixels += in_target

        # PQ: overlaps of every (target, predicted) segment pair, from one histogram of pixel pairs.
        stride = int(predicted_ids.max()) + 1
        pairs, counts = np.unique(target_ids * stride + predicted_ids, return_counts=True)
        overlap = dict(zip(pairs.tolist(), counts.tolist(), strict=True))
        target_area = np.bincount(target_ids.ravel(), minlength=len(masks) + 1)
        predicted_area = {s: int((predicted_ids == s).sum()) for s in segment_class}
        matched_targets, matched_segments = set(), set()
        for t in range(1, len(masks) + 1):
            for s, label_index in segment_class.items():
                if label_index != target_class[t] or (t * stride + s) not in overlap:
                    continue
                shared = overlap[t * stride + s]
                on_void = overlap.get(s, 0)  # target id 0
                iou = shared / (target_area[t] + predicted_area[s] - shared - on_void)
                if iou > MATCH_IOU:  # at most one match each: segments and targets do not overlap themselves
                    matched_targets.add(t)
                    matched_segments.add(s)
                    self.true_positives[label_index] += 1
                    self.matched_iou[label_index] += iou
        for t in range(1, len(masks) + 1):
            if t not in matched_targets and target_area[t] > 0:
                self.false_negatives[target_class[t]] += 1
        for s, label_index in segment_class.items():
            if s not in matched_segments and overlap.get(s, 0) <= MATCH_IOU * predicted_area[s]:
                self.false_positives[label_index] += 1

    def add_referring(self, predicted: np.ndarray, target_masks: Tensor) -> None:
        """One image's referring masks: predicted [P, H, W] bool against the prompts' target masks [P, h, w]."""
        wanted = masks_at(target_masks, predicted.shape[1:])
        self.referring_intersection += int((predicted & wanted).sum())
        self.referring_union += int((predicted | wanted).sum())
        self.referring_prompts += len(wanted)

    def summary(self) -> dict:
        """Figures in IoU points (0-100): per_class_iou {label: IoU} of the classes with target pixels, miou (their
        mean), pq, pq_things, pq_stuff (None where no class of that kind has a segment), per_class_pq, and
        referring_ciou (None without prompts)."""
        scored = np.flatnonzero(self.target_pixels)
        per_class_iou = {self.labels[i]: 100.0 * self.intersection[i] / self.union[i] for i in scored}
        counted = self.true_positives + 0.5 * (self.false_positives + self.false_negatives)
        with np.errstate(invalid="ignore", divide="ignore"):
            quality = 100.0 * self.matched_iou / counted
        present = [i for i in range(len(self.labels)) if counted[i] > 0]
        things = [i for i in present if self.labels[i] not in self.stuff]
        stuff = [i for i in present if self.labels[i] in self.stuff]

        def mean(indices: list[int]) -> float | None:
            return round(float(np.mean(quality[indices])), 2) if indices else None

        return {
            "per_class_iou": {label: round(float(iou), 2) for label, iou in per_class_iou.items()},
            "miou": round(float(np.mean(list(per_class_iou.values()))), 2) if per_class_iou else None,
            "pq": mean(present),
            "pq_things": mean(things),
            "pq_stuff": mean(stuff),
            "per_class_pq": {self.labels[i]: round(float(quality[i]), 2) for i in present},
            "referring_ciou": (
                round(100.0 * self.referring_intersection / max(self.referring_union, 1), 2)
                if self.referring_prompts
                else None
            ),
        }
