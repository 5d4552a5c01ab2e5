"""Image inputs to the predictor: conversions to RGB uint8 and the resize policy."""

import numpy as np
import pytest
from PIL import Image

from xdecoder import ResizePolicy
from xdecoder.image import rgb_pixels, to_rgb


def test_resize_policy_matches_the_official_demo_rule():
    policy = ResizePolicy(short_side=256, max_long_side=None)
    assert policy.output_size(300, 420) == (256, 358)  # fixture A: long = int(256 * 420 / 300)
    assert policy.output_size(420, 300) == (358, 256)
    assert policy.output_size(256, 256) == (256, 256)


def test_long_side_cap_and_extreme_aspect_ratios():
    policy = ResizePolicy(short_side=512, max_long_side=1333)
    assert policy.output_size(512, 683) == (512, 683)
    assert policy.output_size(1000, 4000) == (333, 1333)
    assert policy.output_size(10, 4000) == (3, 1333)
    assert policy.output_size(4000, 10) == (1333, 3)
    assert policy.output_size(1, 100000) == (1, 1333)  # never zero pixels
    with pytest.raises(ValueError):
        ResizePolicy(short_side=512, max_long_side=100)


def test_resize_is_pil_bicubic():
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    resized = ResizePolicy(short_side=20, max_long_side=None).resize(rgb)
    expected = np.asarray(Image.fromarray(rgb).resize((30, 20), Image.BICUBIC))
    assert np.array_equal(resized, expected)


@pytest.mark.parametrize(
    ("image", "expected_pixel"),
    [
        (Image.new("RGB", (5, 4), (10, 20, 30)), (10, 20, 30)),
        (Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped
        (Image.new("L", (5, 4), 77), (77, 77, 77)),
        (Image.new("I;16", (5, 4), 65535), (255, 255, 255)),
        (Image.new("I", (5, 4), 257 * 100), (100, 100, 100)),
        (Image.new("1", (5, 4), 1), (255, 255, 255)),
        (Image.new("P", (5, 4), 0), (0, 0, 0)),
        (np.full((4, 5), 3, np.uint8), (3, 3, 3)),
        (np.full((4, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((4, 5, 4), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 5, 3), 514, np.uint16), (2, 2, 2)),
        (np.full((4, 5), 1.0, np.float32), (255, 255, 255)),
        (np.full((4, 5), True), (255, 255, 255)),
        (np.full((4, 5, 3), 12, np.int64), (12, 12, 12)),
    ],
)
def test_inputs_become_rgb_uint8(image, expected_pixel):
    rgb = to_rgb(image)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == expected_pixel


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 5, 2), np.uint8),
        np.zeros((2, 4, 5, 3), np.uint8),
        np.full((4, 5), 2.0, np.float32),
        np.full((4, 5), np.nan, np.float32),
        np.full((4, 5), 300, np.int32),
        "image.png",
    ],
)
def test_bad_images_are_clear_errors(bad):
    with pytest.raises((ValueError, TypeError)):
        to_rgb(bad)


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
EIGHT_BIT = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


@pytest.mark.parametrize("mode", [*EIGHT_BIT, *SIXTEEN_BIT, "F"])
@pytest.mark.parametrize("size", [(40, 60), (12, 16), (20, 30)])  # made smaller, larger, and left as it is
def test_resizing_a_pil_image_equals_resizing_its_rgb_array(mode, size):
    """PIL images of 8-bit modes are resized as they are, with no full-size array made of a photo, to the same
    pixels as their `to_rgb` array; 16-bit and float images go through that array."""
    noise = np.random.default_rng(1).random((size[0], size[1], 4))
    if mode in SIXTEEN_BIT:
        image = Image.fromarray((noise[..., 0] * 65535).astype(np.uint16)).convert(mode)
    elif mode == "F":
        image = Image.fromarray(noise[..., 0].astype(np.float32), "F")
    else:
        rgba = Image.fromarray((noise * 255).astype(np.uint8), "RGBA")
        image = rgba.convert("P").convert("PA") if mode == "PA" else rgba.convert(mode)
    assert image.mode == mode
    policy = ResizePolicy(short_side=20, max_long_side=None)
    pixels = rgb_pixels(image)
    assert isinstance(pixels, Image.Image) == (mode in EIGHT_BIT)
    resized = policy.resize(pixels)
    assert resized.shape == (*policy.output_size(*size), 3) and resized.dtype == np.uint8
    assert np.array_equal(resized, policy.resize(to_rgb(image)))
