"""The ML backend HTTP contract, through the app, with a tiny random model and a stand-in Label Studio."""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from rq import Queue

from backend import metrics
from backend.brush import png_data_url_to_mask, rle_to_mask
from backend.inference import ModelService
from backend.label_config import ProjectSpec
from backend.preannotate import CHUNK_SIZE
from backend.server import create_app
from backend.status import collect
from backend.webhooks import WebhookInbox
from tests.conftest import reference_payload
from tests.helpers import tiny_model
from tests.standin_ls import png

LABEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "label_config"


def config(name: str) -> str:
    return (LABEL_CONFIG_DIR / name).read_text()


POLYGONS = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image">
    <Label value="Car" predicted_values="car,automobile"/>
    <Label value="Vehicle" alias="veh" hint="truck, bus"/>
    <Label value="Sky"/>
    <Label value="Road" stuff="true"/>
  </PolygonLabels>
</View>"""


@pytest.fixture
def client(settings, label_studio):
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def image_url(label_studio) -> str:
    return label_studio.upload("scene.png", png(96, 64))


def predict(client, tasks, label_config=POLYGONS, project="3.1795397442", context=None, **kwargs):
    payload = {"tasks": tasks, "project": project, "label_config": label_config, "params": {"context": context}}
    return client.post("/predict", json=payload, **kwargs)


def assert_polygon_region(region, labels, width=96, height=64):
    assert region["type"] == "polygonlabels"
    assert region["to_name"] == "image" and region["from_name"] == "label"
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (width, height, 0)
    assert 0.0 <= region["score"] <= 1.0 and isinstance(region["id"], str) and region["id"]
    value = region["value"]
    assert value["closed"] is True
    assert len(value["points"]) >= 3
    assert all(0.0 <= x <= 100.0 and 0.0 <= y <= 100.0 for x, y in value["points"])
    assert value["points"][0] != value["points"][-1]
    assert len(value["polygonlabels"]) == 1 and value["polygonlabels"][0] in labels


# ----------------------------------------------------------------------------------------- health
def test_health_and_root(client):
    for route in ("/health", "/"):
        body = client.get(route).json()
        assert body["status"] == "UP" and body["model"] == "tiny" and body["device"] == "cpu"


def test_setup_answers_the_model_version_for_the_reference_payload(client):
    response = client.post("/setup", json=reference_payload("setup.json"))
    assert response.status_code == 200
    assert response.json() == {"model_version": "tiny"}


def test_setup_refuses_configs_without_images_clearly(client):
    payload = reference_payload("setup.json") | {"schema": '<View><Text name="t" value="$text"/></View>'}
    response = client.post("/setup", json=payload)
    assert response.status_code == 400
    assert "<Image>" in response.json()["error"]


CAPTION_AND_TAGS = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Car"/><Label value="Sky"/></BitmaskLabels>
  <TextArea name="caption" toName="image" caption="true"/>
  <Choices name="tags" toName="image" choice="multiple"><Choice value="Car"/><Choice value="Sky"/></Choices>
</View>"""


def test_setup_refuses_an_ambiguous_text_area_saying_what_to_change(client):
    schema = CAPTION_AND_TAGS.replace('caption="true"/>', 'caption="true" value="$question"/>')
    response = client.post("/setup", json=reference_payload("setup.json") | {"schema": schema})
    assert response.status_code == 400
    assert 'Remove value="$question" to get the caption there, or remove caption="true"' in response.json()["error"]


