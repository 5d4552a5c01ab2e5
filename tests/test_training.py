"""Fine-tuning building blocks on a tiny random model: matching, losses, optimisation steps, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xdecoder import Predictor
from xdecoder.evaluation import SegmentationScores
from xdecoder.predictor import PanopticResult, Segment
from xdecoder.training import (
    Augmentation,
    FineTuneConfig,
    FineTuner,
    HungarianMatcher,
    SegmentationTarget,
    label_log_probabilities,
    mask_bce_and_dice,
    pairwise_dice,
    pairwise_mask_bce,
    trainable_parameters,
)

from .helpers import tiny_model

LABELS = ["sky", "ground", "box"]


def scene(height=64, width=96) -> tuple[torch.Tensor, SegmentationTarget]:
    """A sky band, a ground band and a red box: image [3, H, W] uint8 and its three target masks."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (90, 140, 230)
    image[height // 2 :] = (70, 120, 40)
    box = np.zeros((height, width), bool)
    box[height // 3 : 2 * height // 3, width // 4 : width // 2] = True
    image[box] = (200, 30, 30)
    sky = np.zeros((height, width), bool)
    sky[: height // 2] = True
    masks = np.stack([sky & ~box, ~sky & ~box, box])
    return torch.from_numpy(image).permute(2, 0, 1), SegmentationTarget(
        torch.tensor([0, 1, 2]), torch.from_numpy(masks)
    )


def test_matcher_pairs_each_target_with_the_prediction_that_draws_it():
    targets = torch.zeros(2, 32, 32, dtype=torch.bool)
    targets[0, :16] = True  # top half
    targets[1, :, :8] = True  # left quarter
    logits = torch.full((4, 8, 8), -8.0)  # stride 4: 8x8 logits cover the 32x32 input
    logits[3, :4] = 8.0  # prediction 3 draws the top half
    logits[1, :, :2] = 8.0  # prediction 1 draws the left quarter
    class_probs = torch.full((4, 2), 0.5)
    generator = torch.Generator().manual_seed(0)
    predictions, matched = HungarianMatcher(num_points=2000)(class_probs, logits, targets, generator)
    assert dict(zip(predictions.tolist(), matched.tolist(), strict=True)) == {1: 1, 3: 0}


def test_matcher_uses_class_probabilities_when_masks_tie():
    targets = torch.ones(2, 16, 16, dtype=torch.bool)
    logits = torch.full((2, 4, 4), 8.0)
    class_probs = torch.tensor([[0.1, 0.9], [0.9, 0.1]])  # prediction 0 is target 1's class
    predictions, matched = HungarianMatcher(num_points=500)(class_probs, logits, targets)
    assert predictions.tolist() == [0, 1] and matched.tolist() == [1, 0]


def test_pairwise_mask_costs_equal_the_per_pair_losses_on_their_diagonal():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=generator)
    targets = (torch.rand(3, 50, generator=generator) > 0.5).float()
    bce, dice = mask_bce_and_dice(logits, targets)
    torch.testing.assert_close(pairwise_mask_bce(logits, targets).diagonal(), bce)
    torch.testing.assert_close(pairwise_dice(logits, targets).diagonal(), dice)
    perfect = mask_bce_and_dice(targets * 40 - 20, targets)
    assert float(perfect[0].max()) < 1e-6 and float(perfect[1].max()) < 0.05


def test_synonym_texts_add_their_probabilities_into_one_label():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])  # texts: car, automobile, tree, background
    grouped = label_log_probabilities(logits, torch.tensor([0, 0, 1])).exp()
    probs = logits.softmax(dim=-1)
    torch.testing.assert_close(grouped, torch.stack([probs[:, 0] + probs[:, 1], probs[:, 2], probs[:, 3]], dim=1))
    torch.testing.assert_close(label_log_probabilities(logits, None), logits.log_softmax(dim=-1))


def test_targets_are_validated():
    with pytest.raises(ValueError, match=r"labels \[T\] and masks"):
        SegmentationTarget(torch.tensor([0, 1]), torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 prompts but 0 prompt masks"):
        SegmentationTarget(torch.tensor([0]), torch.zeros(1, 8, 8, dtype=torch.bool), prompts=["the sky"])
    model = tiny_model()
    image, target = scene()
    embeddings = Predictor(model).class_embeddings(LABELS)
    with pytest.raises(ValueError, match="target masks"):
        FineTuner(model).step([image[:, :32]], [target], embeddings)
    with pytest.raises(ValueError, match="target label 5"):
        FineTuner(model).step([image], [SegmentationTarget(torch.tensor([5]), target.masks[:1])], embeddings)


def test_fine_tuning_fits_an_image_and_trains_only_the_decoders():
    model = tiny_model()
    image, target = scene()
    embeddings = Predictor(model).class_embeddings(LABELS)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable_parameters(model)}
    trained_before = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    config = FineTuneConfig(learning_rate=1e-3, warmup_steps=1)
    tuner = FineTuner(model, config)

    losses = [tuner.step([image], [target], embeddings)["loss"] for _ in range(25)]

    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    for name, value in model.state_dict().items():
        if name in frozen_before:
            assert torch.equal(value, frozen_before[name]), f"{name} is frozen but changed"
    state = tuner.trained_state()
    assert set(state) == set(trained_before)
    assert not any(k.startswith(("backbone.", "sem_seg_head.predictor.lang_encoder.")) for k in state)
    assert any(k.startswith("sem_seg_head.pixel_decoder.") for k in state)
    changed = [k for k in state if not torch.equal(state[k], trained_before[k])]
    assert len(changed) > 0.8 * len(state)
    assert not model.training  # left ready for inference


