"""End to end with a real Label Studio 1.23 as the client.

    XDECODER_E2E_LABEL_STUDIO=/path/to/label-studio python -m pytest tests/test_e2e_label_studio.py

`scripts/test.sh` (and so CI) installs Label Studio 1.23.2 into .venv-labelstudio and sets the variable; a bare
pytest run without it skips this test and says so.

Label Studio is started on loopback with the offline settings of shared/reference/label-studio.md; the
backend (`xdecoder-ls serve`) and a worker run as separate processes with the tiny random model. The
test drives Label Studio's own REST API the way its UI does: connect the backend, retrieve
predictions for the project, ask interactively with a text prompt, save an annotation (its webhook
reaches the backend and a worker stores it), press Start Training, then pre-annotate new tasks in bulk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import e2e
from tests.helpers import backend_settings, subprocess_env
from tests.standin_ls import png

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "panoptic_and_referring_polygons.xml").read_text()

pytestmark = e2e.marks


@pytest.fixture(scope="module")
def backend(label_studio_url, tmp_path_factory, tiny_checkpoint):
    from backend.queues import EmbeddedRedis

    folder = tmp_path_factory.mktemp("xdls")
    settings = backend_settings(
        tiny_checkpoint, folder, label_studio_url, XDECODER_SHORT_SIDE=64, XDECODER_POLYGON_MIN_AREA=4
    )
    env = subprocess_env(settings)
    try:
        with e2e.running_backend(env, folder / "serve.log") as url:
            yield url, env
    finally:
        EmbeddedRedis(folder / "redis").stop()  # the server started it as a daemon


def test_label_studio_gets_labelled_editable_polygons_and_sends_corrections(label_studio_url, backend):
    backend_url, env = backend
    ls = e2e.api(label_studio_url)
    project, (task_id,) = e2e.new_project(ls, "e2e", CONFIG, {"scene.png": png(96, 64)})
    ml_id = e2e.connect_and_retrieve(ls, project, backend_url, interactive=True)

    predictions = ls.get("/api/predictions/", params={"task": task_id}).json()
    assert [p["model_version"] for p in predictions] == ["tiny"]
    regions = predictions[0]["result"]
    assert regions and all(r["type"] == "polygonlabels" and len(r["value"]["points"]) >= 3 for r in regions)

    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["the red box"]}}]}  # fmt: skip
    interactive = ls.post(f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context})
    assert interactive.status_code == 200, interactive.text
    answer = interactive.json()["data"]["result"]
    assert answer and all(r["meta"]["text"] == ["prompt: the red box"] for r in answer)

    corrected = [dict(regions[0], id=uuid.uuid4().hex[:10])]
    saved = ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": corrected, "task": task_id})
    assert saved.status_code == 201, saved.text
    assert ls.post(f"/api/ml/{ml_id}/train").status_code in (200, 201)

    worker = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--queues", "events", "--burst"], env=env)
    assert worker.returncode == 0
    status = subprocess.run([sys.executable, "-m", "backend.cli", "status", "--json"], env=env, capture_output=True)
    info = json.loads(status.stdout)
    assert info["projects"][str(project)]["corrections"] == 1
    assert info["queues"]["train"]["queued"] == 1  # Start Training queued a fine-tune

    # Bulk pre-annotation of the tasks imported since: through the workers, written with Label Studio's API.
    for name in ("second.png", "third.png"):
        upload = ls.post(f"/api/projects/{project}/import", files={"file": (name, png(80, 60, seed=7), "image/png")})
        assert upload.status_code == 201, upload.text
    command = [sys.executable, "-m", "backend.cli", "preannotate", "--project", str(project)]
    queued = subprocess.run([*command, "--detach"], env=env, capture_output=True, text=True)
    assert queued.returncode == 0, queued.stderr
    assert ": 3 tasks, model version tiny, 1 job queued" in queued.stdout  # the first task's two: one chunk
    worker = subprocess.run([sys.executable, "-m", "backend.cli", "worker", "--queues", "predict", "--burst"], env=env)
    assert worker.returncode == 0
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "done 0, failed 0, skipped 3 of 3" in rerun.stdout  # every task has a prediction of this version now
    tasks = ls.get("/api/tasks/", params={"project": project}).json()["tasks"]
    assert len(tasks) == 3
    for each in tasks:  # the first task keeps its one prediction; the new ones got theirs
        versions = [p["model_version"] for p in ls.get("/api/predictions/", params={"task": each["id"]}).json()]
        assert versions == ["tiny"], (each["id"], versions)
