"""What a project's labeling config asks of this backend.

Label Studio sends the project's labeling config (XML) with /setup, /predict and the webhooks. This module reads it
with the SDK's `LabelInterface` and turns it into small frozen dataclasses that the rest of the backend uses:

    spec = ProjectSpec.parse(label_config)          # raises LabelConfigError for configs we cannot serve
    for image in spec.images:                        # every <Image> with a control this backend fills
        url = task["data"][image.data_key]
        for control in image.polygon_controls:       # or image.brush_controls (BrushLabels and BitmaskLabels)
            control.panoptic_labels                  # LabelSpec: value, texts (what X-Decoder reads), stuff
        image.prompts(task["data"], context)         # referring prompts and the label each mask gets
        image.caption_areas                          # <TextArea>s that get the image's caption
        image.choices                                # <Choices> filled from the ranking of their values

The attributes we read beyond Label Studio's own (`stuff`, `prompt`, `referring`, `caption`), the default stuff names,
how prompts are found and which TextArea is a caption are documented for users in label_config/README.md; Label
Studio 1.23.2 keeps them as written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from label_studio_sdk._legacy.exceptions import LabelStudioXMLSyntaxErrorSentryIgnored
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ControlTag
from label_studio_sdk.label_interface.label_tags import LabelTag
from label_studio_sdk.label_interface.object_tags import ObjectTag

logger = logging.getLogger(__name__)

ControlKind = Literal["polygonlabels", "brushlabels", "bitmasklabels"]
PromptSource = Literal["context", "data", "label"]

CONTROL_KINDS: tuple[ControlKind, ...] = ("polygonlabels", "brushlabels", "bitmasklabels")
# Controls painted pixel by pixel: BrushLabels (RLE) and BitmaskLabels (a PNG), filled alike.
PIXEL_MASK_KINDS: tuple[ControlKind, ...] = ("brushlabels", "bitmasklabels")

# Task data field read for prompts when a <TextArea> has no value="$field". Leaving `value` off keeps the project's
# data to one key, which Label Studio needs to accept plain image uploads; JSON tasks may still carry this field.
DEFAULT_PROMPT_FIELD = "prompt"

# Amorphous regions that panoptic segmentation returns as one region per class (COCO-panoptic and ADE20K "stuff").
# Names such as Door, Window or House are stuff in COCO only because COCO never outlined them one by one; people who
# label them usually want instances, so they are left out. A label's `stuff` attribute overrides this list.
DEFAULT_STUFF_NAMES = frozenset(
    {
        "background",
        "beach",
        "building",
        "bush",
        "carpet",
        "ceiling",
        "cliff",
        "cloud",
        "dirt",
        "earth",
        "field",
        "floor",
        "fence",
        "fog",
        "foliage",
        "forest",
        "grass",
        "gravel",
        "ground",
        "hedge",
        "highway",
        "hill",
        "ice",
        "lake",
        "land",
        "lawn",
        "mountain",
        "mud",
        "ocean",
        "path",
        "pavement",
        "playingfield",
        "pond",
        "railroad",
        "railway",
        "river",
        "road",
        "rock",
        "roof",
        "rug",
        "sand",
        "sea",
        "sidewalk",
        "sky",
        "snow",
        "street",
        "terrain",
        "tree",
        "vegetation",
        "wall",
        "water",
    }
)


class LabelConfigError(ValueError):
    """The labeling config cannot be served by this backend. The message is written for a Label Studio admin."""


@dataclass(frozen=True)
class LabelSpec:
    """One <Label> of a <PolygonLabels> or <BrushLabels>."""

    value: str  # what Label Studio stores in results: the label's `alias` if it has one, else its `value`
    texts: tuple[str, ...]  # what X-Decoder reads: `predicted_values`, else `hint` (split on commas), else `value`
    stuff: bool  # one region per class (sky, road) rather than one per instance (car, person)
    prompt: str | None = None  # a fixed referring prompt: every image gets a mask for it
    referring: bool = False  # free-text prompts get this label

    @property
    def panoptic(self) -> bool:
        """Whether panoptic segmentation looks for this label. A label driven by prompts names a chosen region,
        not a class of things the model could find by itself."""
        return self.prompt is None and not self.referring

    @classmethod
    def from_tag(cls, tag: LabelTag, control: ControlTag) -> LabelSpec:
        shown = tag.get_attr("value", tag.value)
        texts = _model_texts(tag.get_attr("predicted_values"), tag.get_attr("hint"), shown)
        stuff = _bool_attr(tag, "stuff", control)
        return cls(
            value=tag.value,
            texts=texts,
            stuff=_is_default_stuff((shown, *texts)) if stuff is None else stuff,
            prompt=(tag.get_attr("prompt") or "").strip() or None,
            referring=bool(_bool_attr(tag, "referring", control)),
        )


@dataclass(frozen=True)
class ControlSpec:
    """One <PolygonLabels> or <BrushLabels>: where masks go back to Label Studio (`name` is the result's from_name)."""

    name: str
    kind: ControlKind
    labels: tuple[LabelSpec, ...]

    @property
    def panoptic_labels(self) -> tuple[LabelSpec, ...]:
        return tuple(label for label in self.labels if label.panoptic)

    def label(self, value: str) -> LabelSpec | None:
        """The label a Label Studio result names (results carry `LabelSpec.value`)."""
        return next((label for label in self.labels if label.value == value), None)

    @classmethod
    def from_tag(cls, tag: ControlTag) -> ControlSpec:
        if tag.dynamic_value:
            raise LabelConfigError(
                f'<{tag.tag} name="{tag.name}"> loads its labels dynamically, which this backend does not support: '
                "list the labels as <Label> tags in the config."
            )
        labels = tuple(LabelSpec.from_tag(label, tag) for label in tag.labels_attrs.values())
        if not labels:
            raise LabelConfigError(f'<{tag.tag} name="{tag.name}"> has no <Label> tags: add the labels to segment.')
        return cls(name=tag.name, kind=tag.tag.lower(), labels=labels)


@dataclass(frozen=True)
class ChoiceSpec:
    """One choice of a <Choices>: what Label Studio stores and the texts the model ranks for it (as for labels)."""

    value: str  # the choice's `alias` if it has one, else its `value`
    texts: tuple[str, ...]  # `predicted_values`, else `hint` (split on commas), else `value`

    @classmethod
    def from_tag(cls, tag: LabelTag) -> ChoiceSpec:
        shown = tag.get_attr("value", tag.value)
        return cls(tag.value, _model_texts(tag.get_attr("predicted_values"), tag.get_attr("hint"), shown))

    @classmethod
    def from_data(cls, item: Any) -> ChoiceSpec | None:
        """A choice of dynamic Choices from the task data: `{"value": ..., "alias"?, "predicted_values"?, "hint"?}`,
        as Label Studio reads them, or a plain string; None for anything else."""
        if isinstance(item, str):
            item = {"value": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), str) or not item["value"].strip():
            return None
        shown = item["value"].strip()
        alias = item.get("alias") if isinstance(item.get("alias"), str) and item["alias"].strip() else None
        hint = item.get("hint") if isinstance(item.get("hint"), str) else None
        predicted = item.get("predicted_values") if isinstance(item.get("predicted_values"), str) else None
        return cls(value=alias or shown, texts=_model_texts(predicted, hint, shown))


