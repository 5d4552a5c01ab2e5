"""The Predictor on a tiny random model: shapes, consistency, one encoding for everything, bad input."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_model
from xdecoder import Predictor

LABELS = ["person", "dog", "car", "sky", "grass-merged"]
STUFF = {"sky", "grass-merged"}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    # Thresholds at 0 so a random model still yields segments to check.
    return Predictor(tiny_model(seed=11), short_side=64, object_mask_threshold=0.0, overlap_threshold=0.0)


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_panoptic_covers_the_original_size_consistently(predictor):
    result = predictor.panoptic(image(37, 53), LABELS, stuff=STUFF)
    assert result.id_map.shape == (37, 53) and result.id_map.dtype == np.int32
    assert result.segments, "thresholds at 0 must keep segments"
    assert [s.id for s in result.segments] == list(range(1, len(result.segments) + 1))
    for segment in result.segments:
        assert segment.label == LABELS[segment.label_index]
        assert segment.is_thing == (segment.label not in STUFF)
        assert segment.area == int((result.id_map == segment.id).sum()) > 0
        assert 0 <= segment.score <= 1 and 0.5 <= segment.mask_score <= 1
    stuff_labels = [s.label for s in result.segments if not s.is_thing]
    assert len(stuff_labels) == len(set(stuff_labels))  # one segment per stuff label
    assert set(np.unique(result.id_map)) <= {0, *[s.id for s in result.segments]}


def test_default_thresholds_apply(predictor):
    strict = Predictor(predictor.model, short_side=64)
    scores = [s.score for s in predictor.panoptic(image(37, 53), LABELS).segments]
    kept = strict.panoptic(image(37, 53), LABELS).segments
    assert all(s.score > 0.8 for s in kept)
    assert len(kept) <= sum(score > 0.8 for score in scores)


def test_semantic_labels_every_pixel(predictor):
    result = predictor.semantic(image(30, 40), LABELS)
    assert result.label_map.shape == (30, 40) and result.score_map.shape == (30, 40)
    assert result.label_map.min() >= 0 and result.label_map.max() < len(LABELS)
    assert result.labels == LABELS


def test_referring_gives_one_mask_per_prompt(predictor):
    result = predictor.referring(image(30, 40), ["the dog on the left", "sky"])
    assert result.masks.shape == (2, 30, 40) and result.masks.dtype == bool
    assert result.scores.shape == (2,) and np.isfinite(result.scores).all()
    assert result.prompts == ["the dog on the left", "sky"]
    assert ((result.matched_query >= 0) & (result.matched_query < 10)).all()


def test_one_call_equals_separate_calls(predictor):
    img = image(33, 47, seed=3)
    both = predictor.predict(img, labels=LABELS, stuff=STUFF, prompts=["a car"])
    alone_panoptic = predictor.panoptic(img, LABELS, stuff=STUFF)
    alone_referring = predictor.referring(img, ["a car"])
    assert np.array_equal(both.panoptic.id_map, alone_panoptic.id_map)
    assert [s.label for s in both.panoptic.segments] == [s.label for s in alone_panoptic.segments]
    assert np.array_equal(both.referring.masks, alone_referring.masks)
    np.testing.assert_allclose(both.referring.scores, alone_referring.scores, rtol=1e-4)


def test_batches_equal_single_images_and_prompt_lists_per_image(predictor):
    batched = Predictor(predictor.model, short_side=64, object_mask_threshold=0.0, overlap_threshold=0.0, batch_size=2)
    images = [image(32, 48, seed=1), image(32, 48, seed=2)]
    prompts = [["a dog", "the grass under the dog"], ["sky"]]
    together = batched.predict(images, labels=LABELS, prompts=prompts)
    for img, image_prompts, result in zip(images, prompts, together, strict=True):
        alone = predictor.predict(img, labels=LABELS, prompts=image_prompts)
        assert np.array_equal(result.panoptic.id_map, alone.panoptic.id_map)
        assert np.array_equal(result.referring.masks, alone.referring.masks)
        np.testing.assert_allclose(result.referring.scores, alone.referring.scores, rtol=1e-4, atol=1e-4)


def test_tiny_and_extreme_images(predictor):
    for size in [(5, 5), (1, 1), (8, 900), (900, 8)]:
        result = predictor.panoptic(image(*size), LABELS)
        assert result.id_map.shape == size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": []}, "nothing to predict"),
        ({"labels": ["dog", "dog"]}, "duplicate"),
        ({"labels": ["dog", ""]}, "non-empty"),
        ({"labels": ["dog", "   "]}, "non-empty"),
        ({"labels": "dog"}, "single string"),
        ({"labels": ["dog"], "stuff": ["sky"]}, "not labels"),
        ({"labels": ["dog"], "synonyms": {"cat": ["kitten"]}}, "not labels"),
        ({"labels": ["dog"], "synonyms": {"dog": [""]}}, "non-empty"),
        ({"prompts": [""]}, "non-empty"),
        ({"prompts": "a dog"}, "single string"),
    ],
)
def test_bad_requests_are_clear_value_errors(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(image(16, 16), **kwargs)


def test_synonyms_map_back_to_their_label(predictor):
    result = predictor.panoptic(image(30, 40), ["Car", "Sky"], stuff={"Sky"}, synonyms={"Car": ["car", "automobile"]})
    assert {s.label for s in result.segments} <= {"Car", "Sky"}
    assert result.segments


def test_long_prompts_are_cut_with_a_warning(predictor, caplog):
    with caplog.at_level(logging.WARNING, logger="xdecoder.tokenizer"):
        result = predictor.referring(image(20, 20), ["a very long prompt " * 30])
    assert result.masks.shape == (1, 20, 20)
    assert "cut to the model's 77" in caplog.text


def test_bfloat16_autocast_runs_on_cpu(predictor):
    fast = Predictor(predictor.model, short_side=64, autocast=torch.bfloat16, object_mask_threshold=0.0)
    result = fast.predict(image(30, 40), labels=LABELS, prompts=["a dog"])
    assert result.panoptic.id_map.shape == (30, 40) and result.referring.masks.shape == (1, 30, 40)


def test_results_of_large_images_are_made_at_most_max_output_pixels_of_the_same_shape(predictor):
    from xdecoder.predictor import output_size

    assert output_size((3000, 4000), 4_000_000) == (1732, 2309)
    assert output_size((300, 400), 4_000_000) == (300, 400) and output_size((3000, 4000), None) == (3000, 4000)
    assert output_size((2, 10_000_000), 4_000_000) == (1, 4_000_000)  # thinner than the scale: one row, no more
    assert output_size((10_000_000, 1), 4_000_000) == (4_000_000, 1)
    picture = image(120, 160, seed=3)
    full = predictor.predict(picture, labels=LABELS, stuff=STUFF, prompts=["a dog"])
    capped_predictor = Predictor(
        predictor.model, short_side=64, object_mask_threshold=0.0, overlap_threshold=0.0, max_output_pixels=4800
    )
    capped = capped_predictor.predict(picture, labels=LABELS, stuff=STUFF, prompts=["a dog"])
    assert capped.panoptic.id_map.shape == (60, 80) and capped.referring.masks.shape == (1, 60, 80)
    # The same segments, merged at half the size: the full map's pixel under each small pixel mostly agrees (a
    # random model's map of a noise image is mostly borders, where the two may differ).
    assert [(s.label, s.is_thing) for s in capped.panoptic.segments] == [
        (s.label, s.is_thing) for s in full.panoptic.segments
    ]
    assert np.mean(capped.panoptic.id_map == full.panoptic.id_map[1::2, 1::2]) > 0.9
    assert np.mean(capped.referring.masks == full.referring.masks[:, 1::2, 1::2]) > 0.9
    with pytest.raises(ValueError, match="max_output_pixels"):
        Predictor(predictor.model, max_output_pixels=0)


def test_images_prepared_ahead_give_the_same_results(predictor):
    picture = image(40, 60, seed=4)
    prepared = predictor.prepare(picture)
    assert prepared.image_size == (40, 60) and prepared.output_size == (40, 60)
    assert prepared.resized.shape == (64, 96, 3)  # short side 64
    direct = predictor.panoptic(picture, LABELS, stuff=STUFF)
    ahead = predictor.panoptic(prepared, LABELS, stuff=STUFF)
    assert np.array_equal(direct.id_map, ahead.id_map) and direct.segments == ahead.segments
    other = Predictor(predictor.model, short_side=32)
    with pytest.raises(ValueError, match="prepared by a Predictor with another"):
        other.panoptic(prepared, LABELS)
