"""Workers as separate processes against a real Redis: events, pre-annotation, crashes and restarts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, Retry, Worker
from rq.scheduler import RQScheduler

from backend import preannotate
from backend.corrections import CorrectionStore
from backend.progress import RunProgress
from backend.queues import PREDICT, EmbeddedRedis, enqueue
from backend.server import create_app
from backend.status import collect
from backend.versions import VersionRegistry
from tests.conftest import reference_payload
from tests.helpers import subprocess_env
from tests.standin_ls import png

PANOPTIC = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image">
    <Label value="Car"/><Label value="Sky"/><Label value="Grass"/>
  </PolygonLabels>
</View>"""


def start_worker(settings, queues: str, burst: bool = False, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "backend.cli", "worker", "--queues", queues]
    return subprocess.Popen(command + (["--burst"] if burst else []), env=subprocess_env(settings), **popen)


def run_burst(settings, queues: str, timeout: float = 120) -> None:
    worker = start_worker(settings, queues, burst=True)
    assert worker.wait(timeout=timeout) == 0


def wait_until(condition, timeout: float = 120, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@pytest.fixture
def project(label_studio):
    """Project 7 with 6 tasks in the stand-in Label Studio."""
    label_studio.add_project(7, PANOPTIC)
    label_studio.tasks = {k: v for k, v in label_studio.tasks.items() if v["project"] != 7}
    label_studio.annotations = {k: v for k, v in label_studio.annotations.items() if v["project"] != 7}
    label_studio.ml_backends = {k: v for k, v in label_studio.ml_backends.items() if v["project"] != 7}
    label_studio.predictions.clear()
    ids = [label_studio.add_task(7, {"image": label_studio.upload(f"p7-{i}.png", png(64, 48, seed=i), project=7)})
           for i in range(6)]  # fmt: skip
    return ids


def test_a_worker_applies_stored_webhooks(settings, redis, label_studio):
    label_studio.add_project(3, reference_payload("webhook_annotation_created.json")["project"]["label_config"])
    label_studio.saved(reference_payload("webhook_annotation_created.json"))
    with TestClient(create_app(settings)) as client:
        for name in ("webhook_annotation_created.json", "webhook_start_training.json"):
            assert client.post("/webhook", json=reference_payload(name)).status_code == 200
    assert Queue("events", connection=redis).count == 2
    run_burst(settings, "events")
    assert CorrectionStore(redis).count(3) == 1
    assert Queue("events", connection=redis).count == 0
    assert Queue("train", connection=redis).count == 1  # Start Training queued a fine-tune


def test_events_survive_a_redis_crash_between_acknowledge_and_processing(settings, tmp_path, label_studio):
    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.ensure_running()
    settings = settings.model_copy(update={"redis_url": url})
    label_studio.add_project(3, reference_payload("webhook_annotation_created.json")["project"]["label_config"])
    with TestClient(create_app(settings)) as client:
        for i in range(5):
            event = reference_payload("webhook_annotation_created.json")
            event["annotation"]["id"] = 100 + i
            assert client.post("/webhook", json=label_studio.saved(event)).status_code == 200
    Redis.from_url(url).shutdown(nosave=True)  # no snapshot: only the append-only file remains
    wait_until(lambda: not server.running(), timeout=10)
    server.ensure_running()
    run_burst(settings, "events")
    assert CorrectionStore(Redis.from_url(url)).count(3) == 5
    server.stop()


def test_the_server_starts_its_embedded_redis_again_if_it_dies(settings):
    model_dir = Path(tempfile.mkdtemp(prefix="xdls-"))  # short: the socket's path has a length limit
    settings = settings.model_copy(update={"redis_url": None, "model_dir": model_dir})
    server = EmbeddedRedis(model_dir / "redis")
    try:
        with TestClient(create_app(settings)) as client:
            assert server.running()
            assert client.post("/webhook", json=reference_payload("webhook_annotation_created.json")).status_code == 200
            os.kill(int((model_dir / "redis" / "redis.pid").read_text()), signal.SIGKILL)
            wait_until(lambda: not server.running(), timeout=10)
            response = client.post("/webhook", json=reference_payload("webhook_start_training.json"))
            assert response.status_code == 200 and server.running()
        events = Queue("events", connection=Redis.from_url(server.url)).jobs
        assert [job.args[0][0]["action"] for job in events] == ["ANNOTATION_CREATED", "START_TRAINING"]
    finally:
        server.stop()
        shutil.rmtree(model_dir, ignore_errors=True)


def test_preannotate_posts_each_prediction_once_and_resumes(settings, redis, label_studio, project):
    first, second, *_ = project
    label_studio.predictions.append({"id": 999, "task": second, "model_version": "tiny", "result": []})
    label_studio.tasks[project[3]]["data"]["image"] = "/data/upload/7/missing.png"
    run = preannotate.start(settings, redis, 7, chunk_size=2)
    assert run.total == 6 and len(run.job_ids) == 3  # 5 to predict in chunks of 2
    run_burst(settings, "predict")
    snapshot = preannotate.watch(redis, run, poll_s=0.01)
    assert (snapshot.done, snapshot.failed, snapshot.skipped) == (4, 1, 1)
    for task in project:
        versions = [p["model_version"] for p in label_studio.predictions_for(task)]
        assert versions == ([] if task == project[3] else ["tiny"])  # the broken one gets no placeholder
    posted = [p for p in label_studio.predictions_for(first)][0]
    assert posted["result"] and posted["project"] == 7 and 0 <= posted["score"] <= 1

    again = preannotate.start(settings, redis, 7, chunk_size=2)
    run_burst(settings, "predict")
    assert preannotate.watch(redis, again, poll_s=0.01).done == 0
    assert all(len(label_studio.predictions_for(t)) <= 1 for t in project)


def test_a_chunk_run_again_counts_each_task_once_and_label_studio_decides_what_is_predicted(
    settings, redis, label_studio, project
):
    label_studio.tasks[project[3]]["data"]["image"] = "/data/upload/7/missing.png"
    tasks = [{"id": t, "data": label_studio.tasks[t]["data"]} for t in project]
    RunProgress(redis, "retry-test").start(len(tasks), 7, "tiny")
    # The post of one task fails all 3 of the SDK's tries: the job fails after posting the others; RQ runs it again.
    label_studio.failing_prediction_posts = {project[1]: 3}
    job = enqueue(redis, PREDICT, "backend.jobs.predict_chunk", 7, tasks, PANOPTIC, "retry-test", retry=Retry(max=1))
    run_burst(settings, "predict")
    job.refresh()
    assert job.get_status() == "finished" and job.retries_left == 0  # it did fail once
    snapshot = RunProgress(redis, "retry-test").snapshot()
    assert (snapshot.done, snapshot.failed, snapshot.skipped) == (5, 1, 0)  # not 5 + 4 skipped + 2 failed
    assert all(len(label_studio.predictions_for(t)) == (t != project[3]) for t in project)

    label_studio.predictions.clear()  # deleted in Label Studio: the next run predicts them again
    again = preannotate.start(settings, redis, 7)
    run_burst(settings, "predict")
    snapshot = preannotate.watch(redis, again, poll_s=0.01)
    assert (snapshot.done, snapshot.failed, snapshot.skipped) == (5, 1, 0)
    assert all(len(label_studio.predictions_for(t)) == (t != project[3]) for t in project)


def test_missing_mode_leaves_out_tasks_with_a_prediction_of_any_version(settings, redis, label_studio, project):
    # (the --prompt path is in tests/test_cli.py)
    label_studio.predictions.append({"id": 998, "task": project[0], "model_version": "older", "result": []})
    label_studio.predictions.append({"id": 997, "task": project[1], "model_version": "tiny/pending", "result": []})
    run = preannotate.start(settings, redis, 7, which="missing")
    assert run.total == 6 and RunProgress(redis, run.run_id).snapshot().skipped == 1
    queued = [task["id"] for job in Queue(PREDICT, connection=redis).jobs for task in job.args[1]]
    assert queued == project[1:]  # a placeholder is not a prediction


def test_a_killed_worker_has_its_job_rerun_without_duplicate_predictions(settings, redis, label_studio, project):
    settings = settings.model_copy(update={"worker_heartbeat_s": 1, "worker_maintenance_s": 1})
    tasks = [{"id": t, "data": label_studio.tasks[t]["data"]} for t in project]
    job = enqueue(redis, PREDICT, "backend.jobs.predict_chunk", 7, tasks, PANOPTIC, "kill-test", retry=Retry(max=2))
    label_studio.prediction_post_seconds = 0.5  # slow enough that the kill lands mid-job
    worker = start_worker(settings, "predict")
    try:
        wait_until(lambda: len(label_studio.predictions) >= 2)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        posted_before = len(label_studio.predictions)
        assert posted_before < len(project), "the worker must die mid-job for this test to mean anything"
        worker = start_worker(settings, "predict")
        wait_until(lambda: all(label_studio.predictions_for(t) for t in project), timeout=180)
    finally:
        label_studio.prediction_post_seconds = 0.0
        worker.kill()
        worker.wait(timeout=10)
    for task in project:
        assert [p["model_version"] for p in label_studio.predictions_for(task)] == ["tiny"]
    assert job.get_status(refresh=True) in ("finished", "started")


def test_a_job_queued_after_a_worker_was_killed_idle_runs_at_once(settings, redis, label_studio, project):
    # Maintenance far away: only a worker that Redis knows is gone lets the next job through quickly.
    settings = settings.model_copy(update={"worker_maintenance_s": 600})
    # The worker that wins the scheduler lock forks RQ's scheduler: that is the one to kill.
    killed = start_worker(settings, "predict")
    survivor = None
    try:
        wait_until(lambda: redis.exists(RQScheduler.get_locking_key(PREDICT)), timeout=60)
        survivor = start_worker(settings, "predict")
        wait_until(lambda: len(Worker.all(connection=redis)) == 2)
        time.sleep(1)  # both blocked waiting for jobs
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        time.sleep(0.5)
        tasks = [{"id": t, "data": label_studio.tasks[t]["data"]} for t in project]
        for task in tasks:  # one job per task: any of them could go to the dead worker
            enqueue(redis, PREDICT, "backend.jobs.predict_chunk", 7, [task], PANOPTIC, "idle-kill-test")
        wait_until(lambda: all(label_studio.predictions_for(t) for t in project), timeout=30)
    finally:
        for worker in (killed, survivor):
            if worker is not None:
                worker.kill()
                worker.wait(timeout=10)


def test_corrections_sent_by_webhook_become_a_served_fine_tune(settings, redis, label_studio):
    settings = settings.model_copy(
        update={"finetune_every": 3, "finetune_min_steps": 2, "finetune_max_steps": 2, "finetune_min_gain": -1.0}
    )
    label_studio.upload("bf8c4da5-red.png", png(64, 48), project=3)  # the image the reference payload names
    with TestClient(create_app(settings)) as client:
        # Tasks 4 and 35 are held out for evaluation (finetune.split_examples), enough to judge the fine-tune.
        for annotation_id, task_id in ((1, 4), (2, 35), (3, 7)):
            event = reference_payload("webhook_annotation_created.json")
            event["annotation"] |= {"id": annotation_id, "task": task_id}
            event["task"]["id"] = task_id
            label_studio.add_project(3, event["project"]["label_config"])
            assert client.post("/webhook", json=label_studio.saved(event)).status_code == 200
        run_burst(settings, "events")
        assert Queue("train", connection=redis).count == 1  # the third correction triggered a fine-tune
        run_burst(settings, "train")

        served = VersionRegistry(settings.model_dir, settings.checkpoint).current(3)
        assert served.name == "tiny.p3.v1" and served.status == "served" and served.trained_on == 3
        label_config = reference_payload("webhook_annotation_created.json")["project"]["label_config"]
        task = {"id": 1, "data": {"image": "/data/upload/3/bf8c4da5-red.png"}}
        payload = {"tasks": [task], "label_config": label_config, "project": "3.1795397442"}
        answer = client.post("/predict", json=payload)
        assert answer.json()["results"][0]["model_version"] == "tiny.p3.v1"
    assert CorrectionStore(redis).meta(3)["finetune_status"] == "served"


def test_a_predict_worker_connects_to_label_studio_at_start_and_says_when_it_cannot(settings, redis):
    def burst(worker_settings) -> str:
        worker = start_worker(worker_settings, "predict", burst=True, stderr=subprocess.PIPE, text=True)
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
        return stderr

    assert "Label Studio is configured" not in burst(settings)
    unconfigured = burst(settings.model_copy(update={"label_studio_url": None}))
    assert "predict jobs will fail until Label Studio is configured: LABEL_STUDIO_URL" in unconfigured


def test_each_queue_gives_its_jobs_its_own_timeout_retries_and_failure_retention(settings, redis, project):
    from backend.learning import request_finetune
    from backend.queues import EVENTS, POLICIES, TRAIN

    with TestClient(create_app(settings)) as client:
        assert client.post("/webhook", json=reference_payload("webhook_annotation_created.json")).status_code == 200
    request_finetune(redis, settings, 7, "command")
    preannotate.start(settings, redis, 7)
    for name in (EVENTS, PREDICT, TRAIN):
        (job,) = Queue(name, connection=redis).jobs
        policy = POLICIES[name]
        assert (job.timeout, job.retries_left, job.retry_intervals, job.failure_ttl) == (
            policy.job_timeout, policy.retry.max, policy.retry.intervals, policy.failure_ttl
        )  # fmt: skip
    assert len({POLICIES[name].job_timeout for name in (EVENTS, PREDICT, TRAIN)}) == 3


# ------------------------------------------------------------------ Label Studio follows the served version
def fine_tuned_version(settings, project: int) -> str:
    """A version of `project` whose weights differ from the base's (one trainable tensor moved), as a fine-tune
    stores it; returns its name."""
    import torch

    from tests.helpers import tiny_model
    from xdecoder.training import trainable_parameters

    name, tensor = next(iter(trainable_parameters(tiny_model(seed=11)).items()))
    moved = {name: tensor.detach() + 0.5 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0))}
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    return registry.create(project, moved, registry.base.name, trained_on=2, metrics={}).name


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "backend.cli", *args]
    return subprocess.run(command, env=subprocess_env(settings), capture_output=True, text=True, timeout=120)