@dataclass(frozen=True)
class ChoicesSpec:
    """One <Choices> over an image (not perRegion): filled with the choices the model ranks highest for the image."""

    name: str
    multiple: bool  # choice="multiple": several choices may be picked
    static_choices: tuple[ChoiceSpec, ...]
    data_field: str | None = None  # dynamic choices (value="$field"): read from this task data field

    def choices(self, task_data: Mapping[str, Any]) -> tuple[ChoiceSpec, ...]:
        """This task's choices: the <Choice> tags, or the task data's list for dynamic choices (children of nested
        choices are not offered). Empty when there are none, which the caller logs."""
        if self.data_field is None:
            return self.static_choices
        items = task_data.get(self.data_field)
        parsed = [ChoiceSpec.from_data(item) for item in items] if isinstance(items, list) else []
        unique: dict[str, ChoiceSpec] = {}
        for choice in parsed:
            if choice is not None:
                unique.setdefault(choice.value, choice)
        return tuple(unique.values())

    @classmethod
    def from_tag(cls, tag: ControlTag) -> ChoicesSpec:
        static = tuple(ChoiceSpec.from_tag(choice) for choice in tag.labels_attrs.values())
        value = tag.get_attr("value", "")
        field = value[1:] if tag.dynamic_value and value.startswith("$") and len(value) > 1 else None
        return cls(tag.name, str(tag.get_attr("choice", "single")).casefold() == "multiple", static, field)


@dataclass(frozen=True)
class PanopticVocabulary:
    """What the panoptic head is asked for on one image: labels in config order, the stuff among them, and the
    texts X-Decoder reads for each (the arguments of `xdecoder.Predictor.panoptic`)."""

    labels: tuple[str, ...]
    stuff: frozenset[str]
    synonyms: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, controls: Iterable[ControlSpec]) -> PanopticVocabulary:
        """The panoptic labels of `controls`; a value shared by several controls is asked for once."""
        labels: dict[str, LabelSpec] = {}
        for control in controls:
            for label in control.panoptic_labels:
                labels.setdefault(label.value, label)
        return cls(
            labels=tuple(labels),
            stuff=frozenset(value for value, label in labels.items() if label.stuff),
            synonyms={value: label.texts for value, label in labels.items()},
        )


