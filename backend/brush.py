"""Masks in and out of Label Studio: brush RLE for BrushLabels results, PNG data URLs for BitmaskLabels results, and
annotators' polygons as masks.

Label Studio stores a brush mask as its own run-length encoding of the RGBA image the editor paints (row-major,
4 bytes per pixel), and reads the mask from the alpha channel. Encoding and decoding go through
`label_studio_sdk.converter.brush`, so the bytes are the ones Label Studio itself writes and reads.

A <BitmaskLabels> result (Label Studio 1.22+) carries its mask as `value.imageDataURL`, a PNG data URL. The 1.23.2
editor (BitmaskRegionModel in web/dist/apps/labelstudio/358.js) decodes it with the browser, draws it on a canvas
the size of the PNG (the image's natural size) and counts a pixel as painted when its alpha is above 0; the colour
is the label's. So we write the mask at the image's size as a 1-bit greyscale PNG whose 0 is transparent (a tRNS
chunk): a 2000x2000 disk encodes in 58 ms to 7 KB, where an RGBA PNG of it takes 660 ms and 23 KB.

Polygons are rasterised with the pixel-centre rule: pixel (col, row) is in the mask when its centre
(col + 0.5, row + 0.5) is inside the polygon, by the even-odd rule (fill rules differ only where a polygon crosses
itself, which the editor allows but rarely sees). A polygon traced along pixel edges therefore rasterises back to
exactly the pixels it was traced from; PIL's and OpenCV's polygon fills include boundary pixels and would grow
every region by a pixel.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image, UnidentifiedImageError

# Brush strokes are anti-aliased: their edge pixels are partly transparent. Half opaque or more counts as painted.
MIN_PAINTED_ALPHA = 128


PNG_DATA_URL_PREFIX = "data:image/png;base64,"


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """[H, W] bool -> Label Studio brush RLE (the mask painted opaque in the alpha channel)."""
    return mask2rle(_checked_mask(mask).astype(np.uint8) * 255)


def mask_to_png_data_url(mask: np.ndarray) -> str:
    """[H, W] bool -> the `imageDataURL` of a <BitmaskLabels> result: the mask opaque, the rest transparent."""
    buffer = io.BytesIO()
    Image.fromarray(_checked_mask(mask)).save(buffer, "PNG", transparency=0)
    return PNG_DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url_to_mask(data_url: str, height: int, width: int) -> np.ndarray:
    """A <BitmaskLabels> `imageDataURL` (ours, or the editor's RGBA canvas) -> [H, W] bool, the pixels whose alpha
    is above 0, as the editor reads them."""
    if not isinstance(data_url, str) or not data_url.startswith(PNG_DATA_URL_PREFIX):
        raise ValueError(f"not a PNG data URL (expected it to start with {PNG_DATA_URL_PREFIX!r})")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data_url[len(PNG_DATA_URL_PREFIX) :], validate=True))) as image:
            if image.size != (width, height):
                raise ValueError(f"the PNG is {image.width}x{image.height}, expected {width}x{height}")
            return np.asarray(image.convert("RGBA"))[:, :, 3] > 0
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not a PNG data URL: {error}") from error


def _checked_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D [H, W] array, got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got {mask.dtype} (e.g. pass mask > 0)")
    return mask


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> [H, W] bool, the pixels whose alpha is at least MIN_PAINTED_ALPHA."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    # The header: a 32-bit count of values, then the word size and four run-length sizes (21 bits).
    if len(rle) < 7:
        raise ValueError(f"not a Label Studio brush RLE: {len(rle)} bytes")
    # Checked before decoding, which allocates that many values.
    values = int.from_bytes(bytes(rle[:4]), "big")
    if values != height * width * 4:
        raise ValueError(f"RLE holds {values} values, expected {height}x{width}x4 = {height * width * 4}")
    try:
        rgba = decode_rle(bytes(rle))
    except ValueError as error:  # the bit stream ends before all values are decoded
        raise ValueError("not a Label Studio brush RLE: truncated") from error
    return rgba.reshape(height, width, 4)[:, :, 3] >= MIN_PAINTED_ALPHA


def polygon_to_mask(points_percent: list[list[float]], width: int, height: int) -> np.ndarray:
    """Label Studio polygon ([x%, y%] points, closed implicitly) -> [H, W] bool mask of the pixels it covers."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    xy = np.asarray(points_percent, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
        raise ValueError(f"a polygon needs at least 3 [x%, y%] points, got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("polygon points must be finite numbers")
    xy = xy * (width / 100.0, height / 100.0)

    # Scanline fill through the pixel centres: where each edge crosses the row centres y = row + 0.5 ...
    # Every edge is taken from its upper end, so two polygons sharing an edge compute the same crossings and a
    # pixel centre on that edge goes to exactly one of them.
    start, end = xy, np.roll(xy, -1, axis=0)
    upward = end[:, 1] < start[:, 1]
    start, end = np.where(upward[:, None], end, start), np.where(upward[:, None], start, end)
    # Half-open in y, so a vertex on a scanline is crossed once and horizontal edges never.
    first_row = np.clip(np.ceil(start[:, 1] - 0.5), 0, height).astype(np.int64)
    end_row = np.clip(np.ceil(end[:, 1] - 0.5), 0, height).astype(np.int64)
    crossings_per_edge = end_row - first_row
    edge = np.repeat(np.arange(len(start)), crossings_per_edge)
    position_in_edge = np.arange(len(edge)) - np.repeat(
        np.cumsum(crossings_per_edge) - crossings_per_edge, crossings_per_edge
    )
    row = first_row[edge] + position_in_edge
    (x0, y0), (x1, y1) = start[edge].T, end[edge].T
    x = x0 + (row + 0.5 - y0) * (x1 - x0) / (y1 - y0)
    # ... then, row by row and left to right, pixels between the 1st and 2nd crossing, the 3rd and 4th, ... are in.
    order = np.lexsort((x, row))
    row, x = row[order].reshape(-1, 2), x[order].reshape(-1, 2)
    columns = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    span_edges = np.zeros((height, width + 1), np.int32)
    np.add.at(span_edges, (row[:, 0], columns[:, 0]), 1)
    np.add.at(span_edges, (row[:, 0], columns[:, 1]), -1)
    return np.cumsum(span_edges, axis=1)[:, :width] > 0
