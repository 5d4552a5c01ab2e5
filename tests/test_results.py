"""Results from predictions: regions from maps smaller than the image (XDECODER_RESULT_MAX_PIXELS), BitmaskLabels
PNGs, captions, choices from a ranking, and the task score with them."""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest
import shapely

from backend.brush import png_data_url_to_mask, rle_to_mask
from backend.label_config import ProjectSpec
from backend.polygons import PolygonOptions
from backend.results import (
    ChoicePolicy,
    ReferringRegion,
    RegionIds,
    caption_results,
    choices_results,
    image_regions,
    rank_texts,
    task_score,
)
from xdecoder import Caption, Prediction, TextRanking
from xdecoder.predictor import PanopticResult, Segment

LABELS = '<Label value="Sky"/><Label value="Car"/><Label value="Dot"/>'
CONFIG = f"""<View><Image name="image" value="$image"/>
<PolygonLabels name="outline" toName="image">{LABELS}</PolygonLabels>
<BrushLabels name="paint" toName="image">{LABELS}</BrushLabels>
<BitmaskLabels name="bitmask" toName="image">{LABELS}</BitmaskLabels>
</View>"""


def regions_for(id_map: np.ndarray, segments: list[Segment], image_size, referring=(), min_area_px: float = 16):
    image = ProjectSpec.parse(CONFIG).images[0]
    prediction = Prediction(panoptic=PanopticResult(id_map, segments))
    options = PolygonOptions(tolerance_px=0, min_area_px=min_area_px)
    return image_regions(image, image_size, list(image.controls), prediction, list(referring), RegionIds(1, "image"),
                         options)  # fmt: skip


def polygon_area_px(region: dict, image_size) -> float:
    height, width = image_size
    points = [(x * width / 100, y * height / 100) for x, y in region["value"]["points"]]
    return shapely.Polygon(points).area


def test_a_half_size_map_gives_regions_of_the_whole_image():
    id_map = np.zeros((10, 16), np.int32)
    id_map[:5] = 1  # sky: the top half
    id_map[6:9, 2:6] = 2  # car: 12 map pixels, 48 of the image
    id_map[8, 10:13] = 3  # dot: 3 map pixels, 12 of the image, under the minimum area of 16
    segments = [
        Segment(1, "Sky", 0, False, 0.9, 0.9, 80),
        Segment(2, "Car", 1, True, 0.8, 0.9, 12),
        Segment(3, "Dot", 2, True, 0.8, 0.9, 3),
    ]
    mask = np.zeros((10, 16), bool)
    mask[1:4, 8:15] = True
    prompt = ReferringRegion(mask, "Car", "the car on the right", 0.7)
    regions = regions_for(id_map, segments, (20, 32), [prompt])

    assert {(r["original_width"], r["original_height"]) for r in regions} == {(32, 20)}
    polygons = {r["value"]["polygonlabels"][0]: r for r in regions if r["type"] == "polygonlabels" and "meta" not in r}
    assert set(polygons) == {"Sky", "Car"}  # the dot is under the minimum area, counted in pixels of the image
    assert polygon_area_px(polygons["Sky"], (20, 32)) == 32 * 10
    assert polygon_area_px(polygons["Car"], (20, 32)) == 48
    xs, ys = zip(*polygons["Car"]["value"]["points"], strict=True)
    assert (min(xs), max(xs), min(ys), max(ys)) == (12.5, 37.5, 60.0, 90.0)
    prompted = [r for r in regions if r["type"] == "polygonlabels" and "meta" in r]
    assert [polygon_area_px(r, (20, 32)) for r in prompted] == [4 * 3 * 7]

    # Brush masks are painted on the image: each image pixel takes the map pixel under its centre.
    painted = {
        r["value"]["brushlabels"][0] + ("*" if "meta" in r else ""): r for r in regions if r["type"] == "brushlabels"
    }
    bitmasks = {
        r["value"]["bitmasklabels"][0] + ("*" if "meta" in r else ""): r
        for r in regions
        if r["type"] == "bitmasklabels"
    }
    for name, expected in (("Sky", id_map == 1), ("Car", id_map == 2), ("Dot", id_map == 3), ("Car*", mask)):
        expected = np.kron(expected, np.ones((2, 2), bool))
        assert np.array_equal(rle_to_mask(painted[name]["value"]["rle"], 20, 32), expected), name
        # BitmaskLabels get the same pixels as a PNG of the image's size, with the same label, score and prompt.
        bitmask = bitmasks[name]
        assert np.array_equal(png_data_url_to_mask(bitmask["value"]["imageDataURL"], 20, 32), expected), name
        assert set(bitmask["value"]) == {"imageDataURL", "bitmasklabels"}
        assert (bitmask["from_name"], bitmask["to_name"], bitmask["original_width"], bitmask["original_height"]) == (
            "bitmask",
            "image",
            32,
            20,
        )
        assert (bitmask["score"], bitmask.get("meta")) == (painted[name]["score"], painted[name].get("meta"))


