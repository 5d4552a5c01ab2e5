"""What the workers run. Each function is enqueued by its dotted path (e.g. "backend.jobs.apply_event")
by the server or the CLI, and runs inside `xdecoder-ls worker`, which keeps one `WorkerContext` (and
so one loaded model) for all its jobs.

Jobs are safe to run twice: RQ re-runs a job whose worker died mid-way, and Label Studio re-sends
webhooks. Events are upserts keyed by annotation id; predictions are skipped for tasks that already
have one of the current model version.

/webhook has no authentication (Label Studio's own ML webhook sends none), so an event is a claim, not a fact:
every annotation it names is read back from Label Studio's API with the backend's key, and what is stored is Label
Studio's copy (annotation, task data, label config), never the webhook's. An annotation Label Studio does not have,
or has in another project or task, is excluded with the reason (`xdecoder-ls status`); a deletion is applied only
when Label Studio no longer has the annotation. While Label Studio cannot be asked (unreachable, key refused, not
configured) the event waits in the store, out of training, and a recheck job asks again every RECHECK_S seconds.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis import Redis

from .corrections import PREFIX, CorrectionStore, InvalidAnnotation, as_id, meta_key
from .inference import ModelService
from .label_config import LabelConfigError, ProjectSpec
from .labelstudio import LabelStudioAPI, LabelStudioError, NotConfigured, NotInLabelStudio
from .progress import RunProgress
from .settings import Settings, get_settings
from .versions import VersionRegistry, project_id

logger = logging.getLogger(__name__)

# Label Studio API calls a pre-annotation job has in flight at once (checks for earlier predictions, posts).
LABEL_STUDIO_CALLS = 4
RECHECK_S = 60  # how often events that could not be checked with Label Studio are checked again


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
            from .learning import served_version_changed

            self._service = ModelService(self.settings)
            self._service.registry.on_served_change = lambda project, version: served_version_changed(
                self.settings, project, version, self.redis
            )  # a fine-tune that is served tells Label Studio
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
        check = LabelStudioCheck(ctx, project)
        outcomes = [check.annotation_event(action, annotation, task) for annotation, task in pairs]
        maybe_request_finetune(ctx.redis, ctx.settings, project)
        return f"{action}: " + ", ".join(outcomes)
    if action == "ANNOTATIONS_DELETED":
        ids = []
        for annotation in payload.get("annotations") or []:
            try:
                ids.append(as_id(annotation.get("id") if isinstance(annotation, Mapping) else None, "annotation id"))
            except InvalidAnnotation as error:
                store.record_rejected(action, f"an annotation was not deleted: {error}")
        check = LabelStudioCheck(ctx, project)
        outcomes = [check.deletion(annotation_id) for annotation_id in ids]
        return f"deleted {outcomes.count('deleted')} of {len(ids)}" + "".join(
            f", {annotation_id} {outcome}" for annotation_id, outcome in zip(ids, outcomes, strict=True)
            if outcome != "deleted"
        )  # fmt: skip
    if action == "START_TRAINING":
        if label_config:
            store.set_label_config(project, label_config)
        check = LabelStudioCheck(ctx, project)
        for task in payload.get("tasks") or []:  # the older POST /train carries the annotated tasks
            for annotation in (task.get("annotations") or []) if isinstance(task, Mapping) else []:
                if isinstance(annotation, Mapping):
                    check.annotation_event(action, annotation, task)
        job_id, queued = request_finetune(ctx.redis, ctx.settings, project, "start_training")
        return f"fine-tune {'queued' if queued else 'already queued or running'}: {job_id}"
    store.record_ignored(action)
    return f"ignored {action}"


class LabelStudioCheck:
    """What one event claims about a project's annotations, checked against Label Studio's API before anything is
    stored (see the module's docstring)."""

    def __init__(self, ctx: WorkerContext, project: int):
        self.ctx, self.project, self.store = ctx, project, ctx.store
        self._label_config: str | None = None

    def annotation_event(self, action: str, annotation: Mapping, task: Mapping) -> str:
        """One annotation of a created/updated event; one without usable ids is recorded as rejected (shown by
        `status`) and the event's other annotations are still applied."""
        try:
            annotation_id = as_id(annotation.get("id"), "annotation id")
            claimed_task = as_id(task.get("id") or annotation.get("task"), "task id")
        except InvalidAnnotation as error:
            self.store.record_rejected(action, f"annotation {annotation.get('id')!r} not stored: {error}")
            logger.warning("webhook %s for project %s: annotation not stored: %s", action, self.project, error)
            return f"rejected:{error}"
        return self.annotation(annotation_id, claimed_task)

    def annotation(self, annotation_id: int, claimed_task: int) -> str:
        """Store Label Studio's copy of the annotation; returns the store's outcome, "unchecked" (waits for a
        recheck) or "refused" (excluded, with the reason)."""
        project = self.project
        try:
            api = self.ctx.label_studio
            found = api.annotation(annotation_id)
            task = api.task(found["task"])
            label_config = self.label_config(api)
        except NotInLabelStudio as error:
            return self._refuse(annotation_id, f"not confirmed by Label Studio: {error}")
        except (LabelStudioError, NotConfigured) as error:
            return self._wait(annotation_id, "annotation", claimed_task, error)
        owner = found["project"] if found["project"] is not None else task["project"]
        if owner != project:
            return self._refuse(annotation_id, f"Label Studio has annotation {annotation_id} in project {owner}")
        if found["task"] != claimed_task:
            return self._refuse(
                annotation_id,
                f"Label Studio has annotation {annotation_id} on task {found['task']}, not {claimed_task}",
            )
        self.store.settle(project, annotation_id)
        return self.store.upsert(project, found, task, label_config)

    def deletion(self, annotation_id: int) -> str:
        """Apply a deletion only once Label Studio no longer has the annotation: "deleted", "unchecked" (waits) or
        "still in Label Studio" (rejected, listed by status)."""
        try:
            self.ctx.label_studio.annotation(annotation_id)
        except NotInLabelStudio:
            if self.store.known(self.project, annotation_id):
                self.store.delete(self.project, [annotation_id])
            # else: never stored here (nor any event for it), and a deletion must not block a future id
            return "deleted"
        except (LabelStudioError, NotConfigured) as error:
            return self._wait(annotation_id, "deletion", None, error)
        self.store.settle(self.project, annotation_id)
        self.store.record_rejected(
            "ANNOTATIONS_DELETED", f"annotation {annotation_id} still exists in Label Studio: its deletion was ignored"
        )
        return "still in Label Studio"

    def label_config(self, api: LabelStudioAPI) -> str:
        if self._label_config is None:
            self._label_config = api.label_config(self.project)
        return self._label_config

    def _refuse(self, annotation_id: int, reason: str) -> str:
        logger.warning("project %s: annotation %s kept out of training: %s", self.project, annotation_id, reason)
        self.store.refuse(self.project, annotation_id, reason)
        return "refused"

    def _wait(self, annotation_id: int, kind: str, task_id: int | None, error: Exception) -> str:
        logger.warning("project %s: annotation %s not checked yet: %s", self.project, annotation_id, error)
        self.store.park(self.project, annotation_id, kind, task_id, str(error))
        schedule_recheck(self.ctx.redis, self.project)
        return "unchecked"


def schedule_recheck(redis: Redis, project: int) -> None:
    """Queue one recheck of the project's unchecked events in RECHECK_S, unless one is queued already."""
    from .queues import EVENTS, POLICIES, queue

    if redis.set(f"{PREFIX}:project:{project}:recheck", 1, nx=True, ex=2 * RECHECK_S):
        policy = POLICIES[EVENTS]
        queue(redis, EVENTS).enqueue_in(
            timedelta(seconds=RECHECK_S), "backend.jobs.recheck_unchecked", project,
            job_timeout=policy.job_timeout, failure_ttl=policy.failure_ttl,
        )  # fmt: skip


def recheck_unchecked(project: int) -> dict[str, int]:
    """Ask Label Studio again about the events of `project` that could not be checked; those still unanswered wait
    for the next recheck (queued again). Returns how many of each outcome."""
    from .learning import maybe_request_finetune

    ctx = context()
    ctx.redis.delete(f"{PREFIX}:project:{project}:recheck")  # so that one still waiting queues the next recheck
    check = LabelStudioCheck(ctx, project)
    counts: dict[str, int] = {}
    for annotation_id, waiting in ctx.store.unchecked(project).items():
        if waiting["kind"] == "deletion":
            outcome = check.deletion(annotation_id)
        else:
            outcome = check.annotation(annotation_id, waiting["task"])
        counts[outcome] = counts.get(outcome, 0) + 1
    maybe_request_finetune(ctx.redis, ctx.settings, project)
    return counts


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


def sync_label_studio(project: int, repredict: bool = False) -> dict[str, Any]:
    """Make Label Studio show the version `project` serves now (ML backend title and project model version, see
    LabelStudioAPI.show_model_version), then, with `repredict`, queue the prediction of the project's unannotated
    tasks with it (a pre-annotation run, resumable: tasks that have a prediction of that version are skipped). An
    unreachable Label Studio fails the job, which RQ retries; the served version is not touched."""
    from . import preannotate
    from .learning import LABEL_STUDIO_SYNC

    ctx = context()
    registry = VersionRegistry(ctx.settings.model_dir, ctx.settings.checkpoint)
    version = registry.current(project).name  # now, not when the job was queued: a later change may have come
    ours = {v.name for v in registry.all()}
    meta = meta_key(project)
    ctx.redis.sadd(f"{PREFIX}:projects", project)  # listed by `status`, with the sync's error if it fails
    try:
        api = ctx.label_studio
        changed = api.show_model_version(project, version, ours, ctx.settings)
    except (LabelStudioError, NotConfigured) as error:
        ctx.redis.hset(meta, "label_studio_sync_error", f"{version}: {error}")
        raise
    ctx.redis.hset(meta, mapping={LABEL_STUDIO_SYNC: version, "label_studio_sync_error": ""})
    summary: dict[str, Any] = {"version": version, "changed": changed}
    if repredict:
        run = preannotate.start(ctx.settings, ctx.redis, project, api=api, unannotated_only=True)
        ctx.redis.hset(meta, mapping={"repredict_run": run.run_id, "repredict_version": version})
        summary |= {"repredict_run": run.run_id, "tasks": run.total, "jobs": len(run.job_ids)}
    logger.info("project %s: Label Studio shows %s (%s)", project, version, summary)
    return summary


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