@dataclass(frozen=True)
class PromptSpec:
    """One <TextArea> attached to an image: it holds referring prompts, typed by the annotator or from task data."""

    name: str
    data_field: str  # the task data field read for prompts: from value="$field", else DEFAULT_PROMPT_FIELD

    @classmethod
    def from_tag(cls, tag: ControlTag) -> PromptSpec:
        value = tag.get_attr("value", "")
        field = value[1:] if value.startswith("$") and len(value) > 1 else DEFAULT_PROMPT_FIELD
        return cls(name=tag.name, data_field=field)


@dataclass(frozen=True)
class Prompt:
    """A referring prompt to segment, the label its mask gets, and where the prompt came from: the interactive
    `context` (a TextArea submit), the task `data`, or a `label` with a fixed prompt. In interactive mode the caller
    usually keeps only the `context` prompts."""

    text: str
    label: str  # a LabelSpec.value; the controls that have this label receive the mask
    source: PromptSource


@dataclass(frozen=True)
class ImageSpec:
    """One <Image> and the controls attached to it (toName)."""

    name: str  # the results' to_name
    data_key: str  # the task data field with the image URL: value="$image" -> "image"
    polygon_controls: tuple[ControlSpec, ...]
    brush_controls: tuple[ControlSpec, ...]  # <BrushLabels> and <BitmaskLabels>: masks painted pixel by pixel
    prompt_areas: tuple[PromptSpec, ...]
    # The label that free-text prompts get: the label marked referring="true", or the image's only label. None when
    # the config leaves it open: each prompt then gets the label it names ("the red car" -> Car), if any.
    referring_label: str | None
    caption_areas: tuple[str, ...] = ()  # names of the <TextArea>s that get the image's caption (see text_area_role)
    choices: tuple[ChoicesSpec, ...] = ()

    @property
    def controls(self) -> tuple[ControlSpec, ...]:
        return self.polygon_controls + self.brush_controls

    def prompts(self, task_data: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> list[Prompt]:
        """The referring prompts for one task, each once, in this order: the interactive context, the task data,
        labels with fixed prompts.

        `task_data` is the task's `data` as Label Studio sends it in /predict. `context` is /predict's
        `params.context`: in interactive mode `{"result": [{"from_name": <TextArea name>, "to_name": <Image name>,
        "type": "textarea", "value": {"text": ["red car"]}}]}`, otherwise None. A text holding several lines gives
        one prompt per line. Free-text prompts whose label cannot be decided are skipped with a warning.
        """
        free_text = [(text, "context") for text in self._context_texts(context or {})]
        for area in self.prompt_areas:
            free_text += [(text, "data") for text in _prompt_lines(task_data.get(area.data_field))]

        prompts = [Prompt(text, label, source) for text, source in free_text if (label := self._label_for(text))]
        prompts += [
            Prompt(label.prompt, label.value, "label")
            for control in self.controls
            for label in control.labels
            if label.prompt
        ]
        unique: dict[tuple[str, str], Prompt] = {}
        for prompt in prompts:
            unique.setdefault((prompt.text.casefold(), prompt.label), prompt)
        return list(unique.values())

    def asked_interactively(self, context: Mapping[str, Any] | None) -> bool:
        """Whether an annotator's prompt in the editor (/predict's params.context) asks about this image."""
        return any(True for _ in self._context_texts(context or {}))

    def _context_texts(self, context: Mapping[str, Any]) -> Iterator[str]:
        area_names = {area.name for area in self.prompt_areas}
        for result in context.get("result") or ():
            if result.get("from_name") in area_names and result.get("to_name", self.name) == self.name:
                yield from _prompt_lines((result.get("value") or {}).get("text"))

    def _label_for(self, prompt: str) -> str | None:
        if self.referring_label is not None:
            return self.referring_label
        label = _label_named_in(prompt, _free_text_candidates(self.controls))
        if label is None:
            logger.warning(
                'Skipped the prompt "%s" on <Image name="%s">: it names none of the labels and no label is marked '
                'referring="true" to receive free-text prompts.',
                prompt,
                self.name,
            )
        return label

    @classmethod
    def from_tag(cls, tag: ObjectTag, controls: Sequence[ControlTag]) -> ImageSpec:
        if tag.get_attr("valueList"):
            raise LabelConfigError(
                f'<Image name="{tag.name}"> shows a list of images (valueList), which this backend does not segment: '
                'use value="$image" with one image per task.'
            )
        if not tag.value_is_variable:
            raise LabelConfigError(
                f'<Image name="{tag.name}" value="{tag.value}"> does not name a task data field: use value="$image".'
            )
        label_controls = [ControlSpec.from_tag(c) for c in controls if c.tag.lower() in CONTROL_KINDS]
        text_areas = [(c, text_area_role(c, tag.name, has_masks=bool(label_controls))) for c in controls]
        return cls(
            name=tag.name,
            data_key=tag.value_name,
            polygon_controls=tuple(c for c in label_controls if c.kind == "polygonlabels"),
            brush_controls=tuple(c for c in label_controls if c.kind in PIXEL_MASK_KINDS),
            prompt_areas=tuple(PromptSpec.from_tag(c) for c, role in text_areas if role == "prompt"),
            referring_label=_referring_label(tag.name, label_controls),
            caption_areas=tuple(c.name for c, role in text_areas if role == "caption"),
            choices=tuple(
                ChoicesSpec.from_tag(c) for c in controls if c.tag.lower() == "choices" and not _per_region(c)
            ),
        )


def text_area_role(tag: ControlTag, image: str, has_masks: bool) -> Literal["prompt", "caption"] | None:
    """What a control attached to <Image name=`image`> is to this backend when it is a <TextArea> (None otherwise):
    a source of referring prompts, a place for the image's caption, or neither (a per-region TextArea describes
    regions that exist already).

    The rule, in order:
    1. `caption="true"` makes it a caption TextArea, `caption="false"` a prompt TextArea.
    2. Without `caption`, a TextArea over an image with a <PolygonLabels>, <BrushLabels> or <BitmaskLabels> is a prompt
       TextArea (its prompts' masks go to those controls), as before captions existed.
    3. Without `caption`, a TextArea over an image with none of those gets the caption: prompts could go nowhere.
    Refused as ambiguous: `caption="true"` with `value="$field"` (the field would be read as prompts and the caption
    written over it), and, on an image without mask controls, a TextArea with `value="$field"` and no `caption`
    (prompts from that field with nowhere to go, or a caption?).
    """
    if tag.tag.lower() != "textarea" or _per_region(tag):
        return None
    caption = _bool_attr(tag, "caption")
    data_field = tag.get_attr("value", "")
    where = f'<TextArea name="{tag.name}" toName="{image}"'
    if caption and data_field.startswith("$"):
        raise LabelConfigError(
            f'{where} caption="true" value="{data_field}"> is ambiguous: the backend reads prompts from a TextArea\'s '
            f'value field and writes captions into caption="true" TextAreas. Remove value="{data_field}" to get the '
            'caption there, or remove caption="true" to read prompts from the field.'
        )
    if caption is not None:
        return "caption" if caption else "prompt"
    if has_masks:
        return "prompt"
    if data_field.startswith("$"):
        raise LabelConfigError(
            f'{where} value="{data_field}"> is ambiguous: it names a prompt field, but the image has no '
            '<PolygonLabels>, <BrushLabels> or <BitmaskLabels> for the prompts\' masks. Add caption="true" to get '
            "the image's caption in it, or attach a mask control with a <Label> for the prompts."
        )
    return "caption"


@dataclass(frozen=True)
class ProjectSpec:
    """Everything this backend reads from one labeling config."""

    images: tuple[ImageSpec, ...]  # only images with a control this backend fills (_fillable)

    @classmethod
    def parse(cls, label_config: str | None) -> ProjectSpec:
        if not label_config or not label_config.strip():
            raise LabelConfigError("The project has no labeling config yet: set one up in the project's settings.")
        try:
            interface = LabelInterface(label_config)
        except (LabelStudioXMLSyntaxErrorSentryIgnored, ValueError) as error:
            raise LabelConfigError(f"The labeling config is not valid XML: {error}") from error

        if not interface.image_tags:
            raise LabelConfigError(
                "The labeling config has no <Image>. The X-Decoder backend segments images: add "
                '<Image name="image" value="$image"/> and a <PolygonLabels> or <BrushLabels> with toName="image".'
            )
        images = []
        for image in interface.image_tags:
            attached = [control for control in interface.controls if image.name in control.to_name]
            if any(_fillable(control) for control in attached):
                images.append(ImageSpec.from_tag(image, attached))
        if not images:
            names = ", ".join(f'"{image.name}"' for image in interface.image_tags)
            raise LabelConfigError(
                f"No <PolygonLabels>, <BrushLabels>, <BitmaskLabels>, <TextArea> or <Choices> is attached to an "
                f"<Image> (toName={names}). The X-Decoder backend returns masks, captions and choices for images: "
                "add one of these controls."
            )
        return cls(images=tuple(images))


def _fillable(control: ControlTag) -> bool:
    kind = control.tag.lower()
    return kind in CONTROL_KINDS or (kind in ("textarea", "choices") and not _per_region(control))


def _per_region(control: ControlTag) -> bool:
    """A per-region TextArea or Choices describes regions that exist already, not the image."""
    return str(control.get_attr("perRegion", "false")).casefold() == "true"


def _is_default_stuff(names: Iterable[str]) -> bool:
    """Whether any of a label's names is in DEFAULT_STUFF_NAMES, case-insensitively, by its head noun.

    COCO names put the class first ("wall-brick", "sky-other-merged"), so only the part before the first hyphen
    counts; in plain English the last word is the head noun ("blue sky", "brick wall", but "sea lion", "road sign").
    Plurals match their singular ("trees", "bushes", "skies").
    """
    for name in names:
        words = _words(name.split("-")[0])
        if words and _singulars(words[-1]) & DEFAULT_STUFF_NAMES:
            return True
    return False


def _referring_label(image_name: str, controls: list[ControlSpec]) -> str | None:
    """The label free-text prompts on this image get; see ImageSpec.referring_label."""
    marked = {label.value for control in controls for label in control.labels if label.referring}
    if len(marked) > 1:
        raise LabelConfigError(
            f'Several labels on <Image name="{image_name}"> are marked referring="true" ({", ".join(sorted(marked))}): '
            "mark exactly one, the label that free-text prompts get."
        )
    candidates = marked or {label.value for label in _free_text_candidates(controls)}
    return next(iter(candidates)) if len(candidates) == 1 else None


def _free_text_candidates(controls: Iterable[ControlSpec]) -> list[LabelSpec]:
    # A label with a fixed prompt stands for that prompt only.
    return [label for control in controls for label in control.labels if label.prompt is None]


def _label_named_in(prompt: str, labels: Iterable[LabelSpec]) -> str | None:
    """The label whose value or texts occur first in the prompt, as whole words; the longest name wins a tie.
    A referring expression names its object first: "the car next to the building" is a car."""
    prompt_words = _words(prompt)
    best: tuple[int, int, str] | None = None
    for label in labels:
        for name in (label.value, *label.texts):
            name_words = _words(name)
            position = _find_words(name_words, prompt_words)
            if position is not None and (best is None or (position, -len(name_words)) < best[:2]):
                best = (position, -len(name_words), label.value)
    return best[2] if best else None


def _find_words(needle: list[str], haystack: list[str]) -> int | None:
    """Where `needle` first occurs in `haystack`, its last word matching in singular or plural."""
    if not needle:
        return None
    for start in range(len(haystack) - len(needle) + 1):
        candidate = haystack[start : start + len(needle)]
        if candidate[:-1] == needle[:-1] and _singulars(candidate[-1]) & _singulars(needle[-1]):
            return start
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.casefold())


