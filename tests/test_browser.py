"""A person's path through the real Label Studio 1.23.2 in a real browser: log in, open a task our backend predicted,
see its regions listed and its polygons drawn over the image, submit the prediction as the annotation, and the
correction reaches our corrections store through Label Studio's webhook.

Debian's Chromium and ChromeDriver (`apt-get install chromium chromium-driver`; scripts/test.sh installs them when
missing) driven by Selenium; no browser is downloaded. The model is a tiny X-Decoder pre-trained here on the synthetic
world of bench/synthetic_world.py, whose masks follow the shapes, so that a person can judge the screenshot: it is
kept in pytest's temporary directory, and with XDECODER_UPDATE_SCREENSHOTS=1 copied to
docs/images/label-studio-editor.png, the README's picture.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import e2e
from tests.browser import chromium, log_in, wait_until
from tests.browser import marks as browser_marks
from tests.helpers import backend_settings, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
README_SCREENSHOT = ROOT / "docs" / "images" / "label-studio-editor.png"
SCENE_SEED = 4  # grass, water, a ball and a brick (each also the one its referring label names)
SHOWN_SIZE = 480  # the synthetic world's 96-pixel image, enlarged so that the editor shows it big enough to judge
WINDOW = (1600, 1000)
LABEL_COLOURS = {"grass": "#4caf50", "water": "#2196f3", "ball": "#ffc107", "brick": "#e53935",
                 "leftmost ball": "#ff6d00", "biggest brick": "#8e24aa"}  # fmt: skip

pytestmark = [*browser_marks, pytest.mark.slow]


@pytest.fixture(scope="module")
def world_checkpoint(request, tmp_path_factory) -> Path:
    """The tiny model pre-trained on the synthetic world, kept in pytest's cache between runs (minutes on 2 cores)."""
    from bench.synthetic_world import pretrain_tiny_model
    from xdecoder import save_checkpoint

    folder = tmp_path_factory.mktemp("world")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    # The learning benchmark's pre-training (bench/learning.py), so that both can use one cached model.
    model = pretrain_tiny_model(steps=400, cache_dir=Path(cache.mkdir("synthetic-world")) if cache else folder)
    return save_checkpoint(model, folder / "synthetic-world.safetensors")  # the file's name is the model version


@pytest.fixture(scope="module")
def backend(label_studio_url, world_checkpoint, tmp_path_factory):
    from backend.queues import EmbeddedRedis
    from bench.synthetic_world import IMAGE_SIZE

    folder = tmp_path_factory.mktemp("xdls-browser")
    # The served thresholds (not the random model's zeros): only what the model is sure of is shown.
    settings = backend_settings(world_checkpoint, folder, label_studio_url, XDECODER_SHORT_SIDE=IMAGE_SIZE)
    settings = settings.model_copy(update={"object_mask_threshold": 0.8, "overlap_threshold": 0.8})
    env = subprocess_env(settings)
    try:
        with e2e.running_backend(env, folder / "serve.log") as url:
            yield url, env, settings
    finally:
        EmbeddedRedis(folder / "redis").stop()  # the server started it as a daemon


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chromium-profile", WINDOW) as driver:
        yield driver


def scene_png() -> bytes:
    from bench.synthetic_world import make_scenes

    (scene,) = make_scenes(SCENE_SEED, 1)
    shown = Image.fromarray(scene.image).resize((SHOWN_SIZE, SHOWN_SIZE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    shown.save(buffer, "PNG")
    return buffer.getvalue()


def region_count(driver) -> int:
    """Regions in the editor's region list (the outliner), one row each."""
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, ".lsf-outliner .lsf-tree__node:not(.lsf-tree__node_type_footer)"))


def shown_image(driver) -> np.ndarray:
    """[H, W, 3] the part of the window where the editor shows the task's image, as a screenshot has it."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, ".lsf-image img").rect
    window = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    left, top = round(box["x"]), round(box["y"])
    return np.asarray(window.crop((left, top, left + round(box["width"]), top + round(box["height"])))).astype(int)


def coloured(label_config: str) -> str:
    """The synthetic world's config with a colour per label and half-opaque fills, for a screenshot a person reads."""
    for label, colour in LABEL_COLOURS.items():
        label_config = label_config.replace(f'<Label value="{label}"', f'<Label value="{label}" background="{colour}"')
    control = '<PolygonLabels name="label" toName="image"'
    return label_config.replace(control, f'{control} strokeWidth="2" opacity="0.45"')


