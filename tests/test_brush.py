"""Tests for backend.brush: brush RLE and bitmask PNG data URLs both ways, and rasterising Label Studio polygons."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter.brush import decode_from_annotation
from PIL import Image

from backend.brush import mask_to_png_data_url, mask_to_rle, png_data_url_to_mask, polygon_to_mask, rle_to_mask

small_masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.bool_, shape, elements=st.booleans())
)


@settings(max_examples=40, deadline=None)
@given(small_masks)
def test_rle_round_trip(mask):
    rle = mask_to_rle(mask)
    assert all(isinstance(byte, int) and 0 <= byte <= 255 for byte in rle)
    np.testing.assert_array_equal(rle_to_mask(rle, *mask.shape), mask)


def test_rle_is_what_label_studio_reads():
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    mask[25, :] = True
    result = {
        "type": "brushlabels",
        "rle": mask_to_rle(mask),
        "original_width": 40,
        "original_height": 30,
        "brushlabels": ["cat"],
    }
    (layer,) = decode_from_annotation("tag", [result]).values()
    np.testing.assert_array_equal(layer, mask.astype(np.uint8) * 255)  # opaque where painted, transparent elsewhere


def test_rle_header_counts_rgba_values():
    rle = mask_to_rle(np.ones((3, 5), bool))
    assert int.from_bytes(bytes(rle[:4]), "big") == 3 * 5 * 4


def test_half_transparent_brush_pixels_count_as_painted():
    # Label Studio's anti-aliased strokes leave partly transparent pixels at their edges.
    from label_studio_sdk.converter.brush import encode_rle

    alpha = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    rgba = np.zeros((1, 6, 4), np.uint8)
    rgba[..., 3] = alpha
    mask = rle_to_mask(encode_rle(rgba.ravel()), 1, 6)
    np.testing.assert_array_equal(mask, [[False, False, False, True, True, True]])


def test_rle_of_another_size_is_refused():
    rle = mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="expected 4x5x4"):
        rle_to_mask(rle, 4, 5)


@pytest.mark.parametrize(
    "bad_mask",
    [np.zeros((2, 3, 4), bool), np.zeros((0, 3), bool), np.zeros((3, 3), np.uint8), np.zeros((3, 3), float)],
)
def test_mask_to_rle_refuses_bad_masks(bad_mask):
    with pytest.raises(ValueError, match="mask must"):
        mask_to_rle(bad_mask)


def test_rle_to_mask_refuses_bad_sizes_and_garbage():
    rle = mask_to_rle(np.eye(20, dtype=bool))
    with pytest.raises(ValueError, match="positive"):
        rle_to_mask(rle, 0, 4)
    with pytest.raises(ValueError, match="not a Label Studio brush RLE"):
        rle_to_mask([1, 2], 2, 2)
    with pytest.raises(ValueError, match="truncated"):
        rle_to_mask(rle[: len(rle) // 2], 20, 20)


def test_square_covers_exactly_its_pixels():
    # Corners (2, 1) and (6, 4) in pixels of a 10x5 image: columns 2..5, rows 1..3.
    mask = polygon_to_mask([[20, 20], [60, 20], [60, 80], [20, 80]], width=10, height=5)
    expected = np.zeros((5, 10), bool)
    expected[1:4, 2:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_full_image_polygon_covers_everything_and_outside_points_are_clipped():
    assert polygon_to_mask([[0, 0], [100, 0], [100, 100], [0, 100]], 7, 3).all()
    assert polygon_to_mask([[-50, -50], [150, -50], [150, 150], [-50, 150]], 7, 3).all()
    assert not polygon_to_mask([[110, 0], [120, 0], [120, 100]], 7, 3).any()


def test_self_intersecting_polygon_uses_even_odd():
    # A pentagram drawn in one stroke: its five tips are inside, the pentagon in the middle (crossed twice) is not.
    angles = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.column_stack([50 + 45 * np.cos(angles), 50 - 45 * np.sin(angles)])
    faces = list(shapely.polygonize(shapely.node(shapely.LinearRing(star)).geoms).geoms)
    pentagon = max(faces, key=lambda face: face.area)
    tips = shapely.union_all([face for face in faces if face is not pentagon])
    rows, columns = np.mgrid[0:100, 0:100]
    mask = polygon_to_mask(star.tolist(), 100, 100)
    np.testing.assert_array_equal(mask, shapely.contains_xy(tips, columns + 0.5, rows + 0.5))
    assert not mask[50, 50]


def test_keyhole_cut_adds_nothing_even_through_pixel_centres():
    # A 6x6 square with a triangular hole, joined by a cut from (0, 0) to (4, 4) that runs along the hole's
    # diagonal edge, through the centres of pixels (0, 0), (1, 1), ... where that edge also passes.
    hole = [(4, 4), (4, 2), (2, 2)]
    keyhole = [(0, 0), *hole, (4, 4), (0, 0), (0, 6), (6, 6), (6, 0)]
    percent = [[100 * x / 6, 100 * y / 6] for x, y in keyhole]
    hole_mask = polygon_to_mask([[100 * x / 6, 100 * y / 6] for x, y in hole], 6, 6)
    assert hole_mask.sum() == 3
    np.testing.assert_array_equal(polygon_to_mask(percent, 6, 6), ~hole_mask)


random_polygons = st.lists(
    st.tuples(st.floats(-10, 110, allow_nan=False), st.floats(-10, 110, allow_nan=False)), min_size=3, max_size=9
)


@settings(max_examples=60, deadline=None)
@given(random_polygons, st.integers(1, 30), st.integers(1, 30))
def test_pixels_are_those_whose_centre_is_inside(points, width, height):
    polygon = shapely.Polygon([(x * width / 100, y * height / 100) for x, y in points])
    if not polygon.is_valid or polygon.area < 1e-9:
        return  # shapely's containment is only defined for simple polygons
    rows, columns = np.mgrid[0:height, 0:width]
    centre_inside = shapely.contains_xy(polygon, columns + 0.5, rows + 0.5)
    centre_on_border = shapely.intersects_xy(polygon.boundary.buffer(1e-9), columns + 0.5, rows + 0.5)
    mask = polygon_to_mask([list(p) for p in points], width, height)
    np.testing.assert_array_equal(mask[~centre_on_border], centre_inside[~centre_on_border])


def test_neighbours_sharing_a_diagonal_split_the_pixels_on_it():
    # Pixel centres (0.5, 0.5), (1.5, 1.5), ... lie on the shared diagonal: each must go to exactly one side.
    upper = polygon_to_mask([[0, 0], [100, 0], [100, 100]], 6, 6)
    lower = polygon_to_mask([[100, 100], [0, 100], [0, 0]], 6, 6)
    np.testing.assert_array_equal(upper.astype(int) + lower, np.ones((6, 6), int))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([[0, 0], [50, 50]], "at least 3"),
        ([[0, 0, 0], [1, 1, 1], [2, 2, 2]], "at least 3"),
        ([[0, 0], [50, float("nan")], [9, 9]], "finite"),
    ],
)
def test_polygon_to_mask_refuses_bad_polygons(points, message):
    with pytest.raises(ValueError, match=message):
        polygon_to_mask(points, 10, 10)


@settings(max_examples=40, deadline=None)
@given(small_masks)
def test_bitmask_png_round_trip(mask):
    url = mask_to_png_data_url(mask)
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(png_data_url_to_mask(url, *mask.shape), mask)


def test_bitmask_png_is_the_mask_in_the_alpha_channel_at_the_image_size():
    """What the editor reads: a PNG of the image's size, alpha above 0 exactly on the mask (any colour)."""
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    encoded = mask_to_png_data_url(mask).removeprefix("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        assert image.format == "PNG" and image.size == (40, 30)
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
    np.testing.assert_array_equal(alpha, mask.astype(np.uint8) * 255)


def test_bitmask_drawn_in_the_editor_is_read_where_its_alpha_is_above_zero():
    """The editor saves its canvas as an RGBA PNG: black strokes with anti-aliased (partly transparent) edges."""
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[1, 1:4, 3] = (40, 255, 1)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    expected = np.zeros((4, 5), bool)
    expected[1, 1:4] = True
    np.testing.assert_array_equal(png_data_url_to_mask(url, 4, 5), expected)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/jpeg;base64,AAAA", "not a PNG data URL"),
        ("data:image/png;base64,not base64!", "not a PNG data URL"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a PNG data URL"),
        (mask_to_png_data_url(np.ones((3, 3), bool)), "the PNG is 3x3, expected 5x4"),
    ],
)
def test_bad_bitmask_data_urls_are_refused(url, message):
    with pytest.raises(ValueError, match=message):
        png_data_url_to_mask(url, 4, 5)
