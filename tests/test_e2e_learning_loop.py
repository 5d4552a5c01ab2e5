"""The learning loop against a real Label Studio 1.23: the Prediction score column shows our scores, a promotion
re-predicts the unannotated tasks with the new version (the column follows), and only corrections Label Studio
confirms are kept.

    XDECODER_E2E_LABEL_STUDIO=/path/to/label-studio python -m pytest tests/test_e2e_learning_loop.py

The backend (`xdecoder-ls serve`) and a worker on the events and predict queues run as separate processes with the
tiny random model, as in production; Label Studio is driven through its REST API the way its UI drives it. The
Prediction score column is read from /api/tasks with the Data Manager's own parameters (what its table shows).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests import e2e
from tests.helpers import backend_settings, subprocess_env
from tests.standin_ls import png
from tests.test_worker import fine_tuned_version

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "panoptic_and_referring_polygons.xml").read_text()

pytestmark = e2e.marks


def eventually(what: str, read, timeout: float = 240, interval: float = 1.0):
    """Polls `read()` until it returns something truthy; fails naming `what` and the last value if it does not."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = read()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s (last: {value!r})")


@pytest.fixture(scope="module")
def loop(label_studio_url, tmp_path_factory, tiny_checkpoint):
    """Our server and one worker (events, predict) against the session's Label Studio; yields (backend URL, settings,
    environment)."""
    from backend.queues import EmbeddedRedis

    folder = tmp_path_factory.mktemp("xdls-loop")
    settings = backend_settings(
        tiny_checkpoint, folder, label_studio_url, XDECODER_SHORT_SIDE=64, XDECODER_POLYGON_MIN_AREA=4
    )
    env = subprocess_env(settings)
    log = (folder / "worker.log").open("wb")
    worker = None
    try:
        with e2e.running_backend(env, folder / "serve.log") as url:
            command = [sys.executable, "-m", "backend.cli", "worker", "--queues", "events,predict"]
            worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            yield url, settings, env
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        log.close()
        EmbeddedRedis(folder / "redis").stop()  # the server started it as a daemon


def prediction_scores(ls: httpx.Client, project: int) -> dict[int, float | None]:
    """The Prediction score column, per task, as the Data Manager's table gets it."""
    view = ls.post("/api/dm/views/", json={"project": project, "data": {"title": "scores"}})
    assert view.status_code == 201, view.text
    page = ls.get("/api/tasks/", params={"project": project, "view": view.json()["id"], "fields": "all"})
    assert page.status_code == 200, page.text
    return {task["id"]: task["predictions_score"] for task in page.json()["tasks"]}


def predictions_of(ls: httpx.Client, task: int, version: str) -> list[dict]:
    return [p for p in ls.get("/api/predictions/", params={"task": task}).json() if p["model_version"] == version]


def status(env) -> dict:
    shown = subprocess.run([sys.executable, "-m", "backend.cli", "status", "--json"], env=env, capture_output=True)
    return json.loads(shown.stdout)


def test_the_score_column_follows_the_served_version_and_only_confirmed_corrections_count(label_studio_url, loop):
    backend_url, settings, env = loop
    ls = e2e.api(label_studio_url)
    scenes = {f"scene-{seed}.png": png(96, 64, seed=seed) for seed in range(3)}
    project, tasks = e2e.new_project(ls, "loop", CONFIG, scenes)
    ml_id = e2e.connect_and_retrieve(ls, project, backend_url)
    base = {task: predictions_of(ls, task, "tiny") for task in tasks}
    assert all(len(found) == 1 for found in base.values()), base

    # Shortly after connecting, the backend has Label Studio sort by its version: the column shows our scores.
    eventually(
        "project model version 'tiny'", lambda: ls.get(f"/api/projects/{project}").json()["model_version"] == "tiny"
    )
    assert ls.get(f"/api/ml/{ml_id}").json()["title"] == "tiny"
    scores = prediction_scores(ls, project)
    assert scores == pytest.approx({task: base[task][0]["score"] for task in tasks})

    # A correction saved in Label Studio is kept; one posted to /webhook by hand, which Label Studio never had, is not.
    corrected = [dict(base[tasks[0]][0]["result"][0], id=uuid.uuid4().hex[:10])]
    saved = ls.post(f"/api/tasks/{tasks[0]}/annotations/", json={"result": corrected, "task": tasks[0]})
    assert saved.status_code == 201, saved.text
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": project, "label_config": CONFIG},
              "annotation": {"id": 987654, "task": tasks[1], "result": corrected, "updated_at": "2030-01-01T00:00:00Z"},
              "task": {"id": tasks[1], "data": {"image": "http://attacker.example/poison.png"}}}  # fmt: skip
    assert httpx.post(f"{backend_url}/webhook", json=forged).status_code == 200  # acknowledged, then checked
    learnt = eventually(
        "the saved correction stored and the forged one excluded",
        lambda: (info := status(env)["projects"].get(str(project))) and "987654" in info["excluded"] and info,
    )
    assert learnt["corrections"] == 1 and learnt["new_since_last_finetune"] == 1 and learnt["not_yet_checked"] == 0
    assert learnt["excluded"]["987654"].startswith("not confirmed by Label Studio")

    # A promotion (here by hand; a fine-tune that passes its gate goes through the same place) re-predicts the tasks
    # without annotations with the new version, and the column shows the new version's scores.
    version = fine_tuned_version(settings, project)
    served = subprocess.run([sys.executable, "-m", "backend.cli", "versions", "--serve", version], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert served.returncode == 0, served.stderr
    unannotated = tasks[1:]
    new = eventually(
        f"predictions of {version} for the unannotated tasks",
        lambda: (found := {t: predictions_of(ls, t, version) for t in unannotated}) and all(found.values()) and found,
    )
    assert all(len(found) == 1 for found in new.values())
    assert predictions_of(ls, tasks[0], version) == []  # the annotated task is left as it is
    eventually(
        f"project model version {version!r}",
        lambda: ls.get(f"/api/projects/{project}").json()["model_version"] == version,
    )
    scores = prediction_scores(ls, project)
    assert scores[tasks[0]] is None  # no prediction of the served version: sorted apart from the others
    assert {t: scores[t] for t in unannotated} == pytest.approx({t: new[t][0]["score"] for t in unannotated})
    repredict = status(env)["projects"][str(project)]["label_studio"]["repredict"]
    assert (repredict["version"], repredict["done"], repredict["failed"]) == (version, 2, 0)