def test_an_annotator_submits_the_prediction_in_the_editor_and_the_correction_reaches_the_backend(
    label_studio_url, backend, browser, tmp_path
):
    """Label Studio opens a task with a prediction as a new annotation pre-filled with it; submitting that unchanged
    is how an annotator accepts a prediction."""
    from selenium.webdriver.common.by import By

    from backend.corrections import CorrectionStore
    from backend.queues import connect
    from bench.synthetic_world import LABEL_CONFIG

    backend_url, env, settings = backend
    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    print(f"screenshots in {screenshots}")
    ls = e2e.api(label_studio_url)
    config = coloured(LABEL_CONFIG)
    assert config.count("background=") == len(LABEL_COLOURS)
    project, (task_id,) = e2e.new_project(ls, "Synthetic world", config, {"scene.png": scene_png()})
    e2e.connect_and_retrieve(ls, project, backend_url)
    (prediction,) = ls.get("/api/predictions/", params={"task": task_id}).json()
    predicted = prediction["result"]
    labels = {label for region in predicted for label in region["value"]["polygonlabels"]}
    assert {"grass", "water", "ball", "brick"} <= labels, labels

    log_in(browser, label_studio_url, screenshots / "1-login.png")
    browser.get(f"{label_studio_url}/projects/{project}/data?task={task_id}")
    wait_until(lambda: region_count(browser) == len(predicted), 120,
               f"the editor's region list did not show the {len(predicted)} predicted regions", browser,
               screenshots / "2-editor-failed.png")  # fmt: skip
    listed = browser.find_element(By.CSS_SELECTOR, ".lsf-outliner").text
    assert all(label in listed for label in labels), listed
    time.sleep(2)  # the image and the fills' last frames
    browser.save_screenshot(str(screenshots / "2-editor.png"))
    if os.environ.get("XDECODER_UPDATE_SCREENSHOTS") == "1":  # the README's picture, only when asked
        shutil.copyfile(screenshots / "2-editor.png", README_SCREENSHOT)
    # The polygons are drawn over the image: with the regions hidden the editor shows the image as uploaded; shown,
    # their fills change most of it (grass and water cover it all).
    with_regions = shown_image(browser)
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Hide all regions']").click()
    time.sleep(2)
    browser.save_screenshot(str(screenshots / "2-editor-regions-hidden.png"))
    without_regions = shown_image(browser)
    height, width = without_regions.shape[:2]
    uploaded = np.asarray(Image.open(io.BytesIO(scene_png())).resize((width, height))).astype(int)
    changed = (np.abs(with_regions - without_regions).max(axis=2) > 24).mean()
    off_by = np.abs(without_regions - uploaded).mean()
    print(f"the shown image is off the upload by {off_by:.1f} levels on average; the regions change {changed:.0%}")
    assert off_by < 12  # the task's image is where the test looks
    assert changed > 0.3, f"the regions change {changed:.0%} of the image"
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Show all regions']").click()

    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Submit current annotation']").click()
    annotations = wait_until(lambda: ls.get(f"/api/tasks/{task_id}/annotations/").json(), 60,
                             "Label Studio stored no annotation", browser, screenshots / "3-failed.png")  # fmt: skip
    browser.save_screenshot(str(screenshots / "3-submitted.png"))
    (annotation,) = annotations
    assert annotation["parent_prediction"] == prediction["id"] and len(annotation["result"]) == len(predicted)

    # The webhook put the event on the events queue; a worker applies it to the corrections store.
    worker = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--queues", "events", "--burst"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-2000:]
    (correction,) = CorrectionStore(connect(settings)).all(project)
    assert (correction.annotation_id, correction.task_id) == (annotation["id"], task_id)

    def outlines(regions: list[dict]) -> list:
        return sorted((r["value"]["polygonlabels"], r["value"]["points"]) for r in regions)

    assert outlines(correction.result) == outlines(predicted)  # the prediction, accepted as it was
