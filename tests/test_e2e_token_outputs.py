"""End to end with a real Label Studio 1.23.2: BitmaskLabels, a caption TextArea and Choices (issue #18).

    XDECODER_E2E_LABEL_STUDIO=/path/to/label-studio python -m pytest tests/test_e2e_token_outputs.py

Our backend (`xdecoder-ls serve`, a tiny random model that can caption) is connected to a project whose config has
all three; Retrieve predictions stores what it answers, and Label Studio's own API must list it with its results. Then
a real browser (Debian's Chromium through Selenium, as tests/test_browser.py) opens the task: the bitmasks are drawn
over the image, the caption and the choices are shown, and submitting the prediction as the annotation gives back
the same caption, choices and masks. Also: every ready config in label_config/ is accepted by Label Studio, and the
installed editor still reads BitmaskLabels by the keys backend/brush.py writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.brush import png_data_url_to_mask
from tests import e2e
from tests.browser import chromium, log_in, wait_until
from tests.helpers import backend_settings, subprocess_env, write_tiny_checkpoint
from tests.standin_ls import png

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 96, 64

CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image">
    <Label value="Sky" stuff="true" background="#2196f3"/><Label value="Car" background="#e53935"/>
  </BitmaskLabels>
  <TextArea name="caption" toName="image" caption="true"/>
  <Choices name="scene" toName="image"><Choice value="Street" predicted_values="a street"/><Choice value="Beach"/>
  </Choices>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="Red"/><Choice value="Blue"/><Choice value="Green"/>
  </Choices>
</View>"""

pytestmark = e2e.marks


@pytest.fixture(scope="module")
def predicted(label_studio_url, tmp_path_factory):
    """A project with CONFIG and one uploaded image, our backend connected, predictions retrieved: (api client,
    project id, task, the stored prediction)."""
    from backend.queues import EmbeddedRedis

    folder = tmp_path_factory.mktemp("xdls-tokens")
    checkpoint = write_tiny_checkpoint(folder / "captioning.safetensors", seed=3, fmt="safetensors", captioning=True)
    settings = backend_settings(checkpoint, folder, label_studio_url, XDECODER_SHORT_SIDE=64)
    ls = e2e.api(label_studio_url)
    try:
        with e2e.running_backend(subprocess_env(settings), folder / "serve.log") as backend_url:
            project, (task_id,) = e2e.new_project(ls, "tokens", CONFIG, {"scene.png": png(WIDTH, HEIGHT)})
            e2e.connect_and_retrieve(ls, project, backend_url)
            task = ls.get(f"/api/tasks/{task_id}").json()
            (prediction,) = ls.get("/api/predictions/", params={"task": task_id}).json()
            yield ls, project, task, prediction
    finally:
        EmbeddedRedis(folder / "redis").stop()  # the server started it as a daemon


def by_name(result: list[dict]) -> dict[str, list[dict]]:
    named: dict[str, list[dict]] = {}
    for region in result:
        named.setdefault(region["from_name"], []).append(region)
    return named


def test_label_studio_stores_the_bitmasks_the_caption_and_the_choices(predicted):
    _, _, _, prediction = predicted
    assert prediction["model_version"] == "captioning"
    named = by_name(prediction["result"])
    assert set(named) == {"mask", "caption", "scene", "tags"}

    assert named["mask"] and all(region["type"] == "bitmasklabels" for region in named["mask"])
    for region in named["mask"]:
        assert region["value"]["bitmasklabels"][0] in ("Sky", "Car")
        assert png_data_url_to_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH).any()
    (caption,) = named["caption"]
    assert caption["type"] == "textarea" and caption["value"]["text"][0].strip() and 0 < caption["score"] <= 1
    (scene,) = named["scene"]
    assert scene["type"] == "choices" and len(scene["value"]["choices"]) == 1
    assert scene["value"]["choices"][0] in ("Street", "Beach")
    (tags,) = named["tags"]
    assert 1 <= len(tags["value"]["choices"]) <= 3 and set(tags["value"]["choices"]) <= {"Red", "Blue", "Green"}
    # The task's score is the masks' alone (masks are asked): the share of the image labelled with confidence.
    painted = sum(
        png_data_url_to_mask(r["value"]["imageDataURL"], HEIGHT, WIDTH).sum() * r["score"] for r in named["mask"]
    )
    assert prediction["score"] == pytest.approx(painted / (WIDTH * HEIGHT), abs=1e-4)


