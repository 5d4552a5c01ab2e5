"""What the workers run. Each function is enqueued by its dotted path (e.g. "backend.jobs.apply_event")
by the server or the CLI, and runs inside `xdecoder-ls worker`, which keeps one `WorkerContext` (and
so one loaded model) for all its jobs.

Jobs are safe to run twice: RQ re-runs a job whose worker died mid-way, and Label Studio re-sends
webhooks. Events are upserts keyed by annotation id; predictions are skipped for tasks that already
have one of the current model version.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from .corrections import CorrectionStore, InvalidAnnotation, as_id
from .inference import ModelService
from .label_config import LabelConfigError, ProjectSpec
from .labelstudio import LabelStudioAPI
from .progress import RunProgress
from .settings import Settings, get_settings
from .versions import project_id

logger = logging.getLogger(__name__)

# Label Studio API calls a pre-annotation job has in flight at once (checks for earlier predictions, posts).
LABEL_STUDIO_CALLS = 4


@dataclass
class WorkerContext:
    """Everything a worker process keeps between jobs."""

    settings: Settings
    redis: Redis
    _service: ModelService | None = field(default=None, repr=False)
    _label_studio: LabelStudioAPI | None = field(default=None, repr=False)

    @property
    def service(self) -> ModelService:
        return self.load_model()

    def load_model(self) -> ModelService:
        if self._service is None:
            self._service = ModelService(self.settings)
        return self._service

    @property
    def label_studio(self) -> LabelStudioAPI:
        return self.connect_label_studio()

    def connect_label_studio(self) -> LabelStudioAPI:
        if self._label_studio is None:
            self._label_studio = LabelStudioAPI(self.settings)
        return self._label_studio

    @property
    def store(self) -> CorrectionStore:
        return CorrectionStore(self.redis)


_context: WorkerContext | None = None


def set_context(context: WorkerContext | None) -> None:
    global _context
    _context = context


def context() -> WorkerContext:
    global _context
    if _context is None:
        from .queues import connect

        settings = get_settings()
        _context = WorkerContext(settings, connect(settings))
    return _context


# ------------------------------------------------------------------------------------------ events
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


def apply_event(payload: Mapping[str, Any]) -> str:
    """Apply one stored webhook to the corrections store; returns what was done (kept as the job result)."""
    from .learning import maybe_request_finetune, request_finetune

    ctx = context()
    store = ctx.store
    action = str(payload.get("action"))
    project_field = payload.get("project")
    project = project_id(project_field.get("id") if isinstance(project_field, Mapping) else project_field)
    label_config = project_field.get("label_config") if isinstance(project_field, Mapping) else None
    if project is None:
        store.record_rejected(action, "no project id")
        logger.warning("webhook %s without a project id: ignored", action)
        return "rejected: no project"

    if action in ANNOTATION_ACTIONS or action == "ANNOTATIONS_CREATED":
        pairs = _annotation_task_pairs(payload)
        if not pairs:
            store.record_rejected(action, "no annotation in the payload")
            logger.warning("webhook %s for project %s carries no annotation: ignored", action, project)
            return "rejected: no annotation"
        outcomes = [_upsert(store, action, project, annotation, task, label_config) for annotation, task in pairs]
        maybe_request_finetune(ctx.redis, ctx.settings, project)
        return f"{action}: " + ", ".join(outcomes)
    if action == "ANNOTATIONS_DELETED":
        ids = []
        for annotation in payload.get("annotations") or []:
            try:
                ids.append(as_id(annotation.get("id") if isinstance(annotation, Mapping) else None, "annotation id"))
            except InvalidAnnotation as error:
                store.record_rejected(action, f"an annotation was not deleted: {error}")
        return f"deleted {store.delete(project, ids)} of {len(ids)}"
    if action == "START_TRAINING":
        if label_config:
            store.set_label_config(project, label_config)
        for task in payload.get("tasks") or []:  # the older POST /train carries the annotated tasks
            for annotation in (task.get("annotations") or []) if isinstance(task, Mapping) else []:
                if isinstance(annotation, Mapping):
                    _upsert(store, action, project, annotation, task, label_config)
        job_id, queued = request_finetune(ctx.redis, ctx.settings, project, "start_training")
        return f"fine-tune {'queued' if queued else 'already queued or running'}: {job_id}"
    store.record_ignored(action)
    return f"ignored {action}"


def _upsert(store: CorrectionStore, action: str, project: int, annotation: Mapping, task: Mapping, config) -> str:
    """One annotation of an event; one that cannot be stored is recorded as rejected (shown by `status`) and the
    event's other annotations are still applied."""
    try:
        return store.upsert(project, annotation, task, config)
    except InvalidAnnotation as error:
        store.record_rejected(action, f"annotation {annotation.get('id')!r} not stored: {error}")
        logger.warning("webhook %s for project %s: annotation not stored: %s", action, project, error)
        return f"rejected:{error}"


