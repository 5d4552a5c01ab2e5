"""When to fine-tune (the job itself is in finetune.py).

Triggers: N new corrections in a project since its last fine-tune (XDECODER_FINETUNE_EVERY, default
50), Label Studio's "Start Training" (START_TRAINING webhook or POST /train), and a nightly schedule
(XDECODER_FINETUNE_CRON, default "0 2 * * *"). At most one fine-tune per project is queued or running
at a time: a trigger that finds one folds into it. A fine-tune that failed keeps the project's claim while
RQ waits to retry it (the retry is the fine-tune the next triggers fold into). A trigger other than the
N-corrections one that folds into a fine-tune already running (a Start Training pressed during it) is
remembered: when that fine-tune ends, a new one is queued if corrections arrived meanwhile, as the
N-trigger does when N of them did.
"""

from __future__ import annotations

import logging
import time
import uuid

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from .corrections import PREFIX, CorrectionStore, meta_key
from .queues import LIVE_JOB_STATES, TRAIN, enqueue
from .settings import Settings

logger = logging.getLogger(__name__)

ENQUEUE_GRACE_S = 60  # a claim younger than this counts as live even before its job exists
RERUN_REQUEST = "finetune_rerun_requested"  # meta field: the reason of a trigger that folded into a running job


# --------------------------------------------------------------------------------------- triggers
def _claim_key(project: int) -> str:
    return f"{PREFIX}:project:{project}:finetune_job"


def request_finetune(redis: Redis, settings: Settings, project: int, reason: str) -> tuple[str, bool]:
    """Queue a fine-tune unless one is queued or running for the project. Returns (job id, queued now)."""
    key, meta = _claim_key(project), meta_key(project)

    def fold_or_claim(pipe) -> tuple[str, bool]:  # a claim released meanwhile makes this run again
        current = pipe.get(key)
        status = _claimed_job_status(redis, current.decode()) if current is not None else None
        pipe.multi()
        if status in LIVE_JOB_STATES:
            pipe.hincrby(meta, "finetune_folded_triggers", 1)
            if status == JobStatus.STARTED and reason != "corrections":
                pipe.hset(meta, RERUN_REQUEST, reason)
            return current.decode().split("|")[0], False
        job_id = f"finetune-p{project}-{uuid.uuid4().hex[:8]}"
        # No expiry: whether the claim holds is its job's status (a failed one's retries can take hours).
        pipe.set(key, f"{job_id}|{time.time()}")
        return job_id, True

    job_id, claimed = redis.transaction(fold_or_claim, key, value_from_callable=True)
    if not claimed:
        logger.info("project %s: fine-tune trigger (%s) folded into %s", project, reason, job_id)
        return job_id, False
    enqueue(redis, TRAIN, "backend.jobs.finetune", project, reason, job_id=job_id)
    logger.info("project %s: fine-tune queued (%s), job %s", project, reason, job_id)
    return job_id, True


def _claimed_job_status(redis: Redis, claim: str) -> JobStatus | None:
    """The status of the claim's job; a claim younger than ENQUEUE_GRACE_S whose job does not exist yet counts as
    queued."""
    job_id, _, claimed_at = claim.partition("|")
    try:
        return Job.fetch(job_id, connection=redis).get_status()
    except NoSuchJobError:
        return JobStatus.QUEUED if time.time() - float(claimed_at or 0) < ENQUEUE_GRACE_S else None


def finetune_job_status(redis: Redis, project: int) -> JobStatus | None:
    """The status of the project's queued or running fine-tune, if it has one."""
    claim = redis.get(_claim_key(project))
    return _claimed_job_status(redis, claim.decode()) if claim is not None else None


def maybe_request_finetune(redis: Redis, settings: Settings, project: int) -> str | None:
    """The N-corrections trigger."""
    if CorrectionStore(redis).changed_count(project) >= settings.finetune_every:
        job_id, _ = request_finetune(redis, settings, project, "corrections")
        return job_id
    return None


def forget_rerun_request(redis: Redis, project: int) -> None:
    """Called as a fine-tune starts: it takes every correction stored so far, so earlier requests are met."""
    redis.hdel(meta_key(project), RERUN_REQUEST)