@pytest.mark.parametrize("config", sorted(path.name for path in (ROOT / "label_config").glob("*.xml")))
def test_label_studio_accepts_every_ready_config(label_studio_url, config):
    ls = e2e.api(label_studio_url)
    label_config = (ROOT / "label_config" / config).read_text()
    response = ls.post("/api/projects/", json={"title": config, "label_config": label_config})
    assert response.status_code == 201, response.text


def test_the_installed_editor_reads_bitmasks_by_the_keys_we_write():
    """Label Studio 1.23.2's built editor: a region whose value has `imageDataURL` is a bitmask region, serialised
    back as `{imageDataURL}` beside the labels of its `bitmasklabels` control."""
    site_packages = Path(e2e.LABEL_STUDIO).resolve().parents[1] / "lib"
    (editor,) = site_packages.glob("python3*/site-packages/web/dist/apps/labelstudio/358.js")
    source = editor.read_text()
    assert '"imageDataURL"in e' in source  # the region type is chosen by this key
    assert "serialize(t){const n={imageDataURL:e.imageDataURL}" in source
    assert 'stateTypes:"bitmasklabels"' in source


@pytest.fixture
def browser(tmp_path):
    """Skips its test where there is no browser (chromium() does): the other tests here need none."""
    with chromium(tmp_path / "chromium-profile", (1400, 900)) as driver:
        yield driver


# The bitmask regions of the annotation open in the editor, each as whether its mask has a bounding box: the editor
# computes it from the decoded PNG's pixels (alpha > 0) after drawing it, so it is set only for a mask it has read.
EDITOR_BITMASKS = """
const annotation = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;
if (!annotation) return [];
return annotation.regionStore.regions.filter(r => r.type === 'bitmaskregion').map(r => Boolean(r.bbox));
"""


def test_the_editor_shows_them_and_submits_them_back(label_studio_url, predicted, browser, tmp_path):
    from selenium.webdriver.common.by import By

    ls, project, task, prediction = predicted
    named = by_name(prediction["result"])
    log_in(browser, label_studio_url, tmp_path / "login.png")

    browser.get(f"{label_studio_url}/projects/{project}/data?task={task['id']}")
    caption = named["caption"][0]["value"]["text"][0]
    wait_until(lambda: caption in browser.find_element(By.TAG_NAME, "body").text, 120,
               f"the editor did not show the caption {caption!r}", browser, tmp_path / "editor.png")  # fmt: skip
    # Every bitmask is a region of the editor, its PNG decoded and drawn (the screenshot shows them painted).
    wait_until(lambda: browser.execute_script(EDITOR_BITMASKS) == [True] * len(named["mask"]), 60,
               f"the editor did not draw the {len(named['mask'])} bitmasks", browser,
               tmp_path / "editor.png")  # fmt: skip
    browser.save_screenshot(str(tmp_path / "editor.png"))
    print(f"editor screenshot: {tmp_path / 'editor.png'}")

    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Submit current annotation']").click()
    annotations = wait_until(lambda: ls.get(f"/api/tasks/{task['id']}/annotations/").json(), 60,
                             "Label Studio stored no annotation", browser, tmp_path / "submitted.png")  # fmt: skip
    (annotation,) = annotations
    submitted = by_name(annotation["result"])
    for name in ("caption", "scene", "tags"):
        assert [r["value"] for r in submitted[name]] == [r["value"] for r in named[name]], name
    assert sorted(r["value"]["bitmasklabels"][0] for r in submitted["mask"]) == sorted(
        r["value"]["bitmasklabels"][0] for r in named["mask"]
    )
    for region in submitted["mask"]:
        assert png_data_url_to_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH).any()