def test_setup_accepts_captions_on_a_model_that_cannot_caption_and_logs_why(client, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.server"):
        response = client.post("/setup", json=reference_payload("setup.json") | {"schema": CAPTION_AND_TAGS})
    assert response.status_code == 200 and response.json() == {"model_version": "tiny"}
    assert "caption TextAreas (caption) get no caption: model tiny cannot caption (official captioning" in caplog.text


def test_predict_fills_bitmask_labels_the_caption_and_choices(settings, label_studio, image_url):
    service = ModelService(settings, model=tiny_model(seed=3, captioning=True))
    with TestClient(create_app(settings, service=service)) as captioning_client:
        response = predict(captioning_client, [{"id": 1, "data": {"image": image_url}}], CAPTION_AND_TAGS)
    service.close()

    assert response.status_code == 200
    (prediction,) = response.json()["results"]
    by_type = {}
    for region in prediction["result"]:
        by_type.setdefault(region["type"], []).append(region)
    assert set(by_type) == {"bitmasklabels", "textarea", "choices"}
    for region in by_type["bitmasklabels"]:
        assert set(region["value"]) == {"imageDataURL", "bitmasklabels"}
        assert region["value"]["bitmasklabels"][0] in ("Car", "Sky")
        assert png_data_url_to_mask(region["value"]["imageDataURL"], 64, 96).any()
    (caption,) = by_type["textarea"]
    assert caption["from_name"] == "caption" and caption["value"]["text"][0].strip()
    assert 0 < caption["score"] <= 1
    (tags,) = by_type["choices"]
    assert tags["from_name"] == "tags" and set(tags["value"]["choices"]) <= {"Car", "Sky"}
    assert 0 < tags["score"] <= 1


# ---------------------------------------------------------------------------------------- predict
def test_reference_batch_payload_one_result_per_task_in_order(client, label_studio):
    payload = reference_payload("predict_batch.json")
    label_studio.files[payload["tasks"][0]["data"]["image"]] = (png(64, 48), "image/png")
    response = client.post("/predict", json=payload)
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["model_version"] == "tiny" and first["result"]
    for region in first["result"]:
        assert_polygon_region(region, {"Car", "Sky"}, 64, 48)
    # The second task's image is on another local port: refused (SSRF guard), isolated from the first.
    assert second == {"result": [], "score": 0.0, "model_version": "tiny/failed"}


def test_panoptic_polygons_cover_the_image_with_the_configs_labels(client, image_url):
    response = predict(client, [{"id": 1, "data": {"image": image_url}}])
    (result,) = response.json()["results"]
    labels = {"Car", "veh", "Sky", "Road"}  # the alias goes back to Label Studio
    assert result["result"] and 0.0 <= result["score"] <= 1.0
    for region in result["result"]:
        assert_polygon_region(region, labels)
    assert len({r["id"] for r in result["result"]}) == len(result["result"])


def test_shipped_configs_give_their_kind_of_regions(client, label_studio, image_url):
    for name, kind in [("panoptic_polygons.xml", "polygonlabels"), ("panoptic_brush.xml", "brushlabels")]:
        label_config = config(name)
        spec = ProjectSpec.parse(label_config)
        allowed = {label.value for c in spec.images[0].controls for label in c.labels}
        (result,) = predict(client, [{"id": 2, "data": {"image": image_url}}], label_config).json()["results"]
        assert result["result"], name
        for region in result["result"]:
            assert region["type"] == kind and region["value"][kind][0] in allowed
            if kind == "brushlabels":
                assert region["value"]["format"] == "rle"
                assert rle_to_mask(region["value"]["rle"], 64, 96).any()


def test_referring_from_task_data_keeps_the_prompt_on_the_region(client, image_url):
    label_config = config("referring_polygons.xml")
    tasks = [{"id": 4, "data": {"image": image_url, "prompt": "the red box"}}]
    (result,) = predict(client, tasks, label_config).json()["results"]
    regions = result["result"]
    assert regions, "a referring mask must come back as at least one polygon"
    for region in regions:
        assert region["value"]["polygonlabels"] == ["Referred object"]
        assert region["meta"] == {"text": ["prompt: the red box"]}


def test_interactive_context_prompt_returns_only_that_region(client, label_studio):
    payload = copy.deepcopy(reference_payload("predict_interactive.json"))
    label_studio.files[payload["tasks"][0]["data"]["image"]] = (png(64, 48), "image/png")
    response = client.post("/predict", json=payload)
    (result,) = response.json()["results"]
    assert result["result"]
    assert {r["value"]["polygonlabels"][0] for r in result["result"]} == {"Car"}  # "red car" names Car
    assert all(r["meta"]["text"] == ["prompt: red car"] for r in result["result"])


def test_an_interactive_prompt_that_names_no_label_gets_no_pre_fill(client, label_studio, caplog):
    payload = copy.deepcopy(reference_payload("predict_interactive.json"))
    label_studio.files[payload["tasks"][0]["data"]["image"]] = (png(64, 48), "image/png")
    payload["params"]["context"]["result"][0]["value"]["text"] = ["the shiny thing on the left"]
    (result,) = client.post("/predict", json=payload).json()["results"]
    assert result["result"] == [] and "names none of the labels" in caplog.text


def test_interactive_answers_get_region_ids_of_their_own(client, label_studio):
    # The editor merges a suggested region into one with the same id: each answer's ids must be new.
    payload = copy.deepcopy(reference_payload("predict_interactive.json"))
    label_studio.files[payload["tasks"][0]["data"]["image"]] = (png(64, 48), "image/png")

    def region_ids(context) -> list[str]:
        response = predict(client, payload["tasks"], payload["label_config"], context=context)
        return [region["id"] for region in response.json()["results"][0]["result"]]

    pre_filled, first, again = (
        region_ids(None),
        region_ids(payload["params"]["context"]),
        region_ids(payload["params"]["context"]),
    )
    assert pre_filled and first and again
    assert not set(pre_filled) & set(first) and not set(first) & set(again)
    assert region_ids(None) == pre_filled  # pre-annotation ids stay the same from run to run


def test_a_control_over_two_images_gives_ids_unique_in_the_task(client, image_url):
    two_images = """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <PolygonLabels name="label" toName="left,right">
    <Label value="Car"/>
    <Label value="Sky"/>
  </PolygonLabels>
</View>"""
    tasks = [{"id": 5, "data": {"left": image_url, "right": image_url}}]
    (result,) = predict(client, tasks, two_images).json()["results"]
    assert {r["to_name"] for r in result["result"]} == {"left", "right"}
    assert len({r["id"] for r in result["result"]}) == len(result["result"])


def test_a_16_bit_image_is_scaled_not_clipped(client, label_studio):
    levels = np.linspace(0, 255, 96 * 64).reshape(64, 96).astype(np.uint8)
    sixteen, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(levels.astype(np.uint16) * 257).save(sixteen, "PNG")  # 0..65535, opens as I;16
    Image.fromarray(levels).save(eight, "PNG")
    tasks = [
        {"id": 1, "data": {"image": label_studio.upload("deep.png", sixteen.getvalue())}},
        {"id": 1, "data": {"image": label_studio.upload("plain.png", eight.getvalue())}},
    ]
    deep, plain = predict(client, tasks).json()["results"]
    assert deep["result"] and deep == plain


def test_broken_images_fail_alone(client, label_studio, image_url):
    label_studio.files["/data/upload/1/not-image.png"] = (b"this is not an image", "image/png")
    label_studio.files["/data/upload/1/cut.png"] = (png(96, 64)[:20], "image/png")  # a header cut short
    tasks = [
        {"id": 10, "data": {"image": "/data/upload/1/missing.png"}},
        {"id": 11, "data": {"image": image_url}},
        {"id": 12, "data": {"image": "/data/upload/1/not-image.png"}},
        {"id": 13, "data": {"image": "http://169.254.169.254/latest/meta-data"}},
        {"id": 14, "data": {"image": "file:///etc/passwd"}},
        {"id": 15, "data": {"other": "no image field"}},
        {"id": 16, "data": {"image": "/data/upload/1/cut.png"}},
    ]
    results = predict(client, tasks).json()["results"]
    assert [r["model_version"] for r in results] == ["tiny/failed", "tiny"] + ["tiny/failed"] * 5
    assert results[1]["result"] and not any(r["result"] for i, r in enumerate(results) if i != 1)


def test_basic_auth_everywhere_but_webhook_and_health(settings, image_url):
    settings = settings.model_copy(update={"basic_auth_user": "ls", "basic_auth_pass": SecretStr("s3cret")})
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 401
        assert client.post("/setup", json=reference_payload("setup.json")).status_code == 401
        assert predict(client, []).status_code == 401
        assert client.get("/versions").status_code == 401
        assert predict(client, [], auth=("ls", "wrong")).status_code == 401
        assert predict(client, [{"id": 1, "data": {"image": image_url}}], auth=("ls", "s3cret")).status_code == 200
        assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"tasks": "nope"}',
        b'{"tasks": [{"id": 1}]}',
        b'{"tasks": [], "project": "abc"}',
    ],
)
def test_malformed_predict_payloads_are_4xx(client, body):
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500


