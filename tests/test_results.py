"""Regions from predictions whose maps are smaller than the image (XDECODER_RESULT_MAX_PIXELS)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import shapely

from backend.brush import rle_to_mask
from backend.label_config import ProjectSpec
from backend.polygons import PolygonOptions
from backend.results import ReferringRegion, RegionIds, image_regions
from xdecoder import Prediction
from xdecoder.predictor import PanopticResult, Segment

LABELS = '<Label value="Sky"/><Label value="Car"/><Label value="Dot"/>'
CONFIG = f"""<View><Image name="image" value="$image"/>
<PolygonLabels name="outline" toName="image">{LABELS}</PolygonLabels>
<BrushLabels name="paint" toName="image">{LABELS}</BrushLabels>
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
    for name, expected in (("Sky", id_map == 1), ("Car", id_map == 2), ("Dot", id_map == 3), ("Car*", mask)):
        decoded = rle_to_mask(painted[name]["value"]["rle"], 20, 32)
        assert np.array_equal(decoded, np.kron(expected, np.ones((2, 2), bool))), name


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