def _singulars(word: str) -> set[str]:
    """The word and what it could be the plural of; a loose rule is enough to compare names."""
    if len(word) <= 2:
        return {word}
    forms = {word}
    if word.endswith("s"):
        forms.add(word[:-1])
    if word.endswith("es"):
        forms.add(word[:-2])
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    return forms


def _split_names(names: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (names or "").split(",") if name.strip())


def _model_texts(predicted_values: str | None, hint: str | None, shown: str) -> tuple[str, ...]:
    """What X-Decoder reads for a label or a choice: `predicted_values`, else `hint`, else the shown value."""
    return _split_names(predicted_values) or _split_names(hint) or (shown,)


def _prompt_lines(value: Any) -> list[str]:
    """Prompts from a task data field or a TextArea result: a string (one prompt per line) or a list of strings."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [line.strip() for text in texts if isinstance(text, str) for line in text.splitlines() if line.strip()]


def _bool_attr(tag: LabelTag | ControlTag, name: str, control: ControlTag | None = None) -> bool | None:
    """A true/false attribute of a <Label> of `control`, or of a control itself."""
    value = tag.get_attr(name)
    if value is None:
        return None
    if value.casefold() not in ("true", "false"):
        if control is not None:
            where = f'<Label value="{tag.value}"> in <{control.tag} name="{control.name}">'
        else:
            where = f'<{tag.tag} name="{tag.name}">'
        raise LabelConfigError(f'{where} has {name}="{value}": use "true" or "false".')
    return value.casefold() == "true"