def test_maps_at_the_image_size_are_used_as_they_are():
    id_map = np.zeros((20, 32), np.int32)
    id_map[12:15, 20:24] = 1  # 12 pixels: under the minimum area
    id_map[2:8, 2:8] = 2
    segments = [Segment(1, "Dot", 2, True, 0.8, 0.9, 12), Segment(2, "Car", 1, True, 0.8, 0.9, 36)]
    regions = regions_for(id_map, segments, (20, 32))
    polygons = [r for r in regions if r["type"] == "polygonlabels"]
    assert [(r["value"]["polygonlabels"], polygon_area_px(r, (20, 32))) for r in polygons] == [(["Car"], 36)]
    brush = [r for r in regions if r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Dot"]]
    assert np.array_equal(rle_to_mask(brush[0]["value"]["rle"], 20, 32), id_map == 1)


def test_brush_masks_of_any_map_size_take_the_map_pixel_under_each_image_pixels_centre():
    image_size, map_size = (69, 292), (22, 93)  # centres fall exactly on map borders at some rows
    id_map = np.random.default_rng(5).integers(0, 3, map_size).astype(np.int32)
    segments = [Segment(1, "Sky", 0, False, 0.9, 0.9, 0), Segment(2, "Car", 1, True, 0.8, 0.9, 0)]
    regions = regions_for(id_map, segments, image_size)
    rows = [int((i + Fraction(1, 2)) * map_size[0] / image_size[0]) for i in range(image_size[0])]
    cols = [int((j + Fraction(1, 2)) * map_size[1] / image_size[1]) for j in range(image_size[1])]
    for region in (r for r in regions if r["type"] == "brushlabels"):
        segment_id = 1 if region["value"]["brushlabels"] == ["Sky"] else 2
        expected = id_map[np.ix_(rows, cols)] == segment_id
        assert np.array_equal(rle_to_mask(region["value"]["rle"], *image_size), expected)


TEXT_CONFIG = """<View><Image name="image" value="$image"/>
<TextArea name="caption" toName="image"/><TextArea name="summary" toName="image"/>
<Choices name="scene" toName="image">
  <Choice value="Indoor" predicted_values="a room,a kitchen"/><Choice value="Outdoor" alias="out"/>
</Choices>
<Choices name="tags" toName="image" choice="multiple">
  <Choice value="Dog"/><Choice value="Cat"/><Choice value="Car"/><Choice value="Outdoor"/>
</Choices>
<Choices name="options" toName="image" value="$options"/>
</View>"""


def text_image():
    return ProjectSpec.parse(TEXT_CONFIG).images[0]


def test_every_caption_text_area_gets_the_caption_with_its_score():
    results = caption_results(text_image(), Caption("a dog on a sofa", [1, 2, 3], 0.4321234), RegionIds(7, "image"))

    assert [(r["from_name"], r["to_name"], r["type"], r["score"], r["value"]) for r in results] == [
        ("caption", "image", "textarea", 0.432123, {"text": ["a dog on a sofa"]}),
        ("summary", "image", "textarea", 0.432123, {"text": ["a dog on a sofa"]}),
    ]
    assert len({r["id"] for r in results}) == 2
    assert caption_results(text_image(), Caption("", [2], 0.9), RegionIds(7, "image")) == []
    assert caption_results(text_image(), None, RegionIds(7, "image")) == []


def ranking(probabilities: dict[str, float]) -> TextRanking:
    texts = list(probabilities)
    values = np.array(list(probabilities.values()), np.float32)
    return TextRanking(texts, np.log(values), values)


def test_choices_sum_their_texts_probabilities_and_renormalise_over_their_control():
    image = text_image()
    data = {"options": [{"value": "Red", "predicted_values": "red,crimson"}, "Blue"]}
    texts = rank_texts(image, data)
    # Each text once, in control and choice order: "Outdoor" is a text of scene and of tags.
    assert texts == ["a room", "a kitchen", "Outdoor", "Dog", "Cat", "Car", "red", "crimson", "Blue"]
    probabilities = dict(zip(texts, [0.05, 0.1, 0.1, 0.3, 0.2, 0.05, 0.1, 0.05, 0.1], strict=True))
    policy = ChoicePolicy(top_k=3, min_probability=0.2)

    scene, tags, options = choices_results(image, data, ranking(probabilities), RegionIds(1, "image"), policy)

    # scene: Indoor 0.05 + 0.1 (its two texts) against Outdoor 0.1.
    assert (scene["from_name"], scene["type"], scene["value"], scene["score"]) == (
        "scene",
        "choices",
        {"choices": ["Indoor"]},
        0.6,
    )
    # tags, multiple: Dog 0.4, Cat 0.2667, Outdoor 0.1333, Car 0.0667 -> the two at least 0.2, most probable first.
    assert tags["value"] == {"choices": ["Dog", "Cat"]}
    assert tags["score"] == pytest.approx(0.3 / 0.65 + 0.2 / 0.65, abs=1e-6)
    # dynamic: Red 0.15 against Blue 0.1.
    assert (options["value"], options["score"]) == ({"choices": ["Red"]}, 0.6)


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [
        (ChoicePolicy(top_k=1, min_probability=0.0), ["Dog"]),
        (ChoicePolicy(top_k=4, min_probability=0.0), ["Dog", "Cat", "Outdoor", "Car"]),
        (ChoicePolicy(top_k=4, min_probability=0.9), ["Dog"]),  # none reaches it: the most probable one still
    ],
)
def test_multiple_choice_takes_the_top_k_above_the_threshold(policy, chosen):
    probabilities = {"a room": 0.1, "a kitchen": 0.1, "Outdoor": 0.1, "Dog": 0.3, "Cat": 0.2, "Car": 0.05}
    _, tags = choices_results(text_image(), {}, ranking(probabilities), RegionIds(1, "image"), policy)
    assert tags["value"]["choices"] == chosen


