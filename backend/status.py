"""`xdecoder-ls status`: where Redis is, what the queues and workers are doing, and each project's
learning state (corrections, exclusions and why, last fine-tune, the version served)."""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis
from rich.console import Console
from rich.table import Table
from rq import Queue, Worker
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from .corrections import IGNORED_ACTIONS, REJECTED_EVENTS, CorrectionStore
from .learning import finetune_job_status
from .preannotate import render_runs
from .progress import RunProgress, recent_runs
from .queues import LIVE_JOB_STATES, QUEUE_NAMES
from .settings import Settings
from .versions import VersionRegistry

FAILED_SHOWN = 10
NO_PROJECTS_YET = (
    "[bold]Projects[/] none yet: a project is listed once Label Studio sends this backend its first annotation "
    "(a task submitted or updated in the editor; see the webhook set-up in the README, Connecting Label Studio)"
)
IGNORED_IS_FINE = (
    "nothing to worry about: Label Studio's webhook sends every action, and only annotation events and "
    "START_TRAINING teach the model"
)


def collect(settings: Settings, redis: Redis, redis_location: str) -> dict[str, Any]:
    store = CorrectionStore(redis)
    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    queues = {}
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=redis)
        failed = FailedJobRegistry(queue=queue)
        failed_jobs = []
        for job in queue.job_class.fetch_many(failed.get_job_ids()[:FAILED_SHOWN], connection=redis):
            if job is not None:
                latest = job.latest_result()
                error = ((latest.exc_string if latest else None) or "").strip().splitlines()
                failed_jobs.append({"id": job.id, "function": job.func_name, "error": error[-1] if error else ""})
        queues[name] = {
            "queued": queue.count,
            "running": StartedJobRegistry(queue=queue).get_job_ids(),
            "retrying": ScheduledJobRegistry(queue=queue).get_job_ids(),  # failed, waiting for their next try
            "failed": failed.count,
            "failed_jobs": failed_jobs,
        }
    workers = [
        {"name": w.name, "queues": w.queue_names(), "state": str(w.get_state()), "job": w.get_current_job_id()}
        for w in Worker.all(connection=redis)
    ]
    projects = {}
    for project in store.projects():
        meta = store.meta(project)
        excluded = store.excluded(project)
        projects[str(project)] = {
            "corrections": store.count(project),
            "new_since_last_finetune": store.changed_count(project),
            "excluded": {str(k): v["reason"] for k, v in excluded.items()},
            "last_finetune": _last_finetune(redis, project, meta),
            "model_version": registry.current(project).name,
            "not_yet_checked": store.unchecked_count(project),  # corrections Label Studio could not confirm yet
            "label_studio": _label_studio_sync(redis, meta),
        }
    return {
        "redis": redis_location,
        "queues": queues,
        "workers": workers,
        "base_model_version": registry.base.name,
        "finetune_every": settings.finetune_every,
        "finetune_cron": settings.finetune_cron,
        "projects": projects,
        "events_ignored": {k.decode(): int(v) for k, v in redis.hgetall(IGNORED_ACTIONS).items()},
        "preannotate_runs": recent_runs(redis),
        "events_rejected": [json.loads(e) for e in redis.lrange(REJECTED_EVENTS, 0, 19)],
        "generated_at": time.time(),
    }


def _label_studio_sync(redis: Redis, meta: dict[str, str]) -> dict[str, Any]:
    """The model version Label Studio was last set to show, the error of a sync that failed, and the progress of the
    re-prediction after the last change of version (backend.jobs.sync_label_studio)."""
    sync = {"shows": meta.get("label_studio_sync"), "error": meta.get("label_studio_sync_error") or None}
    if run_id := meta.get("repredict_run"):
        snapshot = RunProgress(redis, run_id).snapshot()
        sync["repredict"] = {
            "run": run_id, "version": meta.get("repredict_version"), "total": snapshot.total,
            "done": snapshot.done, "failed": snapshot.failed, "skipped": snapshot.skipped,
        }  # fmt: skip
    return sync


