"""A stand-in Label Studio on 127.0.0.1: enough of its REST API for the backend's tests.

Serves uploaded files (legacy-token auth), projects, paginated tasks with their predictions and annotations,
single tasks and annotations, prediction listing/creation, ML backends (list, PATCH of their title) and a
project's model version (PATCH), and records every request. It answers like Label Studio 1.23 where the
backend depends on it (404 past the last page of tasks, predictions carrying model_version).
"""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def png(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = (90, 140, 230)  # a "sky" band over a "ground" band
    pixels[height // 2 :] = (70, 120, 40)
    pixels[height // 3 : 2 * height // 3, width // 4 : width // 2] = (200, 30, 30)  # a red box
    pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class StandInLabelStudio:
    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.predictions: list[dict] = []
        self.annotations: dict[int, dict] = {}  # id -> {id, project, task, result, updated_at, ...}
        self.ml_backends: dict[int, dict] = {}  # id -> {id, project, title, url, model_version, auth_method}
        self.requests: list[tuple[str, str]] = []
        self.failing_prediction_posts: dict[int, int] = {}  # task id -> answer its next N prediction posts with 500
        self.prediction_post_seconds = 0.0  # how long each prediction post takes (a slow Label Studio)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------------------- test set-up
    def upload(self, name: str, content: bytes, content_type: str = "image/png", project: int = 1) -> str:
        path = f"/data/upload/{project}/{name}"
        self.files[path] = (content, content_type)
        return path

    def add_project(self, project: int, label_config: str) -> None:
        self.projects[project] = {"id": project, "label_config": label_config}

    def add_task(self, project: int, data: dict) -> int:
        with self._lock:
            task_id = max(self.tasks, default=0) + 1
            self.tasks[task_id] = {"id": task_id, "project": project, "data": data}
        return task_id

    def put_task(self, task_id: int, project: int, data: dict) -> None:
        """A task with a given id (the ids of recorded webhooks)."""
        with self._lock:
            self.tasks[task_id] = {"id": task_id, "project": project, "data": data}

    def annotate(self, project: int, annotation: dict, task: dict) -> None:
        """What Label Studio holds after a user saved `annotation` on `task` (as a webhook carries them)."""
        self.put_task(int(task["id"]), project, dict(task.get("data") or {}))
        self.annotations[int(annotation["id"])] = {"project": project, "task": int(task["id"])} | {
            key: annotation[key] for key in ("id", "result", "was_cancelled", "completed_by", "updated_at")
            if key in annotation
        }  # fmt: skip

    def saved(self, event: dict) -> dict:
        """`event` (an annotation webhook), after Label Studio stored the annotations it names, as it does before it
        sends the webhook; the backend reads them back before it trusts them."""
        project = event["project"]["id"]
        annotations, tasks = event["annotation"], event["task"]
        if isinstance(annotations, dict):
            annotations, tasks = [annotations], [tasks]
        tasks_by_id = {task["id"]: task for task in tasks}
        for annotation in annotations:
            self.annotate(project, annotation, tasks_by_id[annotation["task"]])
        return event

    def add_ml_backend(self, project: int, title: str, model_version: str, url: str = "http://backend") -> int:
        backend_id = max(self.ml_backends, default=0) + 1
        self.ml_backends[backend_id] = {"id": backend_id, "project": project, "title": title, "url": url,
                                        "model_version": model_version, "auth_method": "NONE"}  # fmt: skip
        self.projects[project]["model_version"] = title  # as Label Studio does when a backend is added
        return backend_id

    def predictions_for(self, task: int) -> list[dict]:
        return [p for p in self.predictions if p["task"] == task]

    def annotations_of(self, task: int) -> list[dict]:
        return [a for a in self.annotations.values() if a["task"] == task]

    # ------------------------------------------------------------------------------ HTTP side
    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type: str = "application/json"):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Token {TOKEN}"

            def do_GET(self):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                stand_in.requests.append(("GET", self.path))
                if not self._authorized():
                    return self._send(401, {"detail": "Authentication credentials were not provided."})
                accept = self.headers.get("Accept", "*/*")
                if "*/*" not in accept and "application/json" not in accept:
                    # Label Studio 1.23 negotiates content like an API, even for uploaded files.
                    return self._send(406, {"detail": f'Could not satisfy the request Accept header "{accept}".'})
                if url.path in stand_in.files:
                    content, content_type = stand_in.files[url.path]
                    return self._send(200, content, content_type)
                parts = url.path.strip("/").split("/")
                if parts[:2] == ["api", "projects"] and len(parts) == 3:
                    project = stand_in.projects.get(int(parts[2]))
                    return self._send(200, project) if project else self._send(404, {"detail": "Not found."})
                if parts == ["api", "tasks"]:
                    return self._tasks(query)
                single = {"tasks": stand_in.tasks, "annotations": stand_in.annotations}
                if len(parts) == 3 and parts[0] == "api" and parts[1] in single:
                    found = single[parts[1]].get(int(parts[2]))
                    return self._send(200, found) if found else self._send(404, {"detail": "Not found."})
                if parts == ["api", "ml"]:
                    project = int(query.get("project", 0))
                    return self._send(200, [b for b in stand_in.ml_backends.values() if b["project"] == project])
                if parts == ["api", "predictions"]:
                    task = int(query.get("task", 0))
                    return self._send(200, stand_in.predictions_for(task))
                return self._send(404, {"detail": "Not found."})

            def _tasks(self, query: dict):
                project = int(query.get("project", 0))
                page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
                tasks = sorted((t for t in stand_in.tasks.values() if t["project"] == project), key=lambda t: t["id"])
                if (page - 1) * size >= len(tasks) and page > 1:
                    return self._send(404, {"detail": "Invalid page."})
                chosen = tasks[(page - 1) * size : page * size]
                items = [
                    t
                    | {
                        "predictions": stand_in.predictions_for(t["id"]),
                        "annotations": stand_in.annotations_of(t["id"]),
                    }
                    for t in chosen
                ]
                body = {"tasks": items, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
                return self._send(200, body)

            def do_POST(self):
                stand_in.requests.append(("POST", self.path))
                if not self._authorized():
                    return self._send(401, {"detail": "Authentication credentials were not provided."})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if urlsplit(self.path).path.rstrip("/") == "/api/predictions":
                    time.sleep(stand_in.prediction_post_seconds)
                    with stand_in._lock:
                        if stand_in.failing_prediction_posts.get(body.get("task"), 0) > 0:
                            stand_in.failing_prediction_posts[body["task"]] -= 1
                            return self._send(500, {"detail": "server error"})
                        prediction = {"id": len(stand_in.predictions) + 1, **body}
                        stand_in.predictions.append(prediction)
                    return self._send(201, prediction)
                return self._send(404, {"detail": "Not found."})

            def do_PATCH(self):
                stand_in.requests.append(("PATCH", self.path))
                if not self._authorized():
                    return self._send(401, {"detail": "Authentication credentials were not provided."})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                parts = urlsplit(self.path).path.strip("/").split("/")
                if parts[:2] == ["api", "ml"] and len(parts) == 3 and int(parts[2]) in stand_in.ml_backends:
                    backend = stand_in.ml_backends[int(parts[2])]
                    project = stand_in.projects[backend["project"]]
                    if "title" in body and project.get("model_version") == backend["title"]:
                        project["model_version"] = body["title"]  # Label Studio's MLBackend.save does this
                    backend.update({k: v for k, v in body.items() if k in ("title", "url", "auth_method")})
                    return self._send(200, backend)
                if parts[:2] == ["api", "projects"] and len(parts) == 3 and int(parts[2]) in stand_in.projects:
                    project = stand_in.projects[int(parts[2])]
                    project.update({k: v for k, v in body.items() if k == "model_version"})
                    return self._send(200, project)
                return self._send(404, {"detail": "Not found."})

        return Handler