def test_grounding_targets_add_the_referring_loss_terms():
    model = tiny_model()
    image, target = scene()
    embeddings = Predictor(model).class_embeddings(LABELS)
    with_prompt = SegmentationTarget(
        target.labels, target.masks, prompts=["the red box"], prompt_masks=target.masks[2:]
    )
    plain = FineTuner(model).step([image], [target], embeddings)
    grounded = FineTuner(tiny_model()).step([image], [with_prompt], embeddings)
    assert "grounding_bce" not in plain
    assert grounded["grounding_bce"] > 0 and grounded["grounding_dice"] > 0 and grounded["grounding_class"] > 0
    panoptic_terms = ("class", "mask_bce", "mask_dice")
    assert grounded["loss"] == pytest.approx(
        sum(grounded[k] for k in panoptic_terms + ("grounding_class", "grounding_bce", "grounding_dice")), rel=1e-5
    )


def test_learning_rate_warms_up_then_decays():
    config = FineTuneConfig(learning_rate=1.0, warmup_steps=4, decay_steps=(10,), decay_factor=0.1)
    assert [config.learning_rate_factor(s) for s in (0, 1, 3, 9, 10)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.1])


def test_scores_give_per_class_iou_panoptic_quality_and_referring_ciou():
    id_map = np.zeros((10, 10), np.int32)
    id_map[:5] = 1  # "sky", exactly the target
    id_map[5:, :5] = 2  # "box", half of the target's box
    id_map[5:, 5:] = 3  # "box" again, on the target's void pixels: no false positive
    segments = [
        Segment(1, "sky", 0, False, 0.9, 0.9, 50),
        Segment(2, "box", 2, True, 0.9, 0.9, 25),
        Segment(3, "box", 2, True, 0.9, 0.9, 25),
    ]
    result = PanopticResult(id_map, segments)
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5] = True  # sky: IoU 1
    masks[1, 5:, :3] = True  # box: 15 of segment 2's 25 pixels; IoU 15 / 25
    masks[2, 5:, 3:5] = True  # ground: 10 pixels, all predicted box
    scores = SegmentationScores(LABELS, stuff={"sky", "ground"})
    scores.add_panoptic(result, torch.tensor([0, 2, 1]), torch.from_numpy(masks))
    # Targets of an image twice the size are compared at the result's size: the same sums again.
    scores.add_panoptic(result, torch.tensor([0, 2, 1]), torch.from_numpy(masks.repeat(2, axis=1).repeat(2, axis=2)))
    summary = scores.summary()
    assert summary["per_class_iou"] == {"sky": 100.0, "ground": 0.0, "box": 60.0}
    assert summary["miou"] == pytest.approx(160 / 3, abs=0.01)
    # PQ: sky matched (IoU 1); box matched at 0.6; ground missed (FN); segment 3 lies on void: not counted.
    assert summary["per_class_pq"] == {"sky": 100.0, "ground": 0.0, "box": 60.0}
    assert summary["pq_things"] == 60.0 and summary["pq_stuff"] == 50.0 and summary["pq"] == pytest.approx(53.33)
    assert summary["referring_ciou"] is None
    scores.add_referring(masks[1:2], torch.from_numpy(masks[1:3].any(axis=0, keepdims=True)))
    assert scores.summary()["referring_ciou"] == pytest.approx(100 * 15 / 25)
    with pytest.raises(ValueError, match="differ in size"):
        scores.add_panoptic(result, torch.tensor([0]), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ in size"):  # smaller, but not of the targets' shape
        scores.add_panoptic(result, torch.tensor([0]), torch.zeros(1, 20, 40, dtype=torch.bool))


def test_augmentation_moves_image_and_masks_alike_and_never_flips_a_sided_prompt():
    image, target = scene(64, 96)
    # Paint each target's pixels in its own colour, so that the augmented image says where the masks must be.
    coloured = torch.zeros_like(image)
    for index, mask in enumerate(target.masks):
        coloured[:, mask] = torch.tensor([80 * (index + 1), 0, 0], dtype=torch.uint8)[:, None]
    with_prompts = SegmentationTarget(target.labels, target.masks, ["the box on the left"], target.masks[2:])
    augment = Augmentation(scale_range=(1.0, 1.5), flip_probability=1.0)
    generator = torch.Generator().manual_seed(0)
    for prompted in (False, True):
        for _ in range(5):
            out_image, out_target = augment(coloured, with_prompts if prompted else target, generator)
            assert out_image.shape[-2:] == out_target.masks.shape[-2:] and out_image.shape[-2:] == (64, 96)
            for index, label in enumerate(out_target.labels.tolist()):
                inside = out_image[0][out_target.masks[index]].float()
                # Nearest masks and a bilinear image disagree only along the borders.
                assert (inside - 80 * (label + 1)).abs().le(2).float().mean() > 0.85
            box = out_target.masks[out_target.labels.tolist().index(2)]
            box_columns = box.any(dim=0).nonzero()[:, 0].float().mean()
            # The box is left of centre in the scene: mirrored, it is right of it, unless a prompt names a side.
            assert (box_columns < 48) == prompted
            if prompted:
                assert out_target.prompts == ["the box on the left"] and torch.equal(out_target.prompt_masks[0], box)
