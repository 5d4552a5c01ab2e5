"""What the tests against a real Label Studio share: starting it, waiting for services, its API, our server.

scripts/test.sh installs Label Studio 1.23.2 into .venv-labelstudio and sets XDECODER_E2E_LABEL_STUDIO; without it
the tests marked `e2e` skip and say so. One Label Studio serves the whole session (the `label_studio_url` fixture in
conftest.py); each test makes projects of its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.standin_ls import TOKEN

LABEL_STUDIO = os.environ.get("XDECODER_E2E_LABEL_STUDIO")
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin12345"

marks = [
    pytest.mark.e2e,
    pytest.mark.skipif(not LABEL_STUDIO, reason="set XDECODER_E2E_LABEL_STUDIO to a label-studio executable"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Waits for `url` to answer below 500; fails with the log's tail if it does not, or if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_tail(log) if log else ""
            raise AssertionError(f"{url}: the process exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not come up in {timeout:.0f} s:\n{log_tail(log) if log else ''}")


@contextlib.contextmanager
def running_label_studio(data: Path) -> Iterator[str]:
    """A real Label Studio on loopback with the offline settings of shared/reference/label-studio.md."""
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
        "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # no error reports to Sentry: this machine reaches no network but loopback
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }
    log = data / "label-studio.log"
    command = [LABEL_STUDIO, "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port), "--data-dir",
               str(data)]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", timeout=300, process=process, log=log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def running_backend(env: dict[str, str], log: Path) -> Iterator[str]:
    """`xdecoder-ls serve` on a free loopback port with `env` (see tests.helpers.subprocess_env)."""
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/health", timeout=120, process=server, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def api(label_studio_url: str) -> httpx.Client:
    return httpx.Client(base_url=label_studio_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=120)


def new_project(ls: httpx.Client, title: str, label_config: str, images: dict[str, bytes]) -> tuple[int, list[int]]:
    """A Label Studio project with `images` (file name -> PNG) uploaded as tasks: (project id, task ids in order)."""
    project = ls.post("/api/projects/", json={"title": title, "label_config": label_config}).json()["id"]
    for name, data in images.items():
        upload = ls.post(f"/api/projects/{project}/import", files={"file": (name, data, "image/png")})
        assert upload.status_code == 201, upload.text
    tasks = ls.get("/api/tasks/", params={"project": project}).json()["tasks"]
    return project, sorted(task["id"] for task in tasks)


def connect_and_retrieve(ls: httpx.Client, project: int, backend_url: str, interactive: bool = False) -> int:
    """Connects our backend to `project` (Settings > Model) and runs the Data Manager's Retrieve predictions on every
    task, as a user does; returns the ML backend's id."""
    ml = ls.post("/api/ml", json={"url": backend_url, "project": project, "title": "xdecoder",
                                  "is_interactive": interactive})  # fmt: skip
    assert ml.status_code == 201, ml.text
    action = ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                     json={"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    assert action.status_code == 200, action.text
    return ml.json()["id"]
