"""ModelService: model versions per project, the time budget, and batching."""

from __future__ import annotations

import io
import itertools
import logging
import threading
import weakref

import pytest
import torch
from PIL import Image

from backend import inference
from backend.brush import png_data_url_to_mask, rle_to_mask
from backend.inference import ModelService, cpu_quota, use_cpu_threads
from backend.label_config import ProjectSpec
from backend.results import choice_probabilities
from backend.versions import VersionRegistry, project_id
from tests.standin_ls import png
from xdecoder import Predictor

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image"><Label value="Car"/><Label value="Sky"/></PolygonLabels>
</View>"""


@pytest.fixture
def service(settings):
    service = ModelService(settings)
    yield service
    service.close()


@pytest.fixture
def tasks(label_studio):
    return [{"id": i, "data": {"image": label_studio.upload(f"inf-{i}.png", png(64, 48, seed=i))}} for i in range(4)]


def test_project_ids_from_label_studio(monkeypatch):
    assert project_id("3.1795397442") == 3 and project_id(12) == 12 and project_id(None) is None
    with pytest.raises(ValueError):
        project_id("three")


def test_a_served_fine_tune_is_used_for_its_project_only(service, tasks):
    spec = ProjectSpec.parse(CONFIG)
    base = service.predict(tasks[:1], spec, project=3).predictions[0]
    changed = {"sem_seg_head.predictor.class_embed": torch.randn(64, 64, generator=torch.Generator().manual_seed(1))}
    version = service.registry.create(3, changed, parent="tiny", trained_on=5, metrics={"miou": 0.5})
    service.registry.promote(version)

    tuned = service.predict(tasks[:1], spec, project=3).predictions[0]
    other = service.predict(tasks[:1], spec, project=4).predictions[0]
    assert version.name == "tiny.p3.v1"
    assert tuned.model_version == "tiny.p3.v1" and other.model_version == "tiny"
    assert other.result == base.result and tuned.result != base.result
    # Frozen tensors are shared with the base model, not copied.
    tuned_model = service.predictor(version).model
    assert tuned_model.backbone.patch_embed.proj.weight.data_ptr() == (
        service.base_model.backbone.patch_embed.proj.weight.data_ptr()
    )
    assert torch.equal(tuned_model.decoder.class_embed, changed["sem_seg_head.predictor.class_embed"])


def test_versions_are_listed_and_persist_across_registries(settings):
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    first = registry.create(5, {"x": torch.zeros(1)}, "tiny", 3, {})
    second = registry.create(5, {"x": torch.ones(1)}, first.name, 7, {})
    registry.promote(second)
    again = VersionRegistry(settings.model_dir, settings.checkpoint)
    assert [v.name for v in again.all(5)] == ["tiny", "tiny.p5.v1", "tiny.p5.v2"]
    assert again.current(5).name == "tiny.p5.v2" and again.current(6).name == "tiny"
    assert not list((settings.model_dir / "versions").glob(".staging-*"))


def test_a_crash_while_writing_a_version_leaves_nothing(settings, monkeypatch):
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        registry.create(5, {"x": torch.zeros(1)}, "tiny", 3, {})
    assert registry.all(5) == [registry.base]
    assert list((settings.model_dir / "versions").iterdir()) == []


def test_the_time_budget_stops_before_tasks_that_cannot_finish(service, tasks):
    """A fake clock: every reading is 10 s later than the previous, and the budget is 25 s."""
    clock = itertools.count(start=0, step=10)
    service.clock = lambda: next(clock)
    outcome = service.predict(tasks, ProjectSpec.parse(CONFIG), project=3, deadline=25)
    versions = [p.model_version for p in outcome.predictions]
    assert versions[0] == "tiny" and "tiny/pending" in versions
    assert outcome.unfinished == [i for i, v in enumerate(versions) if v == "tiny/pending"]
    assert outcome.unfinished == list(range(outcome.unfinished[0], len(tasks)))  # a tail, in order


def test_batches_give_the_same_results_as_single_images(settings, tasks):
    spec = ProjectSpec.parse(CONFIG)
    single = ModelService(settings)
    batched = ModelService(settings.model_copy(update={"batch_size": 4}), model=single.base_model)
    same_size = [tasks[0], tasks[0] | {"id": 9}]  # identical images: no extra padding in the batch
    one = single.predict(same_size, spec, project=1).predictions
    many = batched.predict(same_size, spec, project=1).predictions
    # Equal up to float rounding (a batch of two takes other matmul paths than one image).
    for a, b in zip(one, many, strict=True):
        assert sorted(r["value"]["polygonlabels"][0] for r in a.result) == sorted(
            r["value"]["polygonlabels"][0] for r in b.result
        )
        assert a.score == pytest.approx(b.score, abs=1e-3)
    single.close()
    batched.close()


def test_each_task_is_reported_as_soon_as_it_is_predicted(service, tasks, label_studio):
    spec = ProjectSpec.parse(CONFIG)
    broken = {"id": 99, "data": {"image": label_studio.url + "/data/upload/1/missing.png"}}
    no_image = {"id": 98, "data": {}}
    batch = [tasks[0], broken, tasks[1], no_image]
    reported = []

    def on_task(index, prediction):
        # The next image is being fetched while this one is reported: nothing later is finished yet.
        assert all(i < index or batch[i] is no_image for i, _ in reported)
        reported.append((index, prediction))

    outcome = service.predict(batch, spec, project=3, on_task=on_task)
    assert sorted(i for i, _ in reported) == [0, 1, 2, 3]
    assert [p for _, p in sorted(reported, key=lambda r: r[0])] == outcome.predictions
    assert outcome.predictions[1].error is not None and outcome.predictions[3].error == "no_image"
    assert outcome.predictions[0].result and outcome.predictions[0].model_version == "tiny"


def test_images_are_made_ready_for_the_model_on_the_fetch_threads(service, tasks, monkeypatch):
    from xdecoder import Predictor, PreparedImage

    threads = []
    prepare = Predictor.prepare

    def recorded(self, image):
        if not isinstance(image, PreparedImage):  # predict() takes prepared images as they are
            threads.append(threading.current_thread().name)
        return prepare(self, image)

    monkeypatch.setattr(Predictor, "prepare", recorded)
    outcome = service.predict(tasks, ProjectSpec.parse(CONFIG), project=3)
    assert all(prediction.result for prediction in outcome.predictions)
    assert len(threads) == len(tasks) and all(name.startswith("fetch") for name in threads)


def test_regions_of_an_image_over_result_max_pixels_are_given_at_the_images_size(settings, label_studio):
    brush = CONFIG.replace("PolygonLabels", "BrushLabels")
    service = ModelService(settings.model_copy(update={"result_max_pixels": 64 * 48 // 4}))
    task = {"id": 1, "data": {"image": label_studio.upload("large.png", png(64, 48, seed=2))}}
    try:
        regions = service.predict([task], ProjectSpec.parse(brush), project=3).predictions[0].result
        polygons = service.predict([task], ProjectSpec.parse(CONFIG), project=3).predictions[0].result
    finally:
        service.close()
    assert regions and polygons
    assert {(r["original_width"], r["original_height"]) for r in regions + polygons} == {(64, 48)}
    for region in regions:  # painted on the whole image
        assert rle_to_mask(region["value"]["rle"], 48, 64).any()


def test_images_are_fetched_a_few_ahead_of_the_model_not_all_at_once(settings, label_studio):
    from backend.images import ImageFetcher
    from backend.inference import PREFETCH

    class CountingFetcher(ImageFetcher):
        started = 0
        images: list[weakref.ref] = []

        def fetch(self, url, task_id=None):
            CountingFetcher.started += 1
            image = super().fetch(url, task_id)
            CountingFetcher.images.append(weakref.ref(image))
            return image

    service = ModelService(settings, fetcher=CountingFetcher(settings))
    images = [label_studio.upload(f"ahead-{i}.png", png(32, 24, seed=i)) for i in range(12)]
    tasks = [{"id": i, "data": {"image": image}} for i, image in enumerate(images)]
    started_when_reported, held_when_reported = {}, {}
    try:
        outcome = service.predict(
            tasks,
            ProjectSpec.parse(CONFIG),
            project=3,
            on_task=lambda index, _: (
                started_when_reported.setdefault(index, CountingFetcher.started),
                held_when_reported.setdefault(index, sum(ref() is not None for ref in CountingFetcher.images)),
            ),
        )
    finally:
        service.close()
    assert all(p.error is None for p in outcome.predictions) and CountingFetcher.started == 12
    ahead = PREFETCH + settings.batch_size
    assert all(started <= index + 1 + ahead for index, started in started_when_reported.items())
    assert started_when_reported[0] < 12  # the last images were not fetched before the first was predicted
    # Images the model is done with are let go: only the ones fetched ahead and the current batch stay in memory.
    assert max(held_when_reported.values()) <= ahead + settings.batch_size


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, docker run --cpus 2
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: a second thread would wait half the time
        ({"cpu.max": "20000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_containers_cpu_quota_is_read_in_whole_cpus(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cpus


def test_the_model_computes_with_the_configured_threads_else_torchs_capped_by_the_quota(
    settings, monkeypatch, restore_threads
):
    assert use_cpu_threads(settings.model_copy(update={"threads": 3})) == 3
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(inference, "_torch_default_threads", lambda: 8)
    monkeypatch.setattr(inference, "cpu_quota", lambda: 2)
    assert use_cpu_threads(settings) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(inference, "cpu_quota", lambda: None)
    assert use_cpu_threads(settings) == 8 and torch.get_num_threads() == 8
    assert use_cpu_threads(settings.model_copy(update={"threads": 1})) == 1  # the setting goes over the quota too


# --- captions, choices and bitmasks from one image pass (issue #18)

TOKEN_CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <PolygonLabels name="label" toName="image"><Label value="Car"/><Label value="Sky"/></PolygonLabels>
  <BitmaskLabels name="mask" toName="image"><Label value="Car"/><Label value="Sky"/></BitmaskLabels>
  <TextArea name="caption" toName="image" caption="true"/>
  <Choices name="scene" toName="image"><Choice value="Street" predicted_values="a street,a road"/>
    <Choice value="Beach"/></Choices>
  <Choices name="tags" toName="image" choice="multiple" value="$tags"/>
</View>"""


