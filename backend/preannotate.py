"""`xdecoder-ls preannotate`: pre-annotate a whole project through the workers.

Label Studio's "Retrieve predictions" sends a whole selection in one request with a 100 s timeout;
big projects cannot finish in it. This command lists the project's tasks through the Label Studio
API, enqueues them in chunks on the `predict` queue, and shows progress until the workers are done
(or returns at once with --detach). Workers post each prediction to Label Studio under the current
model version and skip tasks that already have one, so an interrupted run simply resumes
(deleting a project's predictions in Label Studio makes the next run predict those tasks again).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from rq.job import Job, JobStatus

from .corrections import PREFIX
from .label_config import ProjectSpec
from .labelstudio import LabelStudioAPI, LabelStudioTask
from .progress import ProgressSnapshot, RunProgress, explain
from .queues import LIVE_JOB_STATES, PREDICT, enqueue
from .settings import Settings
from .versions import VersionRegistry

CHUNK_SIZE = 16
FAILURES_SHOWN = 20
PLACEHOLDER_SUFFIXES = ("/pending", "/failed")  # empty answers /predict gave, not predictions
POLL_S = 1.0
QUEUED_TTL_S = 7 * 86400  # outlives the jobs it points at (their retries and the wait in a long queue included)


@dataclass
class PreannotateRun:
    run_id: str
    project: int
    version: str
    total: int
    job_ids: list[str]


def select_tasks(
    tasks: Sequence[LabelStudioTask], version: str, which: str, unannotated_only: bool = False
) -> tuple[list[LabelStudioTask], int]:
    """(tasks to predict, how many were skipped). `which`: "all" (every task without a prediction of
    the current version) or "missing" (only tasks without any prediction); `unannotated_only`: leave out the tasks
    with annotations (the re-prediction after a promotion)."""
    chosen = []
    for task in tasks:
        real = {v for v in task.model_versions if not v.endswith(PLACEHOLDER_SUFFIXES)}
        if unannotated_only and task.annotated:
            continue
        if version not in real and (which != "missing" or not real):
            chosen.append(task)
    return chosen, len(tasks) - len(chosen)


def with_prompts(task: LabelStudioTask, spec: ProjectSpec, prompts: Sequence[str]) -> dict:
    """The task payload with extra prompts added to every prompt field the config reads."""
    payload = task.to_payload()
    if not prompts:
        return payload
    data = dict(payload["data"])
    for image in spec.images:
        for area in image.prompt_areas:
            existing = data.get(area.data_field)
            current = [existing] if isinstance(existing, str) and existing else list(existing or [])
            data[area.data_field] = current + [p for p in prompts if p not in current]
    payload["data"] = data
    return payload


def start(
    settings: Settings,
    redis: Redis,
    project: int,
    which: str = "all",
    task_ids: Sequence[int] | None = None,
    prompts: Sequence[str] = (),
    api: LabelStudioAPI | None = None,
    chunk_size: int = CHUNK_SIZE,
    unannotated_only: bool = False,
) -> PreannotateRun:
    api = api or LabelStudioAPI(settings)
    label_config = api.label_config(project)
    spec = ProjectSpec.parse(label_config)
    if prompts and not any(image.prompt_areas for image in spec.images):
        raise ValueError(
            "--prompt needs a <TextArea> attached to the image in the labeling config (see label_config/README.md)"
        )
    version = VersionRegistry(settings.model_dir, settings.checkpoint).current(project).name
    listed = list(api.tasks(project, task_ids))
    if task_ids is not None and (absent := sorted(set(task_ids) - {task.id for task in listed})):
        raise LookupError(f"project {project} has no tasks {', '.join(map(str, absent))}; nothing was queued")
    tasks, skipped = select_tasks(listed, version, which, unannotated_only)
    run = PreannotateRun(f"run-p{project}-{uuid.uuid4().hex[:8]}", project, version, len(tasks) + skipped, [])
    progress = RunProgress(redis, run.run_id)
    progress.start(run.total, project, version, skipped_when_listed=skipped)
    payloads = [with_prompts(t, spec, prompts) for t in tasks]
    run.job_ids = enqueue_chunks(redis, project, payloads, label_config, run.run_id, chunk_size)
    return run


def enqueue_chunks(
    redis: Redis, project: int, tasks: list[dict], label_config: str | None, run_id: str, chunk_size: int = CHUNK_SIZE
) -> list[str]:
    """Queue `tasks` (as /predict receives them) on the predict queue in chunks; returns the job ids."""
    queued = QueuedTasks(redis, project)
    job_ids = []
    for start_at in range(0, len(tasks), chunk_size):
        chunk = tasks[start_at : start_at + chunk_size]
        job_ids.append(enqueue(redis, PREDICT, "backend.jobs.predict_chunk", project, chunk, label_config, run_id).id)
        queued.record(job_ids[-1], [int(task["id"]) for task in chunk])
    return job_ids


class QueuedTasks:
    """A project's tasks on the predict queue, each with the id of the job that predicts it.

    /predict asks which of a batch are still there (their job queued, running or waiting for a retry), so that a
    second "Retrieve predictions" during a run or a hand-over does not predict them again: Label Studio would keep
    both predictions, the worker's and the one /predict answered.
    """

    def __init__(self, redis: Redis, project: int):
        self.redis = redis
        self.key = f"{PREFIX}:project:{project}:queued_tasks"

    def record(self, job_id: str, task_ids: Sequence[int]) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key, mapping=dict.fromkeys(task_ids, job_id))
            pipe.expire(self.key, QUEUED_TTL_S)
            pipe.execute()

    def in_flight(self, task_ids: Sequence[int]) -> set[int]:
        """Those of `task_ids` whose job has not ended. A task that a later job took over counts by that job."""
        if not task_ids:
            return set()
        recorded = self.redis.hmget(self.key, task_ids)
        job_of = {task: job.decode() for task, job in zip(task_ids, recorded, strict=True) if job is not None}
        job_ids = sorted(set(job_of.values()))
        jobs = Job.fetch_many(job_ids, connection=self.redis)
        live = {job.id for job in jobs if job is not None and job.get_status(refresh=False) in LIVE_JOB_STATES}
        return {task for task, job_id in job_of.items() if job_id in live}


class _RunBar(Progress):
    """The bar, its count and timers on one line that fits a narrow terminal (the bar shrinks), with the outcomes
    and the rate on the line under it, where a very narrow terminal cuts them rather than the timers."""

    detail = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield Text(self.detail, no_wrap=True, overflow="ellipsis")


def watch(
    redis: Redis, run: PreannotateRun, poll_s: float = POLL_S, console: Console | None = None
) -> ProgressSnapshot:
    """Show a live progress bar (done / failed / rate / ETA) until every task is accounted for, or every
    job has stopped (e.g. they failed for good)."""
    progress = RunProgress(redis, run.run_id)
    columns = (
        TextColumn(f"[bold]project {run.project}[/]"),
        BarColumn(bar_width=None),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with _RunBar(*columns, console=console, expand=True) as bar:
        task = bar.add_task("preannotate", total=run.total)
        while True:
            snapshot = progress.snapshot()
            rate = snapshot.done / max(time.time() - snapshot.started_at, 1e-6)
            bar.detail = (
                f"  done {snapshot.done}, failed {snapshot.failed}, skipped {snapshot.skipped}, {rate:.2f} tasks/s"
            )
            bar.update(task, completed=snapshot.finished)
            if snapshot.finished >= run.total or not _any_job_alive(redis, run.job_ids):
                return progress.snapshot()
            time.sleep(poll_s)


def failed_jobs(redis: Redis, job_ids: Sequence[str]) -> list[tuple[str, int, str]]:
    """The run's jobs that failed for good: (job id, how many tasks it had, the last line of its error)."""
    failed = []
    for job in Job.fetch_many(list(job_ids), connection=redis):
        if job is not None and job.get_status() == JobStatus.FAILED:
            latest = job.latest_result()
            error = ((latest.exc_string if latest else None) or "").strip().splitlines()
            failed.append((job.id, len(job.args[1]), error[-1] if error else "no error recorded"))
    return failed


