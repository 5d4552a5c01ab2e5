"""Image-level scores on a tiny random model: ranking texts (the official retrieval ensemble) and classification
(the class query's logits). Their numbers against the official code are checked by tests/test_parity.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_model
from xdecoder import Predictor, TextRanking

TEXTS = ["a dog on the grass", "a red car", "the sky at night", "a person"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(seed=6), short_side=64)


def image(seed: int = 0, height: int = 64, width: int = 80) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_ranking_is_a_softmax_of_the_scaled_similarity(predictor):
    ranking = predictor.rank(image(), TEXTS)
    assert isinstance(ranking, TextRanking) and ranking.texts == TEXTS
    assert ranking.similarity.shape == ranking.probabilities.shape == (len(TEXTS),)
    assert ranking.similarity.dtype == ranking.probabilities.dtype == np.float32
    assert np.all(np.abs(ranking.similarity) <= 1)  # the mean of two cosines
    scale = min(float(np.exp(predictor.model.language.logit_scale.item())), 100.0)
    logits = ranking.similarity.astype(np.float64) * scale
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(ranking.probabilities, expected, atol=1e-6)


def test_a_text_scores_the_same_whatever_else_is_ranked(predictor):
    picture = image(1)
    full = predictor.rank(picture, TEXTS)
    reordered = predictor.rank(picture, TEXTS[::-1][:3])
    np.testing.assert_allclose(reordered.similarity, full.similarity[::-1][:3], atol=1e-6)


def test_ranking_depends_on_the_image(predictor):
    first, second = predictor.rank([image(2), image(3)], TEXTS)
    assert np.abs(first.similarity - second.similarity).max() > 1e-3


def test_classification_sums_synonyms_and_leaves_background_out(predictor):
    picture = image(4)
    per_text = predictor.classify(picture, ["puppy", "dog", "car"])
    assert per_text.shape == (3,) and per_text.dtype == np.float32
    assert per_text.sum() == pytest.approx(1, abs=1e-6)
    grouped = predictor.classify(picture, ["dog", "car"], synonyms={"dog": ["puppy", "dog"]})
    np.testing.assert_allclose(grouped, [per_text[0] + per_text[1], per_text[2]], atol=1e-6)


def test_one_pass_gives_the_same_scores_as_the_convenience_calls(predictor):
    picture = image(5)
    both = predictor.predict(picture, labels=["dog", "car"], classify=True, rank_texts=TEXTS)
    np.testing.assert_allclose(both.classification, predictor.classify(picture, ["dog", "car"]), atol=1e-6)
    np.testing.assert_allclose(both.ranking.similarity, predictor.rank(picture, TEXTS).similarity, atol=1e-6)
    assert both.panoptic is not None and both.caption is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.rank(image(), "a dog"), "not a single string"),
        (lambda p: p.rank(image(), ["a dog", " "]), "non-empty strings"),
        (lambda p: p.predict(image(), classify=True, rank_texts=["a dog"]), "labels are required"),
        (lambda p: p.predict(image()), "nothing to predict"),
    ],
)
def test_bad_input_is_a_clear_error(predictor, call, message):
    with pytest.raises(ValueError, match=message):
        call(predictor)


def test_scores_are_float32_under_bfloat16_autocast():
    model = tiny_model(seed=6, captioning=True)
    picture = image(6)
    plain = Predictor(model, short_side=64).predict(picture, labels=["dog", "car"], classify=True, rank_texts=TEXTS)
    low = Predictor(model, short_side=64, autocast=torch.bfloat16).predict(
        picture, labels=["dog", "car"], classify=True, rank_texts=TEXTS, caption=True
    )
    assert low.ranking.similarity.dtype == low.ranking.probabilities.dtype == low.classification.dtype == np.float32
    np.testing.assert_allclose(low.ranking.similarity, plain.ranking.similarity, atol=2e-2)
    assert 0 < low.caption.score <= 1 and low.caption.token_ids
