"""Tests for backend.label_config: the shipped configs, the payloads Label Studio really sent, label texts and
aliases, stuff, where referring prompts come from and which label they get, and the errors for unsupported configs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from backend.label_config import (
    DEFAULT_PROMPT_FIELD,
    ChoiceSpec,
    ChoicesSpec,
    ControlSpec,
    ImageSpec,
    LabelConfigError,
    LabelSpec,
    ProjectSpec,
    Prompt,
    PromptSpec,
)

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"
PAYLOADS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "payloads"

THINGS = [
    "Person",
    "Bicycle",
    "Car",
    "Motorcycle",
    "Bus",
    "Truck",
    "Traffic light",
    "Dog",
    "Cat",
    "Bird",
    "Bench",
    "Potted plant",
]
STUFF = ["Sky", "Road", "Pavement", "Grass", "Tree", "Building", "Wall", "Water", "Mountain"]


def only_image(config: str) -> ImageSpec:
    (image,) = ProjectSpec.parse(config).images
    return image


def labels_of(*labels: str, extra: str = "") -> ImageSpec:
    """The image of a one-image config whose PolygonLabels holds the given <Label> tags."""
    return only_image(
        f'<View><Image name="image" value="$image"/><PolygonLabels name="label" toName="image">{"".join(labels)}'
        f"</PolygonLabels>{extra}</View>"
    )


def only_label(label_tag: str) -> LabelSpec:
    (label,) = labels_of(label_tag).polygon_controls[0].labels
    return label


PROMPT_AREA = '<TextArea name="prompt" toName="image" showSubmitButton="true"/>'


def prompts(image: ImageSpec, data: dict, context: dict | None = None) -> list[tuple[str, str, str]]:
    return [(prompt.text, prompt.label, prompt.source) for prompt in image.prompts(data, context)]


def textarea_context(*texts: str, from_name: str = "prompt", to_name: str = "image") -> dict:
    """`params.context` as Label Studio sends it when an annotator submits a TextArea (predict_interactive.json)."""
    return {
        "result": [
            {
                "from_name": from_name,
                "to_name": to_name,
                "type": "textarea",
                "value": {"text": list(texts)},
                "origin": "manual",
            }
        ]
    }


# --- the shipped configs


@pytest.mark.parametrize(
    ("file", "kind"), [("panoptic_polygons.xml", "polygonlabels"), ("panoptic_brush.xml", "brushlabels")]
)
def test_panoptic_configs_have_things_and_stuff(file: str, kind: str) -> None:
    image = only_image((CONFIGS / file).read_text())

    assert (image.name, image.data_key, image.prompt_areas) == ("image", "image", ())
    (control,) = image.controls
    assert (control.name, control.kind) == ("label", kind)
    assert [label.value for label in control.labels if not label.stuff] == THINGS
    assert [label.value for label in control.labels if label.stuff] == STUFF
    assert control.panoptic_labels == control.labels
    assert control.label("Person").texts == ("person", "pedestrian")
    assert control.label("Water").texts == ("water", "sea", "river", "lake")
    assert control.label("Traffic light").texts == ("Traffic light",)


def test_brush_config_fills_brush_controls_only() -> None:
    image = only_image((CONFIGS / "panoptic_brush.xml").read_text())

    assert image.polygon_controls == ()
    assert [control.name for control in image.brush_controls] == ["label"]


def test_referring_config_gives_every_prompt_the_referred_object_label() -> None:
    image = only_image((CONFIGS / "referring_polygons.xml").read_text())

    assert [(area.name, area.data_field) for area in image.prompt_areas] == [("prompt", "prompt")]
    assert image.referring_label == "Referred object"
    assert image.polygon_controls[0].panoptic_labels == ()
    assert prompts(image, {"image": "x.jpg", "prompt": "the dog"}, textarea_context("the red car")) == [
        ("the red car", "Referred object", "context"),
        ("the dog", "Referred object", "data"),
    ]


def test_combined_config_keeps_the_referring_label_out_of_panoptic() -> None:
    image = only_image((CONFIGS / "panoptic_and_referring_polygons.xml").read_text())
    (control,) = image.polygon_controls

    assert [label.value for label in control.panoptic_labels] == THINGS + STUFF
    assert [label.value for label in control.labels if label.referring] == ["Referred object"]
    assert image.referring_label == "Referred object"
    assert prompts(image, {"prompt": "the red car"}) == [("the red car", "Referred object", "data")]


def test_captioning_config_fills_the_caption_only() -> None:
    image = only_image((CONFIGS / "image_captioning.xml").read_text())

    assert (image.controls, image.prompt_areas, image.choices) == ((), (), ())
    assert image.caption_areas == ("caption",)


def test_classification_config_has_a_single_and_a_multiple_choice() -> None:
    image = only_image((CONFIGS / "image_classification.xml").read_text())

    assert (image.controls, image.prompt_areas, image.caption_areas) == ((), (), ())
    scene, tags = image.choices
    assert (scene.name, scene.multiple, tags.name, tags.multiple) == ("scene", False, "tags", True)
    assert [choice.value for choice in scene.choices({})] == ["Street", "Indoor", "Nature", "Beach"]
    assert scene.choices({})[0].texts == ("a street", "a road with cars")


def test_panoptic_caption_and_tags_config_fills_all_three_and_takes_no_prompts() -> None:
    image = only_image((CONFIGS / "panoptic_polygons_caption_tags.xml").read_text())

    (control,) = image.polygon_controls
    assert [label.value for label in control.panoptic_labels][:3] == ["Person", "Bicycle", "Car"]
    assert image.prompt_areas == () and image.caption_areas == ("caption",)
    (tags,) = image.choices
    assert tags.multiple and [choice.value for choice in tags.choices({})][:2] == ["Street", "Park"]


def test_bitmask_config_fills_bitmask_labels() -> None:
    image = only_image((CONFIGS / "panoptic_bitmask.xml").read_text())

    assert image.polygon_controls == ()
    (control,) = image.brush_controls
    assert (control.name, control.kind) == ("label", "bitmasklabels")
    assert [label.value for label in control.labels if label.stuff] == ["Sky", "Road", "Grass", "Tree", "Building"]


def readme_snippets() -> list[str]:
    return re.findall(r"```xml\n(.*?)```", (CONFIGS / "README.md").read_text(), re.DOTALL)


def test_readme_snippets_parse() -> None:
    images = [only_image(snippet) for snippet in readme_snippets()]

    assert len(images) == 7
    assert [image.referring_label for image in images] == [
        None,
        None,
        "Referred object",
        "Referred object",
        "Car",
        None,
        None,
    ]
    segment_and_caption, tags = images[5:]
    assert segment_and_caption.caption_areas == ("caption",)
    assert [area.name for area in segment_and_caption.prompt_areas] == ["prompt"]
    assert [(choices.name, choices.multiple) for choices in tags.choices] == [("tags", True)]


# --- what Label Studio really sent


def payload(name: str) -> dict:
    path = PAYLOADS / name
    if not path.exists():
        pytest.skip(f"Label Studio payload {path} not available (../shared is absent in this checkout)")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "name",
    [
        "setup.json",
        "predict_batch.json",
        "predict_interactive.json",
        "webhook_annotation_created.json",
        "webhook_annotation_updated.json",
        "webhook_annotations_deleted.json",
        "webhook_start_training.json",
    ],
)
def test_payload_configs_parse(name: str) -> None:
    sent = payload(name)
    image = only_image(sent.get("schema") or sent.get("label_config") or sent["project"]["label_config"])

    assert (image.name, image.data_key) == ("image", "image")
    (control,) = image.polygon_controls
    assert control.name == "label"
    assert [(label.value, label.texts, label.stuff) for label in control.labels] == [
        ("Car", ("car", "automobile"), False),
        ("Sky", ("Sky",), True),
    ]
    assert [(area.name, area.data_field) for area in image.prompt_areas] == [("prompt", DEFAULT_PROMPT_FIELD)]
    # Car and Sky, no label marked referring: a prompt gets the label it names.
    assert image.referring_label is None


def test_interactive_payload_prompt_comes_from_the_context() -> None:
    sent = payload("predict_interactive.json")
    image = only_image(sent["label_config"])
    (task,) = sent["tasks"]

    assert image.prompts(task["data"], sent["params"]["context"]) == [Prompt("red car", "Car", "context")]


def test_batch_payload_prompts_come_from_the_task_data() -> None:
    sent = payload("predict_batch.json")
    image = only_image(sent["label_config"])

    assert [prompts(image, task["data"], sent["params"]["context"]) for task in sent["tasks"]] == [
        [],
        [("the red car", "Car", "data")],
    ]


# --- label texts and aliases


def test_predicted_values_are_what_the_model_reads() -> None:
    label = only_label('<Label value="Car" predicted_values=" car, automobile,,sedan "/>')

    assert (label.value, label.texts) == ("Car", ("car", "automobile", "sedan"))


def test_value_is_read_when_there_are_no_predicted_values() -> None:
    assert only_label('<Label value="Traffic light"/>').texts == ("Traffic light",)


def test_hint_names_are_read_when_there_are_no_predicted_values() -> None:
    assert only_label('<Label value="Car" hint="car, automobile"/>').texts == ("car", "automobile")
    assert only_label('<Label value="Car" hint="x" predicted_values="car"/>').texts == ("car",)


def test_alias_goes_back_to_label_studio_and_the_value_to_the_model() -> None:
    label = only_label('<Label value="Car" alias="c1" background="#ff0000" hotkey="1"/>')

    assert (label.value, label.texts) == ("c1", ("Car",))


# --- stuff and things


@pytest.mark.parametrize(
    "name",
    ["Sky", "sky", "SKY", "Trees", "Bushes", "Skies", "Blue sky", "Brick wall", "sky-other-merged", "wall-brick",
     "water-other", "playingfield", "Floor", "Ceiling", "Sand", "Snow", "Dirt", "Fence", "Background"],
)  # fmt: skip
def test_default_stuff_names(name: str) -> None:
    assert only_label(f'<Label value="{name}"/>').stuff


@pytest.mark.parametrize("name", ["Car", "Person", "Sea lion", "Road sign", "Water bottle", "Door", "House", "Window"])
def test_other_names_are_things(name: str) -> None:
    assert not only_label(f'<Label value="{name}"/>').stuff


def test_predicted_values_count_for_stuff() -> None:
    assert only_label('<Label value="Greenery" predicted_values="lawn,shrubs"/>').stuff


def test_stuff_attribute_overrides_the_default() -> None:
    image = labels_of('<Label value="Tree" stuff="false"/>', '<Label value="Door" stuff="TRUE"/>')

    assert [(label.value, label.stuff) for label in image.controls[0].labels] == [("Tree", False), ("Door", True)]


def test_stuff_attribute_must_be_true_or_false() -> None:
    with pytest.raises(LabelConfigError, match=r'<Label value="Sky"> in <PolygonLabels name="label"> has stuff="yes"'):
        labels_of('<Label value="Sky" stuff="yes"/>')


# --- where prompts come from


def test_prompts_from_the_default_data_field() -> None:
    image = labels_of('<Label value="Object"/>', extra=PROMPT_AREA)

    assert prompts(image, {"image": "a.jpg", "prompt": "the red car\n\n  the dog  "}) == [
        ("the red car", "Object", "data"),
        ("the dog", "Object", "data"),
    ]


def test_prompts_from_the_field_the_textarea_names() -> None:
    image = labels_of('<Label value="Object"/>', extra='<TextArea name="ask" toName="image" value="$question"/>')

    assert [(area.name, area.data_field) for area in image.prompt_areas] == [("ask", "question")]
    assert prompts(image, {"question": ["the red car", "the dog", 3], "prompt": "ignored"}) == [
        ("the red car", "Object", "data"),
        ("the dog", "Object", "data"),
    ]


def test_missing_or_empty_prompt_fields_give_no_prompts() -> None:
    image = labels_of('<Label value="Object"/>', extra=PROMPT_AREA)

    assert prompts(image, {"image": "a.jpg"}) == []
    assert prompts(image, {"prompt": None}) == []
    assert prompts(image, {"prompt": "  "}) == []


def test_context_prompts_come_first_and_only_from_this_images_textareas() -> None:
    image = labels_of('<Label value="Object"/>', extra=PROMPT_AREA)
    context = textarea_context("the red car", "the blue bus")
    context["result"] += [
        *textarea_context("other textarea", from_name="notes")["result"],
        *textarea_context("other image", to_name="image2")["result"],
        {"from_name": "label", "to_name": "image", "type": "polygonlabels", "value": {"points": []}},
    ]

    assert prompts(image, {"prompt": "the dog"}, context) == [
        ("the red car", "Object", "context"),
        ("the blue bus", "Object", "context"),
        ("the dog", "Object", "data"),
    ]


def test_context_without_result_gives_no_context_prompts() -> None:
    image = labels_of('<Label value="Object"/>', extra=PROMPT_AREA)

    assert prompts(image, {}, {}) == []
    assert prompts(image, {}, {"result": None}) == []


def test_a_prompt_arriving_twice_is_answered_once() -> None:
    image = labels_of('<Label value="Object"/>', extra=PROMPT_AREA)

    assert prompts(image, {"prompt": "The red car"}, textarea_context("the red car")) == [
        ("the red car", "Object", "context")
    ]


def test_labels_with_a_fixed_prompt_prompt_every_task() -> None:
    image = labels_of(
        '<Label value="Car"/>',
        '<Label value="Left car" prompt=" the car on the left "/>',
        '<Label value="Driver" prompt="the person driving the car"/>',
    )

    assert image.prompt_areas == ()
    assert [label.value for label in image.controls[0].panoptic_labels] == ["Car"]
    assert prompts(image, {"image": "a.jpg"}) == [
        ("the car on the left", "Left car", "label"),
        ("the person driving the car", "Driver", "label"),
    ]


def test_per_region_textareas_are_not_prompts() -> None:
    image = labels_of(
        '<Label value="Object"/>', extra='<TextArea name="note" toName="image" perRegion="true" value="$prompt"/>'
    )

    assert image.prompt_areas == ()
    assert prompts(image, {"prompt": "the red car"}, textarea_context("the red car", from_name="note")) == []


def test_textareas_attached_to_other_objects_are_not_prompts() -> None:
    image = labels_of(
        '<Label value="Object"/>',
        extra='<Text name="caption" value="$caption"/><TextArea name="prompt" toName="caption"/>',
    )

    assert image.prompt_areas == ()


# --- which label a free-text prompt gets


def test_the_label_marked_referring_gets_free_text_prompts() -> None:
    image = labels_of(
        '<Label value="Car"/>', '<Label value="Sky"/>', '<Label value="Referred" referring="true"/>', extra=PROMPT_AREA
    )

    assert image.referring_label == "Referred"
    assert prompts(image, {"prompt": "the sky"}) == [("the sky", "Referred", "data")]


def test_the_only_label_gets_free_text_prompts() -> None:
    image = labels_of('<Label value="Thing"/>', '<Label value="Left car" prompt="the car on the left"/>')

    assert image.referring_label == "Thing"


def test_without_a_referring_label_a_prompt_gets_the_label_it_names_first() -> None:
    image = labels_of(
        '<Label value="Car" predicted_values="car,automobile"/>',
        '<Label value="Building"/>',
        '<Label value="Traffic light"/>',
        '<Label value="Light"/>',
        extra=PROMPT_AREA,
    )

    assert image.referring_label is None
    assert prompts(image, {"prompt": ["the car next to the building", "buildings behind the red AUTOMOBILE"]}) == [
        ("the car next to the building", "Car", "data"),
        ("buildings behind the red AUTOMOBILE", "Building", "data"),
    ]
    assert prompts(image, {"prompt": "the traffic lights on the left"}) == [
        ("the traffic lights on the left", "Traffic light", "data")
    ]
    # Whole words only: "cartoon" is no car.
    assert prompts(image, {"prompt": "the cartoon near the car"}) == [("the cartoon near the car", "Car", "data")]


def test_a_prompt_naming_no_label_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    image = labels_of('<Label value="Car"/>', '<Label value="Sky"/>', extra=PROMPT_AREA)

    with caplog.at_level(logging.WARNING, logger="backend.label_config"):
        assert prompts(image, {"prompt": "the tall person"}) == []
    assert 'Skipped the prompt "the tall person"' in caplog.text
    assert 'referring="true"' in caplog.text


def test_the_same_referring_label_in_polygon_and_brush_controls_is_one_label() -> None:
    label = '<Label value="Car"/><Label value="Referred" referring="true"/>'
    image = only_image(
        '<View><Image name="image" value="$image"/>'
        f'<PolygonLabels name="poly" toName="image">{label}</PolygonLabels>'
        f'<BrushLabels name="brush" toName="image">{label}</BrushLabels>'
        f"{PROMPT_AREA}</View>"
    )

    assert image.referring_label == "Referred"
    assert [control.name for control in image.controls if control.label("Referred")] == ["poly", "brush"]


def test_several_referring_labels_are_an_error() -> None:
    with pytest.raises(LabelConfigError, match=r"Several labels .* referring=\"true\" \(A, B\)"):
        labels_of('<Label value="A" referring="true"/>', '<Label value="B" referring="true"/>', extra=PROMPT_AREA)


# --- config shapes


def test_controls_may_point_at_several_images_inside_nested_views() -> None:
    spec = ProjectSpec.parse(
        """
        <View>
          <View style="display: flex">
            <View><Image name="left" value="$left"/></View>
            <View><Image name="right" value="$right"/></View>
          </View>
          <Choices name="quality" toName="left"><Choice value="good"/><Choice value="bad"/></Choices>
          <RectangleLabels name="boxes" toName="left"><Label value="Box"/></RectangleLabels>
          <PolygonLabels name="outline" toName="left,right">
            <View><Label value="Car" background="red"/><Label value="Sky" background="blue"/></View>
          </PolygonLabels>
          <BrushLabels name="paint" toName="right"><Label value="Road"/></BrushLabels>
          <TextArea name="prompt" toName="right"/>
        </View>
        """
    )

    outline = ControlSpec(
        "outline", "polygonlabels", (LabelSpec("Car", ("Car",), stuff=False), LabelSpec("Sky", ("Sky",), stuff=True))
    )
    paint = ControlSpec("paint", "brushlabels", (LabelSpec("Road", ("Road",), stuff=True),))
    quality = ChoicesSpec(
        "quality", multiple=False, static_choices=(ChoiceSpec("good", ("good",)), ChoiceSpec("bad", ("bad",)))
    )
    assert spec.images == (
        ImageSpec("left", "left", (outline,), (), prompt_areas=(), referring_label=None, choices=(quality,)),
        ImageSpec("right", "right", (outline,), (paint,), (PromptSpec("prompt", "prompt"),), referring_label=None),
    )


def test_images_without_a_supported_control_are_left_out() -> None:
    spec = ProjectSpec.parse(
        '<View><Image name="photo" value="$photo"/><Image name="thumb" value="$thumb"/>'
        '<RectangleLabels name="box" toName="thumb"><Label value="Car"/></RectangleLabels>'
        '<Choices name="c" toName="thumb" perRegion="true"><Choice value="ok"/></Choices>'
        '<PolygonLabels name="label" toName="photo"><Label value="Car"/></PolygonLabels></View>'
    )

    assert [image.name for image in spec.images] == ["photo"]


# --- configs this backend cannot serve


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "no labeling config"),
        ("  ", "no labeling config"),
        ("<View><Image", "not valid XML"),
        (
            '<View><Text name="text" value="$text"/><Labels name="l" toName="text"><Label value="A"/></Labels></View>',
            "has no <Image>",
        ),
        (
            '<View><Image name="image" value="$image"/>'
            '<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>'
            '<TextArea name="note" toName="image" perRegion="true"/></View>',
            r'<BitmaskLabels>, <TextArea> or <Choices> is attached to an <Image> \(toName="image"\)',
        ),
        (
            '<View><Image name="image" value="$image"/><PolygonLabels name="label" toName="image"/></View>',
            r'<PolygonLabels name="label"> has no <Label> tags',
        ),
        (
            '<View><Image name="image" value="$image"/>'
            '<BrushLabels name="label" toName="image" value="$labels"/></View>',
            r'<BrushLabels name="label"> loads its labels dynamically',
        ),
        (
            '<View><Image name="pages" valueList="$pages"/>'
            '<PolygonLabels name="label" toName="pages"><Label value="Car"/></PolygonLabels></View>',
            r'<Image name="pages"> shows a list of images',
        ),
        (
            '<View><Image name="image" value="https://example.com/a.jpg"/>'
            '<PolygonLabels name="label" toName="image"><Label value="Car"/></PolygonLabels></View>',
            "does not name a task data field",
        ),
        (
            '<View><Image name="image" value="$image"/>'
            '<PolygonLabels name="label" toName="image"><Label value="Car" referring="yes"/></PolygonLabels></View>',
            r'has referring="yes": use "true" or "false"',
        ),
    ],
)
def test_unsupported_configs_say_what_to_change(config: str | None, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        ProjectSpec.parse(config)


def test_label_config_error_is_a_value_error() -> None:
    assert issubclass(LabelConfigError, ValueError)


# --- BitmaskLabels, caption TextAreas and Choices (issue #18)


def test_bitmask_labels_are_pixel_mask_controls() -> None:
    spec = ProjectSpec.parse(
        '<View><Image name="image" value="$image" smoothing="false"/>'
        '<BitmaskLabels name="mask" toName="image"><Label value="Car" alias="car"/><Label value="Sky"/></BitmaskLabels>'
        "</View>"
    )

    (image,) = spec.images
    assert image.polygon_controls == ()
    (control,) = image.brush_controls
    assert control.kind == "bitmasklabels"
    assert [(label.value, label.texts, label.stuff) for label in control.labels] == [
        ("car", ("Car",), False),
        ("Sky", ("Sky",), True),
    ]


def caption_and_prompt_areas(text_areas: str, masks: bool = True) -> tuple[tuple[str, ...], list[str]]:
    controls = '<PolygonLabels name="label" toName="image"><Label value="Car"/></PolygonLabels>' if masks else ""
    (image,) = ProjectSpec.parse(f'<View><Image name="image" value="$image"/>{controls}{text_areas}</View>').images
    return image.caption_areas, [area.name for area in image.prompt_areas]


@pytest.mark.parametrize(
    ("text_areas", "masks", "captions", "prompts"),
    [
        # Over an image with a mask control, a TextArea is a prompt source unless caption="true".
        ('<TextArea name="ask" toName="image"/>', True, (), ["ask"]),
        ('<TextArea name="ask" toName="image" showSubmitButton="true"/>', True, (), ["ask"]),
        ('<TextArea name="ask" toName="image" value="$question"/>', True, (), ["ask"]),
        (
            '<TextArea name="ask" toName="image" showSubmitButton="true"/><TextArea name="cap" toName="image" '
            'caption="true"/>',
            True,
            ("cap",),
            ["ask"],
        ),
        ('<TextArea name="cap" toName="image" caption="TRUE" showSubmitButton="true"/>', True, ("cap",), []),
        # Over an image with no mask control, prompts could go nowhere: a TextArea gets the caption.
        ('<TextArea name="cap" toName="image"/>', False, ("cap",), []),
        ('<TextArea name="cap" toName="image" showSubmitButton="true"/>', False, ("cap",), []),
        ('<TextArea name="ask" toName="image" caption="false"/>', False, (), ["ask"]),
        # A per-region TextArea describes regions: neither.
        ('<TextArea name="note" toName="image" perRegion="true" caption="true"/>', True, (), []),
    ],
)
def test_the_rule_that_tells_a_caption_text_area_from_a_prompt_text_area(text_areas, masks, captions, prompts) -> None:
    assert caption_and_prompt_areas(text_areas, masks) == (captions, prompts)


@pytest.mark.parametrize(
    ("text_areas", "masks", "message"),
    [
        (
            '<TextArea name="cap" toName="image" caption="true" value="$question"/>',
            True,
            r'<TextArea name="cap" toName="image" caption="true" value="\$question"> is ambiguous.*'
            r'Remove value="\$question" to get the caption there, or remove caption="true"',
        ),
        (
            '<TextArea name="ask" toName="image" value="$question"/>',
            False,
            r'<TextArea name="ask" toName="image" value="\$question"> is ambiguous.*Add caption="true"',
        ),
        ('<TextArea name="cap" toName="image" caption="yes"/>', True, r'<TextArea name="cap"> has caption="yes"'),
    ],
)
def test_an_ambiguous_text_area_is_refused_with_what_to_change(text_areas, masks, message) -> None:
    with pytest.raises(LabelConfigError, match=message):
        caption_and_prompt_areas(text_areas, masks)


def test_an_image_with_only_a_caption_text_area_and_choices_is_served() -> None:
    spec = ProjectSpec.parse(
        """<View>
          <Image name="image" value="$image"/>
          <TextArea name="caption" toName="image" rows="3"/>
          <Choices name="scene" toName="image">
            <Choice value="Indoor" predicted_values="a room,an indoor scene"/>
            <Choice value="Outdoor" hint="street, landscape"/>
            <Choice value="Underwater" alias="water"/>
          </Choices>
          <Choices name="tags" toName="image" choice="multiple"><Choice value="Dog"/><Choice value="Cat"/></Choices>
        </View>"""
    )

    (image,) = spec.images
    assert image.controls == () and image.prompt_areas == ()
    assert image.caption_areas == ("caption",)
    scene, tags = image.choices
    assert (scene.name, scene.multiple, tags.name, tags.multiple) == ("scene", False, "tags", True)
    assert scene.choices({}) == (
        ChoiceSpec("Indoor", ("a room", "an indoor scene")),
        ChoiceSpec("Outdoor", ("street", "landscape")),
        ChoiceSpec("water", ("Underwater",)),
    )


def test_dynamic_choices_are_read_from_the_task_data() -> None:
    (image,) = ProjectSpec.parse(
        '<View><Image name="image" value="$image"/><Choices name="pick" toName="image" value="$options"/></View>'
    ).images
    (choices,) = image.choices

    assert choices.static_choices == () and choices.data_field == "options"
    options = [
        {"value": "Red car", "predicted_values": "red car,crimson car"},
        {"value": "Blue car", "alias": "blue"},
        "Truck",
        {"value": "Red car"},  # a repeated value is offered once
        {"value": ""},
        {"html": "<b>no value</b>"},
        7,
    ]
    assert choices.choices({"options": options}) == (
        ChoiceSpec("Red car", ("red car", "crimson car")),
        ChoiceSpec("blue", ("Blue car",)),
        ChoiceSpec("Truck", ("Truck",)),
    )
    assert choices.choices({}) == () and choices.choices({"options": "Truck"}) == ()
