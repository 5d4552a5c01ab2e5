"""Model outputs -> Label Studio result regions, and the scores Label Studio sorts tasks by.

One small class per control tag type: `PolygonOutput` fills <PolygonLabels>, `BrushOutput` fills
<BrushLabels>. Both turn panoptic segments and referring masks into regions of their own kind.

Scores
- A region's score is its class probability times its mask quality (the mean mask probability over
  the region): high only when the model is sure both of what and of where. For referring regions the
  "class probability" is how clearly the chosen query won over the others for that prompt.
- A task's score is what Label Studio's uncertainty sampling sorts by (it serves the LOWEST first).
  For panoptic results it is the share of the image the model labelled with confidence:
      sum over segments of (area * region score) / image area
  so images with low-confidence regions or large unlabelled (void) parts come first: they are the
  ones where an annotator's corrections add the most. Referring-only results score the mean of their
  region scores. A task with nothing found scores 0, so it is served early too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass

import numpy as np

from xdecoder import Prediction
from xdecoder.image import nearest_indices

from .brush import mask_to_rle
from .label_config import ControlSpec, ImageSpec
from .polygons import Polygon, PolygonOptions, label_map_polygons, mask_polygons, to_percent


@dataclass(frozen=True)
class ReferringRegion:
    """A referring mask with the label it goes to and the prompt that asked for it."""

    mask: np.ndarray
    label: str
    prompt: str
    score: float


class RegionIds:
    """Short region ids for one image of a task, unique within the task (a control may label several images).

    They are the same on every run for the same task, except with `fresh` (answers to an interactive prompt): the
    editor merges a suggested region into one the annotation already has under the same id, so each answer's ids
    must be new, unlike those of the pre-annotation or of an earlier prompt it may hold.
    """

    def __init__(self, task_id: int | None, image: str, fresh: bool = False):
        self.prefix = f"{task_id if task_id is not None else 't'}/{image}" + (f"/{uuid.uuid4().hex}" if fresh else "")
        self.count = 0

    def next(self, control: str) -> str:
        self.count += 1
        return hashlib.blake2s(f"{self.prefix}/{control}/{self.count}".encode(), digest_size=5).hexdigest()


class ControlOutput:
    kind: str

    def __init__(self, control: ControlSpec, image: ImageSpec, width: int, height: int, ids: RegionIds):
        self.control, self.image = control, image
        self.width, self.height = width, height
        self.ids = ids

    def accepts(self, label: str) -> bool:
        return self.control.label(label) is not None

    def region(self, label: str, score: float, value: dict, prompt: str | None = None) -> dict:
        region = {
            "id": self.ids.next(self.control.name),
            "from_name": self.control.name,
            "to_name": self.image.name,
            "type": self.kind,
            "original_width": self.width,
            "original_height": self.height,
            "image_rotation": 0,
            "score": round(float(score), 6),
            "value": value | {self.kind: [label]},
        }
        if prompt is not None:
            region["meta"] = {"text": [f"prompt: {prompt}"]}  # shown with the region in the editor
        return region


class PolygonOutput(ControlOutput):
    kind = "polygonlabels"

    def __init__(self, *args, options: PolygonOptions, map_size: tuple[int, int]):
        """`map_size`: (height, width) of the prediction's maps, which polygons are traced on, in pixels of which
        `options` are given."""
        super().__init__(*args)
        self.options = options
        self.map_size = map_size

    def panoptic(self, segment_polygons: dict[int, list[Polygon]], segments) -> list[dict]:
        regions = []
        for segment in segments:
            if not self.accepts(segment.label):
                continue
            for polygon in segment_polygons.get(segment.id, []):
                regions.append(self._polygon_region(polygon, segment.label, segment.score * segment.mask_score))
        return regions

    def referring(self, region: ReferringRegion) -> list[dict]:
        return [
            self._polygon_region(polygon, region.label, region.score, region.prompt)
            for polygon in mask_polygons(region.mask, self.options)
        ]

    def _polygon_region(self, polygon: Polygon, label: str, score: float, prompt: str | None = None) -> dict:
        points = to_percent(polygon.points, self.map_size[1], self.map_size[0])  # percent: the image's too
        return self.region(label, score, {"points": points, "closed": True}, prompt)


class BrushOutput(ControlOutput):
    kind = "brushlabels"

    def panoptic(self, id_map: np.ndarray, segments) -> list[dict]:
        segments = [segment for segment in segments if self.accepts(segment.label)]
        id_map = self._at_image_size(id_map) if segments else id_map
        return [
            self._brush_region(id_map == segment.id, segment.label, segment.score * segment.mask_score)
            for segment in segments
        ]

    def referring(self, region: ReferringRegion) -> list[dict]:
        if not region.mask.any():
            return []
        return [self._brush_region(self._at_image_size(region.mask), region.label, region.score, region.prompt)]

    def _at_image_size(self, array: np.ndarray) -> np.ndarray:
        """A map made smaller than the image (XDECODER_RESULT_MAX_PIXELS), resized to it: each image pixel takes
        the value under its centre. Brush masks are painted pixel by pixel on the image."""
        height, width = array.shape
        if (height, width) == (self.height, self.width):
            return array
        return array[nearest_indices(height, self.height)[:, None], nearest_indices(width, self.width)]

    def _brush_region(self, mask: np.ndarray, label: str, score: float, prompt: str | None = None) -> dict:
        return self.region(label, score, {"format": "rle", "rle": mask_to_rle(mask)}, prompt)


def image_regions(
    image: ImageSpec,
    size: tuple[int, int],
    controls: list[ControlSpec],
    prediction: Prediction,
    referring: list[ReferringRegion],
    ids: RegionIds,
    options: PolygonOptions,
) -> list[dict]:
    """All regions for one image of `size` (height, width): panoptic segments and referring masks, in
    every chosen control that has their label. Panoptic polygons are simplified together, once.

    The prediction's maps may be smaller than the image (XDECODER_RESULT_MAX_PIXELS): polygons are traced on them
    (their percent coordinates are the image's too) with `options.min_area_px` scaled to their size, and brush
    masks are resized to the image."""
    height, width = size
    maps = [prediction.panoptic.id_map] if prediction.panoptic is not None else []
    maps += [region.mask for region in referring]
    map_size = maps[0].shape if maps else size
    options = _scaled_to(options, map_size, size)
    outputs = [
        PolygonOutput(c, image, width, height, ids, options=options, map_size=map_size)
        if c.kind == "polygonlabels"
        else BrushOutput(c, image, width, height, ids)
        for c in controls
    ]
    regions: list[dict] = []
    panoptic = prediction.panoptic
    if panoptic is not None and panoptic.segments:
        polygons = None
        for output in outputs:
            if isinstance(output, PolygonOutput):
                polygons = polygons if polygons is not None else label_map_polygons(panoptic.id_map, options)
                regions += output.panoptic(polygons, panoptic.segments)
            else:
                regions += output.panoptic(panoptic.id_map, panoptic.segments)
    for region in referring:
        for output in outputs:
            if output.accepts(region.label):
                regions += output.referring(region)
    return regions


def _scaled_to(options: PolygonOptions, map_size: tuple[int, int], image_size: tuple[int, int]) -> PolygonOptions:
    """`options` for a map of `map_size` made for an image of `image_size`: the minimum area is the image's."""
    if map_size == image_size:
        return options
    ratio = (map_size[0] * map_size[1]) / (image_size[0] * image_size[1])
    return dataclasses.replace(options, min_area_px=options.min_area_px * ratio)


def task_score(prediction: Prediction | None, referring: list[ReferringRegion]) -> float:
    """See the module docstring: low = the model is unsure = serve first."""
    parts = []
    if prediction is not None and prediction.panoptic is not None:
        panoptic = prediction.panoptic
        area = panoptic.id_map.size
        parts.append(sum(s.area * s.score * s.mask_score for s in panoptic.segments) / area if area else 0.0)
    if referring:
        parts.append(float(np.mean([r.score for r in referring])))
    return round(float(np.mean(parts)), 6) if parts else 0.0