def test_setup_has_label_studio_show_the_served_version_once(settings, redis, label_studio, project):
    backend = label_studio.add_ml_backend(7, title="xdecoder", model_version="tiny")
    other = label_studio.add_ml_backend(7, title="someone else's", model_version="their-model")
    label_studio.projects[7]["model_version"] = "xdecoder"
    setup = {"project": "7.1795397442", "schema": PANOPTIC}
    events = Queue("events", connection=redis)
    with TestClient(create_app(settings)) as client:
        assert client.post("/setup", json=setup).json() == {"model_version": "tiny"}
        assert client.post("/setup", json=setup).status_code == 200  # Label Studio calls it often: one sync
        (job_id,) = events.scheduled_job_registry.get_job_ids()
        assert events.fetch_job(job_id).args == (7, False)  # no re-prediction on connection
        events.scheduled_job_registry.remove(job_id)
        events.enqueue_job(events.fetch_job(job_id))  # due now (RQ's scheduler waits SYNC_AFTER_SETUP_S)
        run_burst(settings, "events")
        assert label_studio.ml_backends[backend]["title"] == "tiny"
        assert label_studio.ml_backends[other]["title"] == "someone else's"
        assert label_studio.projects[7]["model_version"] == "tiny"
        redis.delete("xdls:project:7:sync_claim")
        assert client.post("/setup", json=setup).status_code == 200
        assert events.scheduled_job_registry.get_job_ids() == []  # Label Studio shows it already
    assert collect(settings, redis, "test")["projects"]["7"]["label_studio"] == {"shows": "tiny", "error": None}