def failures_table(failures: dict[int, str], title: str) -> Table:
    """Failed tasks with why, the first FAILURES_SHOWN of them (the caption counts the rest)."""
    table = Table("task", "why it failed", title=title, title_justify="left", expand=False)
    for task, reason in list(failures.items())[:FAILURES_SHOWN]:
        table.add_row(str(task), explain(reason))
    if len(failures) > FAILURES_SHOWN:
        table.caption = f"and {len(failures) - FAILURES_SHOWN} more"
    return table


def render_runs(runs: Sequence[dict], console: Console) -> None:
    """The latest pre-annotation runs (as `status --json` lists them) and the failed tasks of each."""
    if not runs:
        return
    table = Table("run", "project", "model version", "done", "failed", "skipped", "of", title="Pre-annotation runs")
    for run in runs:
        counts = (run["done"], run["failed"], run["skipped"], run["total"])
        table.add_row(run["run"], str(run["project"]), run["version"], *map(str, counts))
    console.print(table)
    for run in runs:
        if run["failed_tasks"]:
            failures = {int(task): reason for task, reason in run["failed_tasks"].items()}
            console.print(failures_table(failures, f"{run['run']}: {len(failures)} tasks failed"))


def _any_job_alive(redis: Redis, job_ids: list[str]) -> bool:
    jobs = Job.fetch_many(job_ids, connection=redis)
    return any(job is not None and job.get_status() in LIVE_JOB_STATES for job in jobs)
