"""Tokenizer and text embeddings: official ids, truncation, the template ensemble, the cache."""

import logging

import torch

from tests.helpers import tiny_model
from xdecoder.templates import PROMPT_TEMPLATES
from xdecoder.text import (
    ClassEmbeddingCache,
    class_name_embeddings,
    clean_class_name,
    language_fingerprint,
    prompt_embeddings,
    shared_prefix_pooled,
)
from xdecoder.tokenizer import END_TOKEN, START_TOKEN, get_tokenizer

# Ids of openai/clip-vit-base-patch32's tokenizer (as recorded from the official pipeline).
KNOWN_IDS = {
    "A photo of a DOG.": [START_TOKEN, 320, 1125, 539, 320, 1929, 269, END_TOKEN],
    "grass-merged": [START_TOKEN, 5922, 268, 46492, END_TOKEN],
    "café naïve résumé – “quotes” ‘single’ …": [
        START_TOKEN,
        15304,
        1097,
        35689,
        563,
        29106,
        7054,
        4166,
        1224,
        257,
        5808,
        257,
        568,
        17005,
        262,
        959,
        END_TOKEN,
    ],  # fmt: skip
}


def test_tokenizer_gives_the_official_ids_offline():
    tokenizer = get_tokenizer()
    ids, mask = tokenizer(list(KNOWN_IDS))
    assert ids.shape == (3, 77) and ids.dtype == torch.int64
    for row, expected in zip(ids.tolist(), KNOWN_IDS.values(), strict=True):
        assert row[: len(expected)] == expected
        assert set(row[len(expected) :]) == {END_TOKEN}  # padded with the end token
    assert mask.sum(dim=1).tolist() == [len(v) for v in KNOWN_IDS.values()]


def test_long_text_is_cut_keeping_the_end_token_and_warns(caplog):
    tokenizer = get_tokenizer()
    with caplog.at_level(logging.WARNING, logger="xdecoder.tokenizer"):
        ids, mask = tokenizer(["dog " * 100, "a short one"])
    assert ids[0, 0] == START_TOKEN and ids[0, 76] == END_TOKEN and mask[0].sum() == 77
    assert "cut to the model's 77" in caplog.text
    assert caplog.text.count("cut to") == 1  # the short text is not reported


def test_class_name_cleaning():
    assert clean_class_name("wall-other-merged") == "wall"
    assert clean_class_name("grass-merged") == "grass"
    assert clean_class_name("playingfield") == "playingfield"


def test_shared_prefix_encoding_equals_encoding_each_text_alone():
    model = tiny_model(seed=4)
    tokenizer = get_tokenizer()
    names = ["dog", "traffic light", "sky"]
    texts = [t.format(n) for t in PROMPT_TEMPLATES[:12] for n in names]
    ids, _ = tokenizer(texts)
    fast = shared_prefix_pooled(model.language, ids.view(12, 3, -1)).flatten(0, 1)
    with torch.inference_mode():
        _, slow = model.language.encode(ids)  # every text alone, full 77 tokens
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)


def test_class_embeddings_are_the_normalised_template_mean():
    model = tiny_model(seed=4)
    tokenizer = get_tokenizer()
    embeddings = class_name_embeddings(model.language, tokenizer, ["dog", "sky-other"])
    assert embeddings.shape == (2, 64)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    texts = [t.format("dog") for t in PROMPT_TEMPLATES]
    with torch.inference_mode():
        _, pooled = model.language.encode(tokenizer(texts)[0])
    pooled = pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-7)
    mean = pooled.mean(dim=0)
    torch.testing.assert_close(embeddings[0], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_prompt_embeddings_keep_start_to_end_tokens():
    model = tiny_model(seed=5)
    prompts = ["the dog on the left", "sky"]
    result = prompt_embeddings(model.language, get_tokenizer(), prompts)
    assert [len(t) for t in result.tokens] == [7, 3]  # start + words + end
    assert result.concatenated().shape == (10, 64)
    torch.testing.assert_close(result.pooled[1], result.tokens[1][-1])  # pooled = end token


def test_cache_computes_each_name_once(monkeypatch):
    model = tiny_model(seed=6)
    tokenizer = get_tokenizer()
    cache = ClassEmbeddingCache()
    computed = []
    real = class_name_embeddings

    def counting(encoder, tok, names):
        computed.append(list(names))
        return real(encoder, tok, names)

    monkeypatch.setattr("xdecoder.text.class_name_embeddings", counting)
    fingerprint = language_fingerprint(model.language)
    first = cache.get(fingerprint, model.language, tokenizer, ["dog", "cat"])
    second = cache.get(fingerprint, model.language, tokenizer, ["cat", "wall-other", "dog"])
    assert computed == [["dog", "cat"], ["wall"]]
    torch.testing.assert_close(second[0], first[1])
    torch.testing.assert_close(second[2], first[0])


def test_fingerprint_follows_the_weights():
    model = tiny_model(seed=7)
    before = language_fingerprint(model.language)
    assert language_fingerprint(tiny_model(seed=7).language) == before
    with torch.no_grad():
        model.language.lang_proj[0, 0] += 1
    assert language_fingerprint(model.language) != before
