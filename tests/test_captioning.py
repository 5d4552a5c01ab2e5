"""Captioning: the incremental greedy decoding against the official loop written plainly, the Predictor's caption
API, one image pass for every task, and models that cannot caption."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_model, write_tiny_checkpoint
from xdecoder import Caption, Predictor, XDecoderConfig, build_model, load_model
from xdecoder.captioning import greedy_captions, reference_greedy_captions
from xdecoder.tokenizer import END_TOKEN, get_tokenizer

LABELS = ["person", "dog", "sky"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, captioning=True)


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor(model, short_side=64, object_mask_threshold=0.0, overlap_threshold=0.0)


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def pixel_pass(model, images):
    """Backbone and pixel decoder on a padded batch of the images (as Predictor prepares them at short side 64)."""
    predictor = Predictor(model, short_side=64)
    tensors = [torch.tensor(predictor.prepare(i).resized).permute(2, 0, 1) for i in images]
    with torch.inference_mode():
        return model.encode_image(model.prepare_images(tensors).pixels)


def test_incremental_decoding_gives_the_official_loops_tokens_and_logits(model):
    """Two images of different sizes in one padded batch, 12 steps without early stop."""
    features = pixel_pass(model, [image(64, 90, seed=1), image(80, 64, seed=2)])
    steps = 12
    reference = reference_greedy_captions(
        model.decoder, features.pixel.multi_scale, features.pixel.mask_features, steps
    )
    with torch.inference_mode():
        context = model.decode(features, None, caption_context=True).caption_context
    ours = greedy_captions(model.decoder, context, steps, stop_at_end=False)
    assert torch.equal(ours.token_buffer, reference.token_buffer)
    # The images lead to different caption embeddings (a random tiny model picks the same tokens for both).
    assert (ours.embeddings[0] - ours.embeddings[1]).abs().max() > 1e-2
    torch.testing.assert_close(ours.embeddings, reference.embeddings, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.token_log_probs, reference.token_log_probs, atol=1e-4, rtol=0)


def model_ending_captions():
    """The tiny captioning model with the end token's embedding turned towards the 4th step's caption embedding, so
    that greedy decoding picks the end token within a few steps."""
    model = tiny_model(seed=4, captioning=True)
    features = pixel_pass(model, [image(64, 64)])
    with torch.inference_mode():
        context = model.decode(features, None, caption_context=True).caption_context
        embedding = greedy_captions(model.decoder, context, 4, stop_at_end=False).embeddings[0, 3]
        table = model.language.lang_encoder.token_embedding.weight
        table[END_TOKEN] = embedding / embedding.norm() * table.norm(dim=1).max() * 50
    return model


def test_decoding_stops_when_every_caption_has_ended_and_the_result_is_unchanged():
    model = model_ending_captions()
    features = pixel_pass(model, [image(64, 64), image(64, 64, seed=3)])
    with torch.inference_mode():
        context = model.decode(features, None, caption_context=True).caption_context
    full = greedy_captions(model.decoder, context, 50, stop_at_end=False)
    early = greedy_captions(model.decoder, context, 50)
    lengths = [full.caption_length(i) for i in range(2)]
    assert max(lengths) < 50, "the end token must be chosen for this test to mean anything"
    assert early.steps == max(lengths)
    for i, length in enumerate(lengths):
        assert early.caption_length(i) == length
        assert int(early.token_buffer[i, length]) == END_TOKEN
        assert torch.equal(early.token_buffer[i, : length + 1], full.token_buffer[i, : length + 1])
        tokenizer = get_tokenizer()
        text = tokenizer.caption_text(full.token_buffer[i].tolist())
        assert tokenizer.caption_text(early.token_buffer[i].tolist()) == text


def test_caption_api_reports_the_official_text_tokens_and_score():
    model = model_ending_captions()
    predictor = Predictor(model, short_side=64)
    caption = predictor.caption(image(64, 64))
    assert isinstance(caption, Caption)
    features = pixel_pass(model, [image(64, 64)])
    reference = reference_greedy_captions(model.decoder, features.pixel.multi_scale, features.pixel.mask_features, 50)
    length = reference.caption_length(0)
    buffer = reference.token_buffer[0].tolist()
    assert caption.token_ids == buffer[1 : length + 1] and caption.token_ids[-1] == END_TOKEN
    assert caption.text == get_tokenizer().caption_text(buffer)
    expected_score = float(reference.token_log_probs[0, :length].mean().exp())
    assert caption.score == pytest.approx(expected_score, abs=1e-5)
    assert 0 < caption.score <= 1


def test_captions_of_a_batch_equal_captions_one_at_a_time(model):
    images = [image(64, 64, seed=5), image(64, 64, seed=6), image(64, 64, seed=7)]  # one size: no padding
    alone = [Predictor(model, short_side=64).caption(i) for i in images]
    together = Predictor(model, short_side=64, batch_size=3).caption(images)
    assert isinstance(together, list) and len(together) == 3
    for caption, expected in zip(together, alone, strict=True):
        assert caption.token_ids == expected.token_ids
        assert caption.score == pytest.approx(expected.score, abs=1e-5)


def test_one_image_pass_serves_panoptic_referring_caption_and_ranking(predictor, monkeypatch):
    picture = image(64, 80, seed=8)
    expected_panoptic = predictor.panoptic(picture, LABELS, stuff={"sky"})
    expected_referring = predictor.referring(picture, ["the dog"])
    expected_caption = predictor.caption(picture)
    expected_ranking = predictor.rank(picture, ["a dog", "a sky"])
    calls = []
    encode = predictor.model.encode_image
    monkeypatch.setattr(predictor.model, "encode_image", lambda pixels: calls.append(1) or encode(pixels))
    both = predictor.predict(
        picture, labels=LABELS, stuff={"sky"}, prompts=["the dog"], caption=True, rank_texts=["a dog", "a sky"]
    )
    assert len(calls) == 1
    assert np.array_equal(both.panoptic.id_map, expected_panoptic.id_map)
    assert np.array_equal(both.referring.masks, expected_referring.masks)
    assert both.caption.token_ids == expected_caption.token_ids and both.caption.text == expected_caption.text
    np.testing.assert_allclose(both.ranking.similarity, expected_ranking.similarity, atol=1e-5)


def test_a_model_that_cannot_caption_says_why():
    model = tiny_model()  # 11 queries
    assert not model.can_caption
    with pytest.raises(ValueError, match="at least 77 queries"):
        Predictor(model, short_side=64).caption(image(64, 64))
    with pytest.raises(ValueError, match="at least 77 queries"):
        Predictor(model, short_side=64).predict(image(64, 64), labels=LABELS, caption=True)


def test_the_official_checkpoint_shapes_can_caption():
    assert build_meta(XDecoderConfig.focalt()).can_caption
    assert build_meta(XDecoderConfig.focall()).can_caption
    without_head = XDecoderConfig.focalt()
    without_head = replace(without_head, decoder=replace(without_head.decoder, captioning=False))
    assert "captioning weights" in build_meta(without_head).caption_support


def build_meta(config):
    with torch.device("meta"):
        return build_model(config)


def test_a_loaded_checkpoint_keeps_the_captioning_weights(tmp_path, model):
    """Official format (plain state dict with self_attn_mask) and ours (safetensors): same caption as in memory."""
    picture = image(64, 64, seed=9)
    expected = Predictor(tiny_model(seed=4, captioning=True), short_side=64).caption(picture)
    for name, fmt in (("tiny.pt", "pt"), ("tiny.safetensors", "safetensors")):
        loaded = load_model(write_tiny_checkpoint(tmp_path / name, seed=4, fmt=fmt, captioning=True), device="cpu")
        assert loaded.can_caption
        assert Predictor(loaded, short_side=64).caption(picture).token_ids == expected.token_ids