@pytest.fixture(scope="module")
def captioning_model():
    from tests.helpers import tiny_model

    return tiny_model(seed=3, captioning=True)


def test_one_image_pass_fills_masks_bitmasks_the_caption_and_choices(
    settings, label_studio, captioning_model, caplog, monkeypatch
):
    settings = settings.model_copy(update={"both_controls_output": "both", "choices_top_k": 2})
    service = ModelService(settings, model=captioning_model)
    tags = [{"value": "Dog"}, {"value": "Car", "predicted_values": "car,automobile"}, "Tree"]
    tasks = [
        {"id": 1, "data": {"image": label_studio.upload("tok-1.png", png(64, 48, seed=1)), "tags": tags}},
        {"id": 2, "data": {"image": label_studio.upload("tok-2.png", png(64, 48, seed=2))}},  # no tags: logged
    ]
    calls = []
    predict = Predictor.predict

    def recorded(self, images, **kwargs):
        calls.append((len(images), kwargs["caption"], tuple(kwargs["rank_texts"]), tuple(kwargs["labels"])))
        return predict(self, images, **kwargs)

    monkeypatch.setattr(Predictor, "predict", recorded)
    with caplog.at_level(logging.WARNING):
        predictions = service.predict(tasks, ProjectSpec.parse(TOKEN_CONFIG), project=None).predictions
    service.close()

    # One model call per image (batch size 1), asking for everything at once; the tasks' Choices differ, so the
    # ranked texts do too.
    assert calls == [
        (1, True, ("a street", "a road", "Beach", "Dog", "car", "automobile", "Tree"), ("Car", "Sky")),
        (1, True, ("a street", "a road", "Beach"), ("Car", "Sky")),
    ]
    assert '<Choices name="tags"> has no choices in the task data field "tags"' in caplog.text

    monkeypatch.setattr(Predictor, "predict", predict)
    predictor = service.predictor(service.current_version(None))
    for task, prediction in zip(tasks, predictions, strict=True):
        by_type = {}
        for region in prediction.result:
            by_type.setdefault(region["type"], []).append(region)
        assert {"polygonlabels", "bitmasklabels", "textarea", "choices"} <= set(by_type), task["id"]
        for region in by_type["bitmasklabels"]:
            assert png_data_url_to_mask(region["value"]["imageDataURL"], 48, 64).any()

        image = label_studio.files[task["data"]["image"]][0]
        picture = Image.open(io.BytesIO(image))
        expected_caption = predictor.caption(picture)
        (caption,) = by_type["textarea"]
        assert caption["from_name"] == "caption"
        assert caption["value"] == {"text": [expected_caption.text]}
        assert caption["score"] == pytest.approx(expected_caption.score, abs=1e-6)

        scene = next(r for r in by_type["choices"] if r["from_name"] == "scene")
        ranking = predictor.rank(picture, ["a street", "a road", "Beach"])
        street, beach = choice_probabilities(ProjectSpec.parse(TOKEN_CONFIG).images[0].choices[0].choices({}), ranking)
        assert scene["value"] == {"choices": ["Street" if street >= beach else "Beach"]}
        assert scene["score"] == pytest.approx(max(street, beach), abs=1e-5)
        # Masks are asked, so the task's score is the masks' alone (the caption and choices are not in it).
        mask_only = service_score_without_texts(prediction.result)
        assert prediction.score == pytest.approx(mask_only, abs=1e-6)
    assert [r["from_name"] for r in predictions[1].result if r["type"] == "choices"] == ["scene"]
    tags_result = next(r for r in predictions[0].result if r["from_name"] == "tags")
    assert 1 <= len(tags_result["value"]["choices"]) <= 2