def test_a_blank_choice_is_not_ranked_and_never_wins():
    (image,) = ProjectSpec.parse(
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value=" "/><Choice value="Dog"/></Choices></View>'
    ).images
    assert rank_texts(image, {}) == ["Dog"]
    (result,) = choices_results(image, {}, ranking({"Dog": 0.3}), RegionIds(1, "image"), ChoicePolicy(1, 0))
    assert (result["value"], result["score"]) == ({"choices": ["Dog"]}, 1.0)


def test_the_alias_is_what_a_choice_stores(caplog):
    probabilities = {"a room": 0.1, "a kitchen": 0.1, "Outdoor": 0.6, "Dog": 0.1, "Cat": 0.05, "Car": 0.05}
    with caplog.at_level(logging.WARNING):
        results = choices_results(text_image(), {}, ranking(probabilities), RegionIds(1, "image"), ChoicePolicy(1, 0))
    assert results[0]["value"] == {"choices": ["out"]}
    # The dynamic Choices has no options in this task: no result, and the log says why.
    assert [r["from_name"] for r in results] == ["scene", "tags"]
    assert 'task None: <Choices name="options"> has no choices in the task data field "options"' in caplog.text


def test_the_task_score_is_the_masks_where_masks_are_asked_else_the_captions_and_choices():
    id_map = np.zeros((10, 10), np.int32)
    id_map[:5] = 1
    panoptic = Prediction(panoptic=PanopticResult(id_map, [Segment(1, "Sky", 0, False, 0.8, 0.5, 50)]))
    referring = [ReferringRegion(np.ones((10, 10), bool), "Car", "the car", 0.3)]

    assert task_score(panoptic, [], [0.9, 1.0]) == 0.2  # 50 of 100 pixels at 0.8 * 0.5; the caption is left out
    assert task_score(Prediction(), referring, [0.9]) == 0.3
    assert task_score(Prediction(), [], [0.9, 0.5]) == 0.7  # a captioning / classification task
    assert task_score(Prediction(), [], []) == 0.0
