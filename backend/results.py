"""Model outputs -> Label Studio results, and the scores Label Studio sorts tasks by.

One small class per mask control tag type: `PolygonOutput` fills <PolygonLabels>, `BrushOutput` <BrushLabels> (RLE),
`BitmaskOutput` <BitmaskLabels> (a PNG data URL). Each turns panoptic segments and referring masks into regions of
its own kind. `caption_results` fills caption <TextArea>s with the image's caption and `choices_results` fills
<Choices> with the choices whose texts the model ranks highest for the image (docs/token_outputs.md).

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
- A caption's score is the geometric mean of its greedy tokens' probabilities (xdecoder.Caption.score); a choices
  result's is the probability of the chosen choices, summed (one choice: its probability), in a softmax over the
  control's choices.
- Captions and choices enter the task's score only when the task asks for no masks (a captioning or classification
  project): the fine-tuning that active learning feeds learns masks, so where masks are asked, the task's score stays
  the masks' alone and a confident caption cannot hide an uncertain segmentation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdecoder import Caption, Prediction, TextRanking
from xdecoder.image import nearest_indices

from .brush import mask_to_png_data_url, mask_to_rle
from .label_config import ChoiceSpec, ChoicesSpec, ControlSpec, ImageSpec
from .polygons import Polygon, PolygonOptions, label_map_polygons, mask_polygons, to_percent

logger = logging.getLogger(__name__)


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


class PixelMaskOutput(ControlOutput):
    """Regions painted pixel by pixel, at the image's size; subclasses say how the mask is written."""

    def panoptic(self, id_map: np.ndarray, segments) -> list[dict]:
        segments = [segment for segment in segments if self.accepts(segment.label)]
        id_map = self._at_image_size(id_map) if segments else id_map
        return [
            self._mask_region(id_map == segment.id, segment.label, segment.score * segment.mask_score)
            for segment in segments
        ]

    def referring(self, region: ReferringRegion) -> list[dict]:
        if not region.mask.any():
            return []
        return [self._mask_region(self._at_image_size(region.mask), region.label, region.score, region.prompt)]

    def _at_image_size(self, array: np.ndarray) -> np.ndarray:
        """A map made smaller than the image (XDECODER_RESULT_MAX_PIXELS), resized to it: each image pixel takes
        the value under its centre. Brush masks are painted pixel by pixel on the image."""
        height, width = array.shape
        if (height, width) == (self.height, self.width):
            return array
        return array[nearest_indices(height, self.height)[:, None], nearest_indices(width, self.width)]

    def _mask_region(self, mask: np.ndarray, label: str, score: float, prompt: str | None = None) -> dict:
        return self.region(label, score, self.encode(mask), prompt)

    @staticmethod
    def encode(mask: np.ndarray) -> dict:
        raise NotImplementedError


class BrushOutput(PixelMaskOutput):
    kind = "brushlabels"

    @staticmethod
    def encode(mask: np.ndarray) -> dict:
        return {"format": "rle", "rle": mask_to_rle(mask)}


class BitmaskOutput(PixelMaskOutput):
    kind = "bitmasklabels"

    @staticmethod
    def encode(mask: np.ndarray) -> dict:
        return {"imageDataURL": mask_to_png_data_url(mask)}


PIXEL_MASK_OUTPUTS: dict[str, type[PixelMaskOutput]] = {"brushlabels": BrushOutput, "bitmasklabels": BitmaskOutput}


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
        else PIXEL_MASK_OUTPUTS[c.kind](c, image, width, height, ids)
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


@dataclass(frozen=True)
class ChoicePolicy:
    """How many choices a choice="multiple" <Choices> gets: those of probability at least `min_probability`, at most
    `top_k` of them, and always the most probable one."""

    top_k: int
    min_probability: float