def test_a_promotion_and_a_rollback_repredict_the_unannotated_tasks_with_the_served_version(
    settings, redis, label_studio, project
):
    label_studio.add_ml_backend(7, title="xdecoder", model_version="tiny")
    for annotation_id, task in ((71, project[0]), (72, project[1])):
        label_studio.annotate(7, {"id": annotation_id, "result": []}, label_studio.tasks[task])
    preannotate.start(settings, redis, 7)
    run_burst(settings, "predict")  # every task has a prediction of the base
    base_scores = {t: label_studio.predictions_for(t)[0]["score"] for t in project}
    version = fine_tuned_version(settings, 7)

    served = cli(settings, "versions", "--serve", version)
    assert served.returncode == 0, served.stderr
    assert f"project 7 now serves {version}" in served.stdout
    (sync,) = Queue("events", connection=redis).jobs
    assert sync.func_name == "backend.jobs.sync_label_studio" and sync.args == (7, True)
    run_burst(settings, "events")
    assert label_studio.projects[7]["model_version"] == version  # the Prediction score column's version
    run_burst(settings, "predict")
    for task in project:
        versions = [p["model_version"] for p in label_studio.predictions_for(task)]
        assert versions == (["tiny"] if task in project[:2] else ["tiny", version]), (task, versions)
    new_scores = {p["task"]: p["score"] for p in label_studio.predictions if p["model_version"] == version}
    assert new_scores.keys() == set(project[2:]) and new_scores != {t: base_scores[t] for t in project[2:]}
    repredict = collect(settings, redis, "test")["projects"]["7"]["label_studio"]["repredict"]
    assert repredict | {"run": None} == {"run": None, "version": version, "total": 6, "done": 4, "failed": 0,
                                         "skipped": 2}  # fmt: skip

    rolled_back = cli(settings, "versions", "--serve", "tiny", "--project", "7")
    assert rolled_back.returncode == 0, rolled_back.stderr
    run_burst(settings, "events")
    run_burst(settings, "predict")
    assert label_studio.projects[7]["model_version"] == "tiny"
    repredict = collect(settings, redis, "test")["projects"]["7"]["label_studio"]["repredict"]
    assert (repredict["version"], repredict["done"], repredict["skipped"]) == ("tiny", 0, 6)  # the base's are there


