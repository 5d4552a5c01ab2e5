"""Image input: anything reasonable -> RGB uint8, and the resize policy of the official demos."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

ImageInput = Image.Image | np.ndarray
# PIL modes of 16-bit PNGs; "I" holds 32-bit ints, which here are 16-bit samples. `to_rgb` scales them to 8 bits.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ResizePolicy:
    """Resize so the short side is `short_side` (bicubic, antialiased: PIL's resize, as the official
    demos do through torchvision), then shrink further if the long side would exceed `max_long_side`
    (None: no cap; the cap bounds memory for panoramas and other extreme aspect ratios)."""

    short_side: int = 512
    max_long_side: int | None = 1333

    def __post_init__(self):
        if self.short_side < 1 or (self.max_long_side is not None and self.max_long_side < self.short_side):
            raise ValueError(f"invalid resize policy: short side {self.short_side}, max long {self.max_long_side}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, computed as torchvision's Resize(short_side, max_size)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.short_side, int(self.short_side * long / short)
        if self.max_long_side is not None and new_long > self.max_long_side:
            new_short, new_long = int(self.max_long_side * new_short / new_long), self.max_long_side
        new_short = max(new_short, 1)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def resize(self, rgb: np.ndarray | Image.Image) -> np.ndarray:
        """[H, W, 3] uint8, or an RGB PIL image (see `rgb_pixels`) -> [h, w, 3] uint8."""
        image = rgb if isinstance(rgb, Image.Image) else None
        height, width = (image.height, image.width) if image is not None else rgb.shape[:2]
        size = self.output_size(height, width)
        if size == (height, width):
            return np.asarray(rgb)
        image = image if image is not None else Image.fromarray(rgb)
        return np.asarray(image.resize((size[1], size[0]), Image.BICUBIC))


def rgb_pixels(image: ImageInput) -> np.ndarray | Image.Image:
    """The image's RGB pixels as `to_rgb` makes them, left a PIL image where the image is one that converts to RGB as
    it is: turning a large photo into an array costs more than resizing it, and the model needs it resized."""
    if isinstance(image, Image.Image) and image.mode not in (*SIXTEEN_BIT_MODES, "F"):
        if image.width == 0 or image.height == 0:
            raise ValueError("image is empty")
        return image if image.mode == "RGB" else image.convert("RGB")
    return to_rgb(image)


def to_rgb(image: ImageInput) -> np.ndarray:
    """PIL image or numpy array -> [H, W, 3] uint8 RGB.

    Accepted: RGB, RGBA (alpha dropped), grayscale (L, 1-bit, and 16-bit modes, scaled so that 65535
    becomes 255), palette and CMYK images; numpy arrays [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of
    uint8 (or other integers in 0..255), uint16 (scaled likewise), bool, or floats in [0, 1].
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ValueError("image is empty")
    if image.mode in SIXTEEN_BIT_MODES:
        return _array_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :3] if array.shape[2] != 1 else array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4] and non-empty, got shape {array.shape}")
    array = _to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("float images must hold finite values in [0, 1]")
        return np.round(array * 255).astype(np.uint8)
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError("integer images other than uint16 must hold values in [0, 255]")
        return array.astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}")


def nearest_indices(source: int, target: int) -> np.ndarray:
    """For resizing one side of a map from `source` to `target` pixels, nearest pixel: the source index under the
    centre of each target pixel, floor((i + 0.5) * source / target), in whole numbers (no rounding at ties)."""
    return (2 * np.arange(target, dtype=np.int64) + 1) * source // (2 * target)