def caption_results(image: ImageSpec, caption: Caption | None, ids: RegionIds) -> list[dict]:
    """A `textarea` result with the caption for each caption TextArea of `image`; none for an empty caption (a
    caption that ended at its first token), which would only clear the TextArea."""
    if caption is None or not caption.text.strip():
        return []
    return [
        {
            "id": ids.next(area),
            "from_name": area,
            "to_name": image.name,
            "type": "textarea",
            "score": round(float(caption.score), 6),
            "value": {"text": [caption.text.strip()]},
        }
        for area in image.caption_areas
    ]


def rank_texts(image: ImageSpec, task_data: Mapping[str, Any]) -> list[str]:
    """The texts to rank for the Choices of `image` in one task: every choice's texts, each once (a blank one, as
    `<Choice value=" "/>` gives, is not ranked: its choice never wins)."""
    texts = [text for control in image.choices for choice in control.choices(task_data) for text in choice.texts]
    return list(dict.fromkeys(text for text in texts if text.strip()))


def choice_probabilities(choices: Sequence[ChoiceSpec], ranking: TextRanking) -> np.ndarray:
    """[C] float64: each choice's probability in a softmax over `choices` alone. A choice reads as its texts, whose
    probabilities add up (as labels' synonyms do). `ranking` may rank more texts (other controls' too): a softmax
    over a subset is the full softmax renormalised over it."""
    index = {text: i for i, text in enumerate(ranking.texts)}
    mass = np.array(
        [sum(float(ranking.probabilities[index[text]]) for text in choice.texts if text in index) for choice in choices]
    )
    total = mass.sum()
    return mass / total if total > 0 else np.full(len(choices), 1.0 / len(choices))


def choices_results(
    image: ImageSpec,
    task_data: Mapping[str, Any],
    ranking: TextRanking | None,
    ids: RegionIds,
    policy: ChoicePolicy,
    task_id: Any = None,
) -> list[dict]:
    """A `choices` result for each <Choices> of `image` that has choices in this task (a control without any is
    logged and gets nothing). `ranking` ranks `rank_texts(image, task_data)`."""
    results = []
    for control in image.choices:
        choices = control.choices(task_data)
        if not choices:
            where = f'the task data field "{control.data_field}"' if control.data_field else "its <Choice> tags"
            logger.warning('task %s: <Choices name="%s"> has no choices in %s: no result', task_id, control.name, where)
            continue
        if ranking is None:
            continue
        picked, score = _pick(choice_probabilities(choices, ranking), control, policy)
        results.append(
            {
                "id": ids.next(control.name),
                "from_name": control.name,
                "to_name": image.name,
                "type": "choices",
                "score": round(score, 6),
                "value": {"choices": [choices[i].value for i in picked]},
            }
        )
    return results


def _pick(probabilities: np.ndarray, control: ChoicesSpec, policy: ChoicePolicy) -> tuple[list[int], float]:
    """The chosen choices, most probable first, and the result's score: their probability, summed."""
    order = [int(i) for i in np.argsort(-probabilities, kind="stable")]
    picked = order[:1]
    if control.multiple:
        picked = [i for i in order[: policy.top_k] if probabilities[i] >= policy.min_probability] or picked
    return picked, float(probabilities[picked].sum())


def task_score(
    prediction: Prediction | None, referring: list[ReferringRegion], text_scores: Sequence[float] = ()
) -> float:
    """See the module docstring: low = the model is unsure = serve first. `text_scores`: the scores of the image's
    caption and choices results, which count only when no masks were asked (no panoptic labels, no prompts)."""
    parts = []
    if prediction is not None and prediction.panoptic is not None:
        panoptic = prediction.panoptic
        area = panoptic.id_map.size
        parts.append(sum(s.area * s.score * s.mask_score for s in panoptic.segments) / area if area else 0.0)
    if referring:
        parts.append(float(np.mean([r.score for r in referring])))
    if not parts and text_scores:
        parts.append(float(np.mean(text_scores)))
    return round(float(np.mean(parts)), 6) if parts else 0.0
