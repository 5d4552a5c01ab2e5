"""When to fine-tune (the job itself is in finetune.py).

Triggers: N new corrections in a project since its last fine-tune (XDECODER_FINETUNE_EVERY, default
50), Label Studio's "Start Training" (START_TRAINING webhook or POST /train), and a nightly schedule
(XDECODER_FINETUNE_CRON, default "0 2 * * *"). At most one fine-tune per project is queued or running
at a time: a trigger that finds one folds into it.
"""

from __future__ import annotations

import logging
import time
import uuid

from redis import Redis
from redis.exceptions import WatchError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from .corrections import PREFIX, CorrectionStore
from .queues import LIVE_JOB_STATES, POLICIES, TRAIN, enqueue
from .settings import Settings

logger = logging.getLogger(__name__)

ENQUEUE_GRACE_S = 60  # a claim younger than this counts as live even before its job exists


# --------------------------------------------------------------------------------------- triggers
def _claim_key(project: int) -> str:
    return f"{PREFIX}:project:{project}:finetune_job"


def request_finetune(redis: Redis, settings: Settings, project: int, reason: str) -> tuple[str, bool]:
    """Queue a fine-tune unless one is queued or running for the project. Returns (job id, queued now)."""
    key = _claim_key(project)
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                current = pipe.get(key)
                if current is not None and _claim_is_live(redis, current.decode()):
                    pipe.unwatch()
                    redis.hincrby(f"{PREFIX}:project:{project}:meta", "finetune_folded_triggers", 1)
                    logger.info("project %s: fine-tune trigger (%s) folded into %s", project, reason, current.decode())
                    return current.decode().split("|")[0], False
                job_id = f"finetune-p{project}-{uuid.uuid4().hex[:8]}"
                pipe.multi()
                pipe.set(key, f"{job_id}|{time.time()}", ex=POLICIES[TRAIN].job_timeout * 4)
                pipe.execute()
                break
            except WatchError:
                continue
    enqueue(redis, TRAIN, "backend.jobs.finetune", project, reason, job_id=job_id)
    logger.info("project %s: fine-tune queued (%s), job %s", project, reason, job_id)
    return job_id, True


def _claim_is_live(redis: Redis, claim: str) -> bool:
    job_id, _, claimed_at = claim.partition("|")
    try:
        return Job.fetch(job_id, connection=redis).get_status() in LIVE_JOB_STATES
    except NoSuchJobError:
        return time.time() - float(claimed_at or 0) < ENQUEUE_GRACE_S


def maybe_request_finetune(redis: Redis, settings: Settings, project: int) -> str | None:
    """The N-corrections trigger."""
    if CorrectionStore(redis).changed_count(project) >= settings.finetune_every:
        job_id, _ = request_finetune(redis, settings, project, "corrections")
        return job_id
    return None


def release_claim(redis: Redis, project: int) -> None:
    """Called when a fine-tune ends, so the next trigger queues a new one."""
    redis.delete(_claim_key(project))
