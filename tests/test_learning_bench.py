"""The synthetic world of `xdecoder-ls bench learning` and the bench's corrections (the bench itself takes minutes:
docs/learning.md has its figures; the gate on real training is tested in test_finetune.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backend.brush import polygon_to_mask
from backend.finetune import usable_examples
from backend.images import ImageFetchError
from backend.label_config import PanopticVocabulary, ProjectSpec
from bench.learning import bad_corrections, corrections_of
from bench.synthetic_world import LABEL_CONFIG, LABELS, PRETRAIN, SHIFTED, STUFF, THINGS, make_scenes


@pytest.mark.parametrize("domain", [PRETRAIN, SHIFTED])
def test_scenes_have_touching_things_of_two_classes_on_two_textured_stuffs(domain):
    scenes = make_scenes(3, 30, domain)
    targets = [scene.target() for scene in scenes]
    labels = [LABELS[i] for target in targets for i in target.labels.tolist()]
    assert set(labels) == set(LABELS)
    assert all(sum(LABELS[i] in THINGS for i in t.labels.tolist()) >= 1 for t in targets)
    several = [t for t in targets if sum(LABELS[i] in THINGS for i in t.labels.tolist()) >= 3]
    assert len(several) >= 5
    # Things drawn over or against one another: pixels drawn by two thing regions, or touching thing targets.
    overlapping = 0
    for scene in scenes:
        drawn = [
            polygon_to_mask(r["value"]["points"], 96, 96)
            for r in scene.regions
            if r["value"]["polygonlabels"][0] in THINGS
        ]
        overlapping += int(np.sum(drawn, axis=0).max() >= 2)
    assert overlapping >= 3
    for target in targets:
        assert int(target.masks.sum(dim=0).max()) == 1  # one owner per pixel
    # Textures: within one stuff mask the pixels vary far more than noise around a flat colour would.
    grass = targets[0].masks[targets[0].labels.tolist().index(0)].numpy()
    assert scenes[0].image[grass].std(axis=0).mean() > 15
    assert any(t.prompts for t in targets) and all(
        p in ("the leftmost ball", "the biggest brick") for t in targets for p in t.prompts
    )


def test_scenes_are_seeded_and_the_shifted_world_looks_different():
    first, again = make_scenes(5, 3, SHIFTED), make_scenes(5, 3, SHIFTED)
    assert all(np.array_equal(a.image, b.image) and a.regions == b.regions for a, b in zip(first, again, strict=True))
    pretrain, shifted = make_scenes(5, 20, PRETRAIN), make_scenes(5, 20, SHIFTED)
    thing_share = [np.mean([s.target().labels.ge(len(STUFF)).sum() for s in scenes]) for scenes in (pretrain, shifted)]
    assert thing_share[1] > thing_share[0] + 1  # more things per image after the shift
    colours = [np.mean([s.image.reshape(-1, 3).mean(axis=0) for s in scenes], axis=0) for scenes in (pretrain, shifted)]
    assert np.abs(colours[0] - colours[1]).max() > 10


def test_bad_and_shuffled_corrections_are_what_the_bench_says():
    spec = ProjectSpec.parse(LABEL_CONFIG)
    vocabulary = PanopticVocabulary.of(spec.images[0].controls)
    scenes = make_scenes(0, 5, SHIFTED)
    images = {f"scene-{i + 1}.png": Image.fromarray(s.image) for i, s in enumerate(scenes)}

    def fetch(url, task_id):
        if url not in images:
            raise ImageFetchError("not_found", f"{url}: HTTP 404")
        return images[url]

    examples, unusable = usable_examples(
        corrections_of(scenes[:4], 1) + bad_corrections(scenes[4], 5), spec, vocabulary, fetch
    )
    assert len(examples) == 4
    assert "'meadow' is no longer a label" in unusable[5] and "no polygon or brush regions" in unusable[6]
    assert "image unavailable" in unusable[7] and len(unusable) == 3

    shuffled, _ = usable_examples(corrections_of(scenes[:4], 1, np.random.default_rng(0)), spec, vocabulary, fetch)
    same = [np.array_equal(a.target.labels, b.target.labels) for a, b in zip(examples, shuffled, strict=True)]
    assert not all(same)
