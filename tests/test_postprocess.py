"""Panoptic, semantic and referring post-processing on hand-made query outputs."""

import torch

from xdecoder import postprocess
from xdecoder.postprocess import Geometry

# No resizing: results at the mask resolution (4x4 masks upsampled to 16x16, like stride 4).
GEOMETRY = Geometry(padded_size=(16, 16), valid_size=(16, 16), output_size=(16, 16))


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities).log()


def half_masks() -> torch.Tensor:
    """Query 0 covers the left half, query 1 the right half, query 2 everything (weakly)."""
    masks = torch.full((3, 4, 4), -10.0)
    masks[0, :, :2] = 10
    masks[1, :, 2:] = 10
    masks[2] = 1.0
    return masks


def test_queries_below_threshold_or_background_are_dropped():
    # labels: 0 = "dog" (thing), 1 = "sky" (stuff), 2 = background
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    kept = postprocess.keep_queries(probs, 0.8)
    assert kept.index.tolist() == [0, 1]
    assert kept.label.tolist() == [0, 1]


def test_panoptic_assigns_each_pixel_to_its_best_query():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.03, 0.95, 0.02], [0.85, 0.1, 0.05]])
    id_map, segments = postprocess.panoptic(probs, half_masks(), [True, False], GEOMETRY, 0.8, 0.8)
    assert [(s.id, s.label_index, s.is_thing) for s in segments] == [(1, 0, True), (2, 1, False)]
    assert (id_map[:, :7] == 1).all() and (id_map[:, 9:] == 2).all()
    assert sum(s.area for s in segments) == int((id_map > 0).sum())
    assert segments[0].area == int((id_map == 1).sum())
    assert 0.99 < segments[0].mask_score <= 1.0  # sigmoid(10) inside its mask
    # Query 2 (weak everywhere) owns nothing and is dropped by the overlap test.
    assert len(segments) == 2


def test_overlap_threshold_drops_queries_that_lose_most_of_their_mask():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.9, 0.05, 0.05]])
    masks = torch.full((2, 4, 4), -10.0)
    masks[0, :, :3] = 10  # query 0: left three quarters
    masks[1, :, 1:] = 10  # query 1: right three quarters, weaker score, loses the overlap
    strict_map, strict = postprocess.panoptic(probs, masks, [True, True], GEOMETRY, 0.8, 0.8)
    loose_map, loose = postprocess.panoptic(probs, masks, [True, True], GEOMETRY, 0.8, 0.3)
    assert len(strict) == 1 and len(loose) == 2
    assert (loose_map == 2).sum() > 0 and (strict_map == 2).sum() == 0


def test_stuff_queries_of_one_label_share_a_segment_and_things_do_not():
    probs = torch.tensor([[0.02, 0.95, 0.03], [0.03, 0.95, 0.02]])
    masks = half_masks()[:2]
    _, stuff = postprocess.panoptic(probs, masks, [True, False], GEOMETRY, 0.8, 0.8)
    assert len(stuff) == 1 and stuff[0].area == 256
    _, things = postprocess.panoptic(probs, masks, [True, True], GEOMETRY, 0.8, 0.8)
    assert len(things) == 2


def test_nothing_kept_gives_an_empty_map():
    probs = torch.tensor([[0.1, 0.1, 0.8]])
    id_map, segments = postprocess.panoptic(probs, half_masks()[:1], [True, True], GEOMETRY, 0.8, 0.8)
    assert segments == [] and int(id_map.sum()) == 0


def test_synonym_probabilities_add_up():
    logits = logits_for([[0.45, 0.45, 0.05, 0.05]])  # texts: car, automobile, sky, background
    grouped = postprocess.group_probabilities(logits, torch.tensor([0, 0, 1]), num_labels=2)
    torch.testing.assert_close(grouped, torch.tensor([[0.9, 0.05, 0.05]]))


def test_semantic_is_the_probability_weighted_mask_vote():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.85, 0.05]])
    labels, scores = postprocess.semantic(probs, half_masks()[:2], GEOMETRY)
    assert (labels[:, :7] == 0).all() and (labels[:, 9:] == 1).all()
    assert (
        abs(float(scores[0, 0]) - (0.9 * torch.sigmoid(torch.tensor(10.0)) + 0.1 * torch.sigmoid(torch.tensor(-10.0))))
        < 1e-5
    )


def test_results_are_resized_to_the_output_size_after_cropping_padding():
    geometry = Geometry(padded_size=(32, 32), valid_size=(16, 32), output_size=(30, 60))
    masks = torch.full((1, 8, 8), -10.0)
    masks[0, :4, 4:] = 10  # right half of the valid (top) part
    resized = postprocess.upsample_masks(masks, geometry)
    assert resized.shape == (1, 30, 60)
    assert (resized[0, :, 35:] > 0).all() and (resized[0, :, :25] < 0).all()