def _last_finetune(redis: Redis, project: int, meta: dict[str, str]) -> dict[str, Any]:
    last: dict[str, Any] = {k[len("finetune_") :]: v for k, v in meta.items() if k.startswith("finetune_")}
    if "gate" in last:  # backend.finetune.fine_tune's figures, kept as JSON
        last["gate"] = json.loads(last["gate"])
    if last.get("status") == "running":
        job = finetune_job_status(redis, project)
        if job in LIVE_JOB_STATES - {JobStatus.STARTED}:
            last["status"] = "interrupted, queued again"  # its worker died; RQ runs it again
        elif job != JobStatus.STARTED:
            last["status"] = "interrupted"  # its worker died and RQ has no try of it left
    return last


def render_gate(gate: dict[str, Any]) -> str:
    """One line of a fine-tune's gate: the decision, then per class and overall the served -> candidate figures."""
    before, after = gate["parent"], gate["candidate"]
    classes = ", ".join(
        f"{label} {iou:.1f}->{after['per_class_iou'].get(label, 0.0):.1f}"
        for label, iou in before["per_class_iou"].items()
    )
    overall = ", ".join(
        f"{name} {before[key]}->{after[key]}"
        for name, key in (
            ("PQ", "pq"),
            ("PQ things", "pq_things"),
            ("PQ stuff", "pq_stuff"),
            ("cIoU", "referring_ciou"),
        )
        if before.get(key) is not None or after.get(key) is not None
    )
    return f"{gate['decision']}; on the {gate['scored_on']} corrections, IoU {classes}; {overall}"


def render(status: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]Redis[/] {status['redis']}   [bold]base model[/] {status['base_model_version']}")
    table = Table("queue", "queued", "running", "waiting to retry", "failed", title="Queues")
    for name, queue in status["queues"].items():
        counts = queue["queued"], len(queue["running"]), len(queue["retrying"]), queue["failed"]
        table.add_row(name, *map(str, counts))
    console.print(table)
    for name, queue in status["queues"].items():
        for job in queue["failed_jobs"]:
            console.print(f"  failed [{name}] {job['id']} {job['function']}: {job['error']}")
    table = Table("worker", "queues", "state", "job", title="Workers")
    for worker in status["workers"]:
        table.add_row(worker["name"], ",".join(worker["queues"]), worker["state"], worker["job"] or "")
    console.print(table if status["workers"] else "[yellow]no workers running[/]")
    table = Table("project", "corrections", "new", "excluded", "last fine-tune", "served version", title="Projects")
    for project, info in status["projects"].items():
        last = info["last_finetune"]
        summary = " ".join(f"{k}={last[k]}" for k in ("status", "progress", "version", "miou") if k in last)
        table.add_row(
            project, str(info["corrections"]), str(info["new_since_last_finetune"]), str(len(info["excluded"])),
            summary, info["model_version"],
        )  # fmt: skip
    console.print(table if status["projects"] else NO_PROJECTS_YET)
    for project, info in status["projects"].items():
        if info["last_finetune"].get("detail"):
            console.print(f"  project {project}: last fine-tune not served: {info['last_finetune']['detail']}")
        if gate := info["last_finetune"].get("gate"):
            console.print(f"  project {project}: last fine-tune's gate: {render_gate(gate)}", highlight=False)
        for annotation, reason in list(info["excluded"].items())[:10]:
            console.print(f"  project {project}: annotation {annotation} kept out of training: {reason}")
        if info.get("not_yet_checked"):
            console.print(
                f"  project {project}: {info['not_yet_checked']} corrections not yet checked with Label Studio "
                "(unreachable); they wait and are checked again every minute"
            )
        sync = info.get("label_studio") or {}
        if sync.get("error"):
            console.print(f"  project {project}: Label Studio not yet told the served version: {sync['error']}")
        if repredict := sync.get("repredict"):
            console.print(
                f"  project {project}: re-prediction with {repredict['version']}: {repredict['done']} done, "
                f"{repredict['failed']} failed, {repredict['skipped']} skipped of {repredict['total']}"
            )
    render_runs(status["preannotate_runs"], console)
    if status["events_ignored"]:
        counts = ", ".join(f"{k} x{v}" for k, v in status["events_ignored"].items())
        console.print(f"webhook actions received and ignored: {counts} ({IGNORED_IS_FINE})")
    for event in status["events_rejected"][:5]:
        console.print(f"  rejected webhook {event['action']}: {event['reason']}")
