"""The `xdecoder-ls` commands, run as a user runs them (environment configuration, real Redis)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from redis import Redis
from rq import Queue

from backend.queues import EmbeddedRedis, shown_redis_url
from backend.versions import VersionRegistry
from tests.helpers import subprocess_env
from tests.standin_ls import png

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="Car"/></PolygonLabels>
<TextArea name="prompt" toName="image"/></View>"""


def run(settings, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(settings, **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, capture_output=True, text=True)


COMMANDS = ("serve", "worker", "preannotate", "finetune", "versions", "status", "bench")


def test_help_lists_every_command(settings):
    result = run(settings, "--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^    {command} +[a-z]", result.stdout, re.MULTILINE), result.stdout  # with a summary
    assert "`xdecoder-ls COMMAND --help` describes a command" in " ".join(result.stdout.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_describes_it_and_every_option(settings, command):
    result = run(settings, command, "--help", extra_env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    usage, description, *_ = result.stdout.split("\n\n")
    assert usage.startswith(f"usage: xdecoder-ls {command}") and description[0].isupper() and description.endswith(".")
    options = result.stdout.split("options:\n", 1)[1].splitlines()
    for index, line in enumerate(options):
        if line.startswith("  -"):  # an option, with its help on the same line or indented on the next
            follows = options[index + 1] if index + 1 < len(options) else ""
            assert re.search(r"\S  +\S", line) or follows.startswith(" " * 8), f"{command}: {line!r} has no help"


def test_status_json_describes_redis_queues_and_projects(settings, redis):
    redis.sadd("xdls:projects", 3)
    result = run(settings, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["redis"] == settings.redis_url
    assert set(status["queues"]) == {"events", "predict", "train"}
    assert status["projects"]["3"]["model_version"] == "tiny"
    assert status["finetune_every"] == 50 and status["finetune_cron"] == "0 2 * * *"
    assert "Queues" in run(settings, "status").stdout  # the table form


def test_versions_lists_and_serves(settings):
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    version = registry.create(3, {"x": torch.zeros(1)}, "tiny", 4, {"miou": 0.7}, status="rejected")
    listed = json.loads(run(settings, "versions", "--json").stdout)
    assert [(v["name"], v["served"]) for v in listed] == [("tiny", True), ("tiny.p3.v1", False)]
    assert run(settings, "versions", "--serve", version.name).returncode == 0
    assert registry.current(3).name == "tiny.p3.v1"


def test_versions_serve_the_base_rolls_a_project_back_and_the_listing_marks_what_the_project_serves(settings):
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    version = registry.create(3, {"x": torch.zeros(1)}, "tiny", 4, {"miou": 0.7})
    registry.promote(version)
    listed = json.loads(run(settings, "versions", "--project", "3", "--json").stdout)
    assert [(v["name"], v["served"]) for v in listed] == [("tiny", False), ("tiny.p3.v1", True)]

    rolled_back = run(settings, "versions", "--serve", "tiny", "--project", "3")
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert "project 3 now serves tiny" in rolled_back.stdout
    assert registry.current(3).is_base and registry.get(version.name).status == "superseded"


def test_versions_refuses_to_serve_a_version_of_another_base_checkpoint(settings):
    other_base = VersionRegistry(settings.model_dir, "other.safetensors")  # XDECODER_CHECKPOINT was other.safetensors
    made_on_other = other_base.create(3, {"x": torch.zeros(1)}, "other", 4, {})
    refused = run(settings, "versions", "--serve", made_on_other.name)
    assert refused.returncode == 2
    assert "fine-tuned from the base checkpoint 'other', not from the current one ('tiny'" in " ".join(
        refused.stderr.split()
    )
    assert other_base.current(3).is_base  # nothing was served


def test_preannotate_detached_enqueues_chunks_with_prompts(settings, redis, label_studio):
    label_studio.add_project(11, CONFIG)
    for i in range(3):
        label_studio.add_task(11, {"image": label_studio.upload(f"c{i}.png", png(32, 32, seed=i), project=11)})
    result = run(settings, "preannotate", "--project", "11", "--prompt", "a red car", "--detach")
    assert result.returncode == 0, result.stderr
    assert "3 tasks" in result.stdout
    (job,) = Queue("predict", connection=redis).jobs
    project, tasks, _config, _run = job.args
    assert project == 11 and [t["data"]["prompt"] for t in tasks] == [["a red car"]] * 3


def test_preannotate_refuses_prompts_without_a_textarea(settings, redis, label_studio):
    label_studio.add_project(12, CONFIG.replace('<TextArea name="prompt" toName="image"/>', ""))
    result = run(settings, "preannotate", "--project", "12", "--prompt", "x", "--detach")
    assert result.returncode != 0 and "TextArea" in result.stderr


def test_finetune_detached_queues_one_job(settings, redis):
    first = run(settings, "finetune", "--project", "3", "--detach")
    second = run(settings, "finetune", "--project", "3", "--detach")
    assert "queued" in first.stdout and "already queued or running" in second.stdout
    assert Queue("train", connection=redis).count == 1


@pytest.mark.parametrize("bad", [["worker", "--queues", "nope", "--burst"], ["preannotate"]])
def test_bad_arguments_fail_clearly(settings, bad):
    result = run(settings, *bad)
    assert result.returncode != 0
    assert "nope" in result.stderr or "--project" in result.stderr


def test_worker_device_flag_chooses_where_the_model_loads(settings, redis):
    elsewhere = settings.model_copy(update={"device": "cuda:7"})  # no such device here: only --device can save it
    command = ["worker", "--queues", "predict", "--burst"]
    refused = run(elsewhere, *command)
    assert refused.returncode != 0 and "cuda" in refused.stderr.lower()
    loaded = run(elsewhere, "--log-level", "INFO", *command, "--device", "cpu")
    assert loaded.returncode == 0, loaded.stderr
    assert " on cpu in " in loaded.stderr


def test_worker_threads_come_from_the_flag_else_the_setting_and_idle_openmp_threads_sleep(settings, redis):
    predict = Queue("predict", connection=redis)
    env = subprocess_env(settings.model_copy(update={"threads": 2}))
    env.pop("OMP_WAIT_POLICY", None)
    worker = [sys.executable, "-m", "backend.cli", "worker", "--queues", "predict", "--burst"]

    def in_a_worker(*flags: str, **extra_env: str) -> list:
        jobs = [predict.enqueue("torch.get_num_threads"), predict.enqueue("os.getenv", "OMP_WAIT_POLICY")]
        ran = subprocess.run([*worker, *flags], env={**env, **extra_env}, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        return [job.return_value() for job in jobs]

    assert in_a_worker() == [2, "PASSIVE"]
    assert in_a_worker("--threads", "1") == [1, "PASSIVE"]
    assert in_a_worker(OMP_WAIT_POLICY="ACTIVE") == [2, "ACTIVE"]  # a user's own choice stands
    refused = run(settings, "worker", "--queues", "predict", "--burst", "--threads", "0")
    assert refused.returncode == 2 and "at least 1" in refused.stderr


def test_serve_threads_flag_sets_the_models_threads(settings):
    serve = ["serve", "--host", "127.0.0.1", "--port", str(closed_port()), "--threads", "1"]
    server = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "--log-level", "INFO", *serve],
        env=subprocess_env(settings.model_copy(update={"threads": 2})),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = iter(server.stderr.readline, "")
        loaded = next(line for line in lines if " loaded " in line)
        assert loaded.rstrip().endswith("(1 CPU threads)")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_finetune_waits_for_the_worker_and_prints_its_summary(settings, redis):
    env = subprocess_env(settings)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "finetune", "--project", "3"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while Queue("train", connection=redis).count == 0:  # queued before the worker looks
            assert time.monotonic() < deadline and waiting.poll() is None
            time.sleep(0.1)
        assert run(settings, "worker", "--queues", "train", "--burst").returncode == 0
        out, _ = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert waiting.returncode == 0
    assert "fine-tune queued" in out and "'status': 'skipped'" in out  # project 3 has no corrections


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and all(p in result.stderr for p in phrases), result.stderr


def test_an_unreachable_redis_is_one_line_and_its_password_is_not_shown(settings):
    port = closed_port()
    result = run(settings.model_copy(update={"redis_url": f"redis://:s3cret@127.0.0.1:{port}/0"}), "status")
    assert_one_line_error(result, f"Redis at redis://:***@127.0.0.1:{port}/0", "onnect")
    assert "s3cret" not in result.stderr + result.stdout


def test_a_redis_password_is_masked_in_status(settings):
    assert shown_redis_url("redis://worker:pw@10.0.0.5:6380/2") == "redis://worker:***@10.0.0.5:6380/2"
    assert shown_redis_url(settings.redis_url) == settings.redis_url  # nothing to mask


@pytest.mark.parametrize(
    ("change", "command", "phrases"),
    [
        ({}, ["preannotate", "--project", "1", "--tasks", "1,x"], ["--tasks takes all, missing, or task ids"]),
        ({}, ["worker", "--queues", ",", "--burst"], ["no queue to listen on"]),
        ({"checkpoint": "/nowhere/model.pt"}, ["serve", "--port", "1"], ["checkpoint not found: /nowhere/model.pt"]),
        ({"model_dir": Path("/dev/null/models")}, ["versions"], ["/dev/null/models"]),
        (
            {"label_studio_url": "http://127.0.0.1:{port}"},
            ["preannotate", "--project", "1"],
            ["cannot reach Label Studio"],
        ),
        ({"log_level": "verbose"}, ["versions"], ["LOG_LEVEL", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"]),
        ({}, ["versions", "--serve", "nope"], ["error: unknown model version 'nope' (`xdecoder-ls versions` lists"]),
    ],
    ids=["task-ids", "no-queues", "no-checkpoint", "model-dir", "label-studio-down", "log-level", "unknown-version"],
)
def test_common_mistakes_are_one_line_errors(settings, redis, change, command, phrases):
    change = {k: v.format(port=closed_port()) if isinstance(v, str) else v for k, v in change.items()}
    assert_one_line_error(run(settings.model_copy(update=change), *command), *phrases)


# ------------------------------------------------------------------------------ output a person reads
def preannotate_with_a_worker(
    settings, redis, *args: str, columns: int = 80
) -> tuple[subprocess.CompletedProcess, str]:
    """`preannotate` waiting for a worker (--burst) that runs its jobs: (the command's result, the worker's log)."""
    env = subprocess_env(settings, COLUMNS=str(columns))
    waiting = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "preannotate", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while Queue("predict", connection=redis).count == 0:  # queued before the worker looks
            assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
            time.sleep(0.1)
        worker = run(settings, "worker", "--queues", "predict", "--burst")
        assert worker.returncode == 0, worker.stderr
        out, err = waiting.communicate(timeout=300)  # a shared, busy machine: the worker's first poll is slow
    finally:
        waiting.kill()
    return subprocess.CompletedProcess(waiting.args, waiting.returncode, out, err), worker.stdout + worker.stderr


def project_with_a_missing_image(label_studio, project: int) -> int:
    """A project of three tasks, one of whose images is not in Label Studio; returns that task's id."""
    label_studio.add_project(project, CONFIG)
    for i in range(2):
        label_studio.add_task(
            project, {"image": label_studio.upload(f"ok{i}.png", png(32, 32, seed=i), project=project)}
        )
    return label_studio.add_task(project, {"image": f"/data/upload/{project}/gone.png"})


def test_preannotate_names_each_failed_task_and_why_in_a_narrow_terminal_and_the_worker_log_stays_short(
    settings, redis, label_studio
):
    missing = project_with_a_missing_image(label_studio, 21)
    result, worker_log = preannotate_with_a_worker(settings, redis, "--project", "21", columns=60)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "HTTP Request" not in result.stdout + result.stderr
    assert "done 2, failed 1, skipped 0 of 3" in lines
    # The bar keeps its timers (elapsed, eta) within 60 columns; the run's details go on the line under it.
    bar = next(line for line in lines if line.startswith("project 21"))
    assert len(bar) <= 60 and re.search(r" 3/3 +0:\d\d:\d\d +eta +0:00:00$", bar), bar
    detail = lines[lines.index(bar) + 1]
    assert detail.startswith("  done 2, failed 1, skipped 0, ") and len(detail) <= 60, detail
    # Which task failed, and why.
    assert any(re.match(rf"│ {missing} +│ not_found: the image was not found ", line) for line in lines), result.stdout
    assert "Fix the cause and run the same command again" in " ".join(result.stdout.split())
    # status lists the run and its failed task too.
    status = run(settings, "status")
    assert "Pre-annotation runs" in status.stdout and f"│ {missing} " in status.stdout, status.stdout
    (listed,) = json.loads(run(settings, "status", "--json").stdout)["preannotate_runs"]
    assert (listed["project"], listed["done"], listed["failed_tasks"]) == (21, 2, {str(missing): "not_found"})
    # The worker's log: no line per HTTP request, no routine maintenance, jobs without their arguments in full.
    assert "HTTP Request" not in worker_log
    assert "cleaning registries" not in worker_log and "result is kept" not in worker_log
    assert "<View" not in worker_log and "predict_chunk(21, 3 items, <" in worker_log, worker_log
    assert f"task {missing}: no prediction, image unavailable (not_found)" in worker_log


def test_versions_are_a_table_that_marks_what_is_served(settings):
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    registry.create(3, {"x": torch.zeros(1)}, "tiny", 4, {"miou": 0.71, "parent_miou": 0.65}, status="rejected")
    result = run(settings, "versions")
    assert result.returncode == 0, result.stderr
    assert "project=None" not in result.stdout and "{}" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["version", "project", "status", "mIoU", "created"], result.stdout
    cells = [line.split() for line in lines[3:] if len(line.split()) >= 5]
    rows = {row[1] if row[0] == "*" else row[0]: row for row in cells}
    assert rows["tiny"][:4] == ["*", "tiny", "all", "base"]
    assert rows["tiny.p3.v1"][:4] == ["tiny.p3.v1", "3", "rejected", "0.650→0.710"]
    assert all(len(line) <= 80 for line in lines)
    assert "* served; the base serves every project that has no fine-tune of its own" in result.stdout


def test_versions_of_a_project_nobody_knows_is_an_error(settings, redis, label_studio):
    assert_one_line_error(
        run(settings, "versions", "--project", "99"),
        "no project 99: it has no model versions and no corrections here",
        "has no project 99 (404)",
    )
    assert run(settings, "versions", "--serve", "tiny", "--project", "99").returncode == 2
    label_studio.add_project(31, CONFIG)  # known to Label Studio, nothing here yet: its listing is the base
    listed = run(settings, "versions", "--project", "31")
    assert listed.returncode == 0 and "* served for project 31" in listed.stdout, listed.stderr
    redis.sadd("xdls:projects", 32)  # corrections here, and Label Studio does not answer for it
    assert run(settings, "versions", "--project", "32").returncode == 0


def test_status_before_the_first_correction_says_what_to_expect(settings, redis):
    redis.hincrby("xdls:events:ignored", "TASKS_CREATED", 2)
    result = run(settings, "status")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "Projects none yet: a project is listed once Label Studio sends this backend its first annotation" in out
    assert "corrections" not in out  # no empty table
    assert (
        "webhook actions received and ignored: TASKS_CREATED x2 (nothing to worry about: Label Studio's webhook "
        "sends every action, and only annotation events and START_TRAINING teach the model)"
    ) in out


def test_the_embedded_redis_stops_with_the_last_process_that_uses_it(settings, tmp_path):
    embedded = settings.model_copy(update={"redis_url": None, "model_dir": tmp_path / "m"})
    server = EmbeddedRedis(tmp_path / "m" / "redis")
    assert run(embedded, "status").returncode == 0
    assert not server.running()  # started for the command, stopped after it: nothing else used it

    server.ensure_running()
    other = Redis(unix_socket_path=str(server.socket), client_name="a-dashboard")
    other.set("kept", "yes")
    try:
        worker = run(embedded, "worker", "--queues", "events", "--burst")
        assert worker.returncode == 0, worker.stderr
        message = " ".join(worker.stderr.split())
        assert "The embedded Redis keeps running for a-dashboard; it stops when the last xdecoder-ls process" in message
        assert f"To stop it now (its data is saved): {server.stop_command}" in message
        assert server.running()
    finally:
        other.close()
    worker = run(embedded, "worker", "--queues", "events", "--burst")
    assert f"Stopped the embedded Redis ({server.folder}): no other process uses it." in " ".join(worker.stderr.split())
    assert not server.running()
    server.ensure_running()
    assert Redis(unix_socket_path=str(server.socket)).get("kept") == b"yes"  # saved when it stopped
    server.stop()


class StandInHub:
    """A stand-in Hugging Face Hub (HF_ENDPOINT) serving one file, or answering 503 to everything."""

    def __init__(self, content: bytes | None):
        digest = hashlib.sha256(content or b"").hexdigest()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self) -> bool:
                if content is None:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", f'"{digest}"')
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                return True

            def do_GET(self):
                if self.do_HEAD():
                    self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_in_a_terminal(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """The command's output as a 100x40 terminal shows it (stdout and stderr on one pseudo-terminal)."""
    main_end, command_end = pty.openpty()
    fcntl.ioctl(command_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    command = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *args], env=env, stdin=command_end, stdout=command_end,
        stderr=command_end,
    )  # fmt: skip
    os.close(command_end)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main_end, 65536)
        except OSError:  # the command exited and its end of the terminal closed
            break
        if not chunk:
            break
        output += chunk
    command.wait(timeout=30)
    os.close(main_end)
    return output.decode(errors="replace")


def test_a_hub_download_shows_its_progress_and_each_retry_warning_once(settings, tmp_path):
    checkpoint = Path(settings.checkpoint).read_bytes()
    from_the_hub = settings.model_copy(
        update={"checkpoint": "tiny.safetensors", "redis_url": f"redis://127.0.0.1:{closed_port()}/0"}
    )
    hub = StandInHub(checkpoint)
    try:
        env = subprocess_env(from_the_hub, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hub"))
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        shown = run_in_a_terminal(env, "worker", "--queues", "predict", "--burst")
    finally:
        hub.close()
    assert "fetching tiny.safetensors from the Hugging Face Hub" in shown
    assert re.search(r"tiny\.safetensors: 100%\|█+\| [\d.]+M/[\d.]+M", shown), shown
    assert "loaded tiny.safetensors on cpu" in shown

    down = StandInHub(None)
    try:
        result = run(
            from_the_hub,
            "worker",
            "--queues",
            "predict",
            "--burst",
            extra_env={"HF_ENDPOINT": down.url, "HF_HUB_CACHE": str(tmp_path / "hub2")},
        )
    finally:
        down.close()
    assert result.returncode == 2
    assert result.stderr.count("Retrying in 1s [Retry 1/5]") == 1, result.stderr
    assert result.stderr.count("HTTP Error 503 thrown while requesting HEAD") == 6, result.stderr
    assert "HTTP Request" not in result.stderr
    assert "error: checkpoint tiny.safetensors could not be downloaded from the Hugging Face Hub" in " ".join(
        result.stderr.split()
    )