def apply_events(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """Apply a batch of stored webhooks in the order they arrived (the server stores a burst as one job).

    An event that raises is queued again as its own `apply_event` job, with the events queue's retries, so that
    it does not hold back the others (it is then applied after them). If even that fails (Redis is gone), the
    whole batch fails and is retried: annotation upserts and deletions are idempotent, a START_TRAINING folds into
    the fine-tune it already queued, and only the counters of ignored and rejected events count twice.
    """
    from .queues import EVENTS, enqueue

    outcomes = []
    for payload in payloads:
        try:
            outcomes.append(apply_event(payload))
        except Exception:
            logger.exception("webhook %s could not be applied; retrying it on its own", payload.get("action"))
            job = enqueue(context().redis, EVENTS, "backend.jobs.apply_event", payload)
            outcomes.append(f"failed, retried as job {job.id}")
    return outcomes


def _annotation_task_pairs(payload: Mapping[str, Any]) -> list[tuple[Mapping, Mapping]]:
    """(annotation, task) pairs from a single or a bulk (lists under the same keys) annotation event."""
    annotations = payload.get("annotation")
    tasks = payload.get("task")
    if isinstance(annotations, Mapping):
        annotations = [annotations]
    if isinstance(tasks, Mapping):
        tasks = [tasks]
    tasks_by_id = {t.get("id"): t for t in tasks or [] if isinstance(t, Mapping)}
    return [(a, tasks_by_id.get(a.get("task"), {})) for a in annotations or [] if isinstance(a, Mapping)]


# ------------------------------------------------------------------------------------- predictions
def predict_chunk(
    project: int, tasks: Sequence[Mapping[str, Any]], label_config: str | None, run_id: str | None = None
) -> dict[str, int]:
    """Predict tasks and post the predictions to Label Studio under the current model version.

    Skips tasks that already have a prediction of that version in Label Studio, and tasks this run already
    posted (so a re-run after a crash, or a resumed `preannotate`, posts nothing twice), and posts nothing for
    tasks that fail: an empty prediction under the current version would make Label Studio skip the task for good.
    """
    ctx = context()
    service, api = ctx.service, ctx.label_studio
    progress = RunProgress(ctx.redis, run_id or f"handover-{uuid.uuid4().hex[:8]}")
    counts = {"done": 0, "skipped": 0, "failed": 0}
    try:
        spec = ProjectSpec.parse(label_config or api.label_config(project))
    except LabelConfigError as error:
        for task in tasks:
            progress.record("failed", int(task["id"]), f"the labeling config cannot be pre-annotated: {error}")
        logger.error("project %s: cannot pre-annotate: %s", project, error)
        return counts | {"failed": len(tasks)}
    version = service.current_version(project)
    settled = progress.settled([int(task["id"]) for task in tasks])  # by an earlier try of this job
    tasks = [task for task in tasks if int(task["id"]) not in settled]

    def post(task_id: int, prediction) -> None:
        api.create_prediction(project, task_id, prediction.result, prediction.score, prediction.model_version)
        progress.record("done", task_id)

    # Label Studio is asked about every task of the chunk at once, the model fetches each image while it works on
    # the one before, and each prediction is posted while it works on the next: the worker's core waits for
    # Label Studio as little as possible.
    with ThreadPoolExecutor(max_workers=LABEL_STUDIO_CALLS, thread_name_prefix="label-studio") as calls:
        to_predict = []
        has_version = calls.map(lambda task: version.name in api.prediction_versions(int(task["id"])), tasks)
        for task, predicted in zip(tasks, list(has_version), strict=True):
            if predicted:
                progress.record("skipped", int(task["id"]))
                counts["skipped"] += 1
            else:
                to_predict.append(task)
        posts = []

        def on_task(index: int, prediction) -> None:
            if prediction.error is not None:
                progress.record("failed", int(to_predict[index]["id"]), prediction.error)
                counts["failed"] += 1
            else:
                posts.append(calls.submit(post, int(to_predict[index]["id"]), prediction))

        service.predict(to_predict, spec, project, on_task=on_task)
        for posted in posts:
            posted.result()  # a post that failed fails the job, which is retried; posted tasks are skipped then
            counts["done"] += 1
    logger.info("project %s, run %s: %s", project, progress.run_id, counts)
    return counts


def finetune(project: int, reason: str) -> dict[str, Any]:
    from .finetune import run_finetune

    return run_finetune(context(), project, reason)


def nightly_finetunes() -> list[str]:
    """Queue a fine-tune for every project with corrections since its last one."""
    from .learning import request_finetune

    ctx = context()
    queued = []
    for project in ctx.store.projects():
        if ctx.store.changed_count(project) > 0:
            job_id, _ = request_finetune(ctx.redis, ctx.settings, project, "nightly")
            queued.append(job_id)
    return queued