def test_referring_takes_the_most_similar_query():
    similarity = torch.tensor([[1.0, 9.0], [5.0, 2.0], [3.0, 3.0]])  # 3 grounding queries x 2 prompts
    masks = torch.full((3, 4, 4), -5.0)
    masks[1, :2] = 5.0
    masks[0, 2:] = 5.0
    match = postprocess.referring(similarity, masks, GEOMETRY)
    assert match.query.tolist() == [1, 0]
    assert match.similarity.tolist() == [5.0, 9.0]
    torch.testing.assert_close(match.probability, similarity.softmax(dim=0).max(dim=0).values)
    assert match.masks.shape == (2, 16, 16)
    assert match.masks[0, :7].all() and not match.masks[0, 9:].any()
    assert match.masks[1, 9:].all()


def reference_panoptic(probs, masks, is_thing, geometry, object_mask_threshold, overlap_threshold):
    """The official merge written plainly: every kept mask at output size at once, then one query at a time."""
    scores, labels = probs.max(dim=-1)
    keep = (labels != probs.shape[1] - 1) & (scores > object_mask_threshold)
    scores, labels = scores[keep], labels[keep]
    prob_masks = postprocess.upsample_masks(masks[keep], geometry).sigmoid()
    id_map = torch.zeros(geometry.output_size, dtype=torch.int32)
    segments, stuff_segments = [], {}
    owner = (scores[:, None, None] * prob_masks).argmax(0) if len(scores) else None
    for k in range(len(scores)):
        label, score = int(labels[k]), float(scores[k])
        foreground = prob_masks[k] >= 0.5
        mask = (owner == k) & foreground
        owned, area = int((owner == k).sum()), int(foreground.sum())
        if owned == 0 or area == 0 or not mask.any() or owned / area < overlap_threshold:
            continue
        mask_score = float((prob_masks[k] * foreground).sum() / area)
        segment = stuff_segments.get(label) if not is_thing[label] else None
        if segment is None:
            segment = postprocess.PanopticSegment(len(segments) + 1, label, is_thing[label], score, mask_score, 0)
            segments.append(segment)
            if not is_thing[label]:
                stuff_segments[label] = segment
        segment.score, segment.mask_score = max(segment.score, score), max(segment.mask_score, mask_score)
        id_map[mask] = segment.id
    for segment in segments:
        segment.area = int((id_map == segment.id).sum())
    return id_map, segments


def test_panoptic_equals_the_official_merge_on_random_overlapping_blobs():
    """Many kept queries (more than one chunk of masks), overlaps, stuff merging and both thresholds."""
    geometry = Geometry(padded_size=(64, 96), valid_size=(60, 90), output_size=(75, 113))
    things = [bool(label % 2) for label in range(6)]
    seen = []  # is_thing of every segment made
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        probs = (torch.rand(24, 7, generator=generator) * 6).softmax(-1)
        centres = torch.rand(24, 2, 1, 1, generator=generator) * torch.tensor([16.0, 24.0]).view(1, 2, 1, 1)
        rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
        distance = ((rows - centres[:, 0]) ** 2 + (cols - centres[:, 1]) ** 2).sqrt()
        masks = (
            6
            - distance * (0.3 + torch.rand(24, 1, 1, generator=generator))
            + torch.randn(24, 16, 24, generator=generator)
        )
        for object_threshold, overlap_threshold in ((0.0, 0.8), (0.15, 0.8), (0.1, 0.3), (0.0, 0.0)):
            expected_map, expected = reference_panoptic(
                probs, masks, things, geometry, object_threshold, overlap_threshold
            )
            id_map, segments = postprocess.panoptic(probs, masks, things, geometry, object_threshold, overlap_threshold)
            assert torch.equal(id_map, expected_map)
            assert segments == expected
            seen += [segment.is_thing for segment in segments]
    assert seen.count(True) > 30 and seen.count(False) > 30


def test_a_nan_mask_value_wins_no_pixel_and_leaves_the_others_to_the_next_query():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.9, 0.08, 0.02]])
    masks = torch.full((2, 4, 4), 5.0)
    masks[0, 0, 0] = float("nan")  # a broken value (fp16 overflow): resizing spreads it around that corner
    id_map, segments = postprocess.panoptic(probs, masks, [True, True], GEOMETRY, 0.8, 0.0)
    assert (id_map > 0).all()  # where query 0 is NaN, query 1 owns the pixels
    assert [s.area for s in segments] == [int((id_map == 1).sum()), int((id_map == 2).sum())]
    assert 0 < segments[1].area < 256