def service_score_without_texts(result: list[dict]) -> float:
    """The panoptic score of a result: sum(area * score) / image area, from the bitmask regions' masks."""
    bitmasks = [r for r in result if r["type"] == "bitmasklabels"]
    area = sum(png_data_url_to_mask(r["value"]["imageDataURL"], 48, 64).sum() * r["score"] for r in bitmasks)
    return area / (48 * 64)


def test_a_model_that_cannot_caption_still_predicts_the_rest_and_says_why(service, tasks, caplog):
    assert not service.base_model.can_caption
    with caplog.at_level(logging.WARNING):
        (prediction,) = service.predict(tasks[:1], ProjectSpec.parse(TOKEN_CONFIG), project=None).predictions

    assert prediction.error is None and prediction.model_version == "tiny"
    types = {region["type"] for region in prediction.result}
    assert "textarea" not in types and {"polygonlabels", "choices"} <= types
    why = service.base_model.caption_support  # "official captioning needs at least 77 queries ..."
    assert f"caption TextAreas (caption) get no caption: model tiny cannot caption ({why})" in caplog.text


def test_an_interactive_prompt_gets_its_mask_only_not_the_caption_or_choices(settings, label_studio, captioning_model):
    config = TOKEN_CONFIG.replace('caption="true"/>', 'caption="true"/><TextArea name="prompt" toName="image"/>')
    service = ModelService(settings, model=captioning_model)
    task = {"id": 9, "data": {"image": label_studio.upload("tok-9.png", png(64, 48, seed=9))}}
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["car"]}}]}
    (prediction,) = service.predict([task], ProjectSpec.parse(config), project=None, context=context).predictions
    service.close()

    assert prediction.result and {region["type"] for region in prediction.result} == {"polygonlabels"}