@pytest.mark.parametrize("route", ["/setup", "/predict", "/train"])
def test_a_project_that_is_not_a_project_reference_is_4xx(client, redis, route):
    response = client.post(route, json={"project": "abc", "tasks": [], "schema": "<View/>"})
    assert response.status_code == 422 and "project" in response.text
    assert Queue("events", connection=redis).count == 0


@pytest.mark.parametrize(
    ("body", "action", "reason"),
    [
        (b'{"project": {"id": 3}}', "(no action)", "action: Field required"),
        (b'{"action": "ANNOTATION_CREATED", "project": "abc"}', "ANNOTATION_CREATED", "project"),
        (b"not json", "(no action)", "body: Invalid JSON"),
    ],
)
def test_a_malformed_webhook_is_refused_and_listed_in_status_with_the_reason(
    client, settings, redis, body, action, reason
):
    response = client.post("/webhook", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and Queue("events", connection=redis).count == 0
    (rejected,) = collect(settings, redis, "test")["events_rejected"]
    assert rejected["action"] == action and rejected["reason"].startswith("refused with 422: ")
    assert reason in rejected["reason"]


def test_a_malformed_webhook_is_answered_before_it_is_recorded(redis, monkeypatch):
    # Recording the refusal may wait out redis-py's retries (Redis down); Label Studio waits 1 s for the answer.
    from backend import webhooks
    from backend.webhooks import WebhookRoute

    sent: list[dict] = []
    answered_when_recorded = []
    monkeypatch.setattr(webhooks, "_record_refused", lambda *args: answered_when_recorded.append(list(sent)))

    async def post() -> None:
        messages = [{"type": "http.request", "body": b"not json", "more_body": False}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        app = FastAPI()
        app.state.redis = redis  # all the refusal needs
        await WebhookRoute(app)({"type": "http", "path": "/webhook", "method": "POST", "headers": []}, receive, send)

    asyncio.run(post())
    (answered,) = answered_when_recorded
    assert answered[0]["status"] == 422 and answered[-1]["type"] == "http.response.body"


def test_unsupported_config_at_predict_is_a_clear_400(client, image_url):
    response = predict(client, [{"id": 1, "data": {"image": image_url}}], label_config="<View></View>")
    assert response.status_code == 400 and "Image" in response.json()["error"]


def test_versions_and_metrics(client, image_url):
    assert client.get("/versions").json() == {"versions": ["tiny"]}
    predict(client, [{"id": 1, "data": {"image": image_url}}])
    text = client.get("/metrics").text
    assert 'xdls_requests_total{route="/predict",status="200"}' in text
    assert 'xdls_queue_jobs{queue="events"}' in text


# --------------------------------------------------------------------------- webhook and hand-over
def test_webhook_is_stored_in_redis_before_the_answer(client, redis):
    payload = reference_payload("webhook_annotation_created.json")
    response = client.post("/webhook", json=payload)
    assert response.status_code == 200
    job = Queue("events", connection=redis).fetch_job(response.json()["job"])
    assert job is not None and job.func_name == "backend.jobs.apply_events"
    (event,) = job.args[0]
    assert event["action"] == "ANNOTATION_CREATED" and event["annotation"]["id"] == 1


@pytest.mark.parametrize("body", [b"[]", b'{"project": {"id": 3}}', b'{"action": ""}', b"nonsense"])
def test_malformed_webhooks_are_4xx_and_not_stored(client, redis, body):
    response = client.post("/webhook", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    assert Queue("events", connection=redis).count == 0


def test_the_older_train_call_is_stored_like_a_start_training_webhook(client, redis):
    response = client.post("/train", json={"project": "3.1795397442", "annotations": [], "label_config": POLYGONS})
    assert response.status_code == 200
    job = Queue("events", connection=redis).fetch_job(response.json()["job"])
    (event,) = job.args[0]
    assert job.func_name == "backend.jobs.apply_events"
    assert event["action"] == "START_TRAINING" and event["project"] == {"id": 3, "label_config": POLYGONS}


def test_a_burst_of_webhooks_is_stored_in_few_jobs_each_answer_after_its_own(redis):
    inbox = WebhookInbox(redis)
    stored_before_answer = []

    async def post(i: int) -> str:
        job_id = await inbox.store({"action": "ANNOTATION_CREATED", "annotation": {"id": i}})
        events = Queue("events", connection=redis).fetch_job(job_id).args[0]
        stored_before_answer.append(i in [event["annotation"]["id"] for event in events])
        return job_id

    async def burst() -> list[str]:
        return await asyncio.gather(*(post(i) for i in range(200)))

    job_ids = asyncio.run(burst())
    assert all(stored_before_answer) and len(stored_before_answer) == 200
    jobs = [Queue("events", connection=redis).fetch_job(job_id) for job_id in dict.fromkeys(job_ids)]
    assert len(jobs) <= 10
    assert all(job.func_name == "backend.jobs.apply_events" for job in jobs)
    in_order = [event["annotation"]["id"] for job in jobs for event in job.args[0]]
    assert in_order == list(range(200))  # every event once, in arrival order

    async def one_after_the_other() -> list[str]:
        return [await inbox.store({"action": "PROJECT_UPDATED"}), await inbox.store({"action": "PROJECT_UPDATED"})]

    first, second = asyncio.run(one_after_the_other())
    assert first != second


def test_a_lone_webhook_is_written_at_once_not_held_for_company(redis, monkeypatch):
    from backend import webhooks

    monkeypatch.setattr(webhooks, "BURST_GATHER_S", 5.0)
    inbox = WebhookInbox(redis)

    async def one_after_the_other() -> float:
        started = time.perf_counter()
        for _ in range(3):
            await inbox.store({"action": "PROJECT_UPDATED"})
        return time.perf_counter() - started

    assert asyncio.run(one_after_the_other()) < 2.0


def test_webhook_refuses_other_methods_and_huge_bodies_and_is_counted(client, redis, monkeypatch):
    from backend import webhooks

    stored_before = metrics.WEBHOOKS.labels(action="PROJECT_UPDATED")._value.get()
    refused_before = metrics.REQUESTS.labels(route="/webhook", status="413")._value.get()
    assert client.get("/webhook").status_code == 405
    monkeypatch.setattr(webhooks, "MAX_BODY_BYTES", 100)
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}, "pad": "x" * 200})
    assert response.status_code == 413 and Queue("events", connection=redis).count == 0
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}}).status_code == 200
    text = client.get("/metrics").text
    assert f'xdls_requests_total{{route="/webhook",status="413"}} {refused_before + 1}' in text
    assert f'xdls_webhooks_total{{action="PROJECT_UPDATED"}} {stored_before + 1}' in text