def test_a_promotion_while_label_studio_is_unreachable_stands_and_label_studio_is_told_later(
    settings, redis, label_studio, project
):
    from tests.test_label_studio_api import closed_port

    label_studio.add_ml_backend(7, title="xdecoder", model_version="tiny")
    version = fine_tuned_version(settings, 7)
    away = settings.model_copy(update={"label_studio_url": f"http://127.0.0.1:{closed_port()}"})
    served = cli(away, "versions", "--serve", version)
    assert served.returncode == 0, served.stderr  # the promotion itself does not depend on Label Studio
    assert VersionRegistry(settings.model_dir, settings.checkpoint).current(7).name == version
    run_burst(away, "events")
    sync = Queue("events", connection=redis)
    (retry,) = sync.scheduled_job_registry.get_job_ids()  # failed, waiting for its retry: nothing is lost
    error = collect(settings, redis, "test")["projects"]["7"]["label_studio"]["error"]
    assert error.startswith(f"{version}: cannot reach Label Studio")
    sync.scheduled_job_registry.remove(retry)
    sync.enqueue_job(sync.fetch_job(retry))  # its retry is due, and Label Studio is back
    run_burst(settings, "events")
    assert label_studio.projects[7]["model_version"] == version
    run_burst(settings, "predict")
    assert all(version in {p["model_version"] for p in label_studio.predictions_for(t)} for t in project)