def release_claim(redis: Redis, settings: Settings, project: int, job_id: str | None, succeeded: bool) -> str | None:
    """Called when fine-tune `job_id` has ended for good (succeeded, or failed with no retry left), so the next
    trigger queues a new one. Queues that one at once if a trigger folded into the fine-tune while it ran and
    corrections arrived meanwhile, or, after a success, if N corrections did. Returns the new job's id, if any.
    (A fine-tune that failed with a retry to come keeps its claim.) `job_id` None: not run by RQ."""
    key = _claim_key(project)

    def release_and_take_request(pipe) -> None:
        current = pipe.get(key)
        pipe.multi()
        if current is not None and (job_id is None or current.decode().split("|")[0] == job_id):
            pipe.delete(key)  # only its own claim: another fine-tune's must hold
        pipe.hget(meta_key(project), RERUN_REQUEST)
        pipe.hdel(meta_key(project), RERUN_REQUEST)

    requested = redis.transaction(release_and_take_request, key)[-2]
    if requested is not None and CorrectionStore(redis).changed_count(project) > 0:
        new_job, _ = request_finetune(redis, settings, project, f"{requested.decode()} (during the last fine-tune)")
        return new_job
    # After a failure, N corrections waiting would only queue the same failure again: the next event decides.
    return maybe_request_finetune(redis, settings, project) if succeeded else None


# ------------------------------------------------------------------- Label Studio follows what we serve
LABEL_STUDIO_SYNC = "label_studio_sync"  # meta field: the version Label Studio was last set to show
SYNC_AFTER_SETUP_S = 5  # Label Studio sets the project's model version to the backend's title after /setup answers
SYNC_CLAIM_S = 120  # a /setup within this long of the last one it queued a sync for queues none


def _sync_job(redis: Redis, project: int, repredict: bool, delay_s: float = 0):
    from datetime import timedelta

    from .queues import EVENTS, POLICIES, queue

    policy = POLICIES[EVENTS]
    options = {"job_timeout": policy.job_timeout, "retry": policy.retry, "failure_ttl": policy.failure_ttl}
    events = queue(redis, EVENTS)
    if delay_s:
        return events.enqueue_in(timedelta(seconds=delay_s), "backend.jobs.sync_label_studio", project, repredict,
                                 **options)  # fmt: skip
    return events.enqueue("backend.jobs.sync_label_studio", project, repredict, **options)


def served_version_changed(settings: Settings, project: int, version: str, redis: Redis | None = None) -> None:
    """Called (by VersionRegistry) when `project` serves `version` from now on, by a promotion or a rollback: Label
    Studio is told to show that version, and the project's unannotated tasks are predicted again with it
    (XDECODER_REPREDICT_AFTER_PROMOTION), by a job of the events queue that retries while Label Studio is
    unreachable. `redis` None: connect to the settings' one. Never raises: the change of version stands whatever
    happens here (the next /setup asks again)."""
    if not settings.label_studio_url or settings.label_studio_api_key is None:
        logger.warning("project %s now serves %s; Label Studio is not configured, so it was not told", project, version)
        return
    try:
        from .queues import connect

        job = _sync_job(redis or connect(settings), project, settings.repredict_after_promotion)
    except Exception:
        logger.exception("project %s now serves %s, but telling Label Studio could not be queued", project, version)
        return
    logger.info("project %s now serves %s; Label Studio sync queued (job %s)", project, version, job.id)


def request_label_studio_sync(redis: Redis, settings: Settings, project: int, version: str) -> bool:
    """From /setup: queue a sync (shortly after, see SYNC_AFTER_SETUP_S) unless Label Studio already shows `version`
    for the project or one was queued recently. Returns whether one was queued."""
    if not settings.label_studio_url or settings.label_studio_api_key is None:
        return False
    synced = redis.hget(meta_key(project), LABEL_STUDIO_SYNC)
    if synced is not None and synced.decode() == version:
        return False
    if not redis.set(f"{PREFIX}:project:{project}:sync_claim", version, nx=True, ex=SYNC_CLAIM_S):
        return False
    _sync_job(redis, project, repredict=False, delay_s=SYNC_AFTER_SETUP_S)
    return True