def test_a_webhook_that_cannot_be_stored_is_a_503(settings):
    from redis import Redis

    unreachable = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    with TestClient(create_app(settings, redis=unreachable)) as client:
        response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
    assert response.status_code == 503 and "could not be stored" in response.json()["detail"]


def test_tasks_past_the_time_budget_go_to_the_workers_in_chunks(settings, redis, image_url):
    settings = settings.model_copy(update={"predict_budget_s": 1e-6})
    with TestClient(create_app(settings)) as client:
        tasks = [{"id": i, "data": {"image": image_url}} for i in range(21, 21 + CHUNK_SIZE + 3)]
        results = predict(client, tasks).json()["results"]
    # Nothing can finish in a microsecond: every task gets a placeholder that Label Studio will not
    # mistake for a prediction of the current version, and all of them go to the predict queue.
    assert [r["model_version"] for r in results] == ["tiny/pending"] * len(tasks)
    jobs = Queue("predict", connection=redis).jobs
    assert [len(job.args[1]) for job in jobs] == [CHUNK_SIZE, 3]
    assert [t["id"] for job in jobs for t in job.args[1]] == [t["id"] for t in tasks]
    assert {job.args[0] for job in jobs} == {3} and len({job.args[3] for job in jobs}) == 1  # one run


def test_a_second_retrieve_does_not_predict_again_what_the_workers_are_predicting(settings, redis, image_url):
    handed = [{"id": i, "data": {"image": image_url}} for i in (31, 32, 33)]
    with TestClient(create_app(settings.model_copy(update={"predict_budget_s": 1e-6}))) as client:
        predict(client, handed)
    queue = Queue("predict", connection=redis)
    assert queue.count == 1
    fresh = {"id": 34, "data": {"image": image_url}}
    with TestClient(create_app(settings)) as client:
        # Retrieve predictions again while the workers have not got to them: those wait for the workers (which
        # post their own predictions), a task outside the run is predicted, and nothing is queued twice.
        again = predict(client, [*handed, fresh]).json()["results"]
        assert [r["model_version"] for r in again] == ["tiny/pending"] * 3 + ["tiny"]
        assert again[3]["result"] and queue.count == 1
        # A task opened in the editor (a batch of one) and an interactive prompt are answered at once.
        opened = predict(client, handed[:1]).json()["results"]
        assert opened[0]["model_version"] == "tiny" and opened[0]["result"]
        prompt = {"result": [{"type": "textarea", "value": {"text": ["the sky"]}}]}
        asked = predict(client, handed[:2], label_config=config("referring_polygons.xml"), context=prompt)
        assert [r["model_version"] for r in asked.json()["results"]] == ["tiny", "tiny"]
        # Once the run's job has ended (here: cancelled), the tasks are predicted again.
        queue.jobs[0].cancel()
        after = predict(client, handed).json()["results"]
    assert [r["model_version"] for r in after] == ["tiny"] * 3 and all(r["result"] for r in after)


def test_predict_still_answers_when_the_leftovers_cannot_be_queued(settings, image_url, caplog):
    from redis import Redis

    settings = settings.model_copy(update={"predict_budget_s": 1e-6})
    unreachable = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    with TestClient(create_app(settings, redis=unreachable)) as client:
        response = predict(client, [{"id": 21, "data": {"image": image_url}}, {"id": 22, "data": {"image": image_url}}])
    assert response.status_code == 200
    assert [r["model_version"] for r in response.json()["results"]] == ["tiny/pending"] * 2
    assert "cannot tell which tasks the workers are predicting" in caplog.text
    assert "cannot be handed to the workers" in caplog.text and "--tasks missing" in caplog.text


def test_exif_orientation_sets_the_original_size(client, label_studio):
    image = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 40 wide, 80 high
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    url = label_studio.upload("rotated.jpg", buffer.getvalue(), "image/jpeg")
    (result,) = predict(client, [{"id": 30, "data": {"image": url}}]).json()["results"]
    assert result["result"]
    assert {(r["original_width"], r["original_height"]) for r in result["result"]} == {(40, 80)}


def test_model_loads_once_per_app(settings, monkeypatch):
    import backend.inference as inference

    loads = []
    real = inference.load_model

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "load_model", counting)
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            client.post("/setup", json=reference_payload("setup.json"))
            client.get("/health")
    assert len(loads) == 1


def test_same_model_gives_same_results_as_the_predictor(client, image_url, label_studio):
    """The server adds no model math: its regions come from the Predictor's panoptic segments."""
    (result,) = predict(client, [{"id": 40, "data": {"image": image_url}}]).json()["results"]
    from xdecoder import Predictor

    predictor = Predictor(tiny_model(seed=11), short_side=64, object_mask_threshold=0.0, overlap_threshold=0.0)
    image = np.asarray(Image.open(io.BytesIO(label_studio.files[image_url][0])).convert("RGB"))
    expected = predictor.panoptic(image, ["Car", "veh", "Sky", "Road"], stuff={"Sky", "Road"},
                                  synonyms={"Car": ["car", "automobile"], "veh": ["truck", "bus"]})  # fmt: skip
    big = {s.label for s in expected.segments if s.area >= 64}
    assert big and big <= {r["value"]["polygonlabels"][0] for r in result["result"]} <= {
        s.label for s in expected.segments
    }
