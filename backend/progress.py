"""Progress of a pre-annotation run, shared in Redis between the workers that do it and the command that
shows it.

Outcomes are kept per task id (sets under `xdls:run:<id>:`), not as counters: a chunk that RQ runs again
(its worker was killed, a post failed) neither counts a task twice nor asks Label Studio again about a task
this run already posted, and a task that failed and then succeeded on the retry counts as done only. A failed
task keeps the reason it failed (`xdls:run:<id>:reasons`), which `preannotate` and `status` print; runs are
listed newest first in `xdls:runs` so that `status` can show the latest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis import Redis

from .corrections import PREFIX

RUN_TTL = 30 * 86400
OUTCOMES = ("done", "failed", "skipped")
RUNS_KEY = f"{PREFIX}:runs"
# What the reason codes a failed task records mean (ImageFetchError's reasons and the prediction path's own).
REASONS = {
    "no_image": "the task has no image URL in the fields the labeling config reads",
    "unsupported_url": "the image URL is of a kind the backend cannot fetch",
    "not_configured": "the image is in Label Studio, but LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is not set",
    "no_task_id": "the task has no id to fetch its image with",
    "forbidden_address": "the image's host is private or loopback (see XDECODER_ALLOWED_HOSTS)",
    "forbidden_path": "the image path is outside LOCAL_FILES_DOCUMENT_ROOT",
    "unauthorized": "the image's server refused the credentials (check LABEL_STUDIO_API_KEY)",
    "not_found": "the image was not found (HTTP 404 or 410)",
    "http_error": "the image's server answered with an error",
    "too_many_redirects": "the image URL redirects too many times",
    "connection_error": "the image's server could not be reached",
    "timeout": "the image took longer than XDECODER_IMAGE_TIMEOUT to download",
    "too_large": "the image file is larger than XDECODER_IMAGE_MAX_BYTES",
    "too_many_pixels": "the image has more pixels than XDECODER_IMAGE_MAX_PIXELS",
    "not_an_image": "the file is not an image format browsers show",
    "unreadable": "the image file could not be decoded",
    "internal_error": "an error in the backend (the worker log has the traceback)",
}


@dataclass
class ProgressSnapshot:
    total: int
    done: int
    failed: int
    skipped: int
    started_at: float
    project: int | None = None
    version: str = ""

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped


def explain(reason: str) -> str:
    """`reason` with what it means, when it is one of the known codes."""
    return f"{reason}: {REASONS[reason]}" if reason in REASONS else reason


class RunProgress:
    def __init__(self, redis: Redis, run_id: str):
        self.redis = redis
        self.run_id = run_id
        self.key = f"{PREFIX}:run:{run_id}"

    def _set(self, outcome: str) -> str:
        return f"{self.key}:{outcome}"

    def start(self, total: int, project: int, version: str, skipped_when_listed: int = 0) -> None:
        """`skipped_when_listed`: tasks the listing already left out (they have a prediction of `version`)."""
        with self.redis.pipeline() as pipe:
            pipe.hset(
                self.key,
                mapping={"total": total, "skipped_when_listed": skipped_when_listed, "started_at": time.time(),
                         "project": project, "version": version},
            )  # fmt: skip
            pipe.expire(self.key, RUN_TTL)
            pipe.zadd(RUNS_KEY, {self.run_id: time.time()})
            pipe.zremrangebyscore(RUNS_KEY, "-inf", time.time() - RUN_TTL)  # runs whose records have expired
            pipe.execute()

    def record(self, outcome: str, task_id: int, reason: str = "") -> None:
        """A task's outcome in this run (`reason`: why it failed); done overrides an earlier failure."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; choose from {OUTCOMES}")
        with self.redis.pipeline() as pipe:
            pipe.sadd(self._set(outcome), task_id)
            if outcome == "failed":
                pipe.hset(self._set("reasons"), task_id, reason or "unknown")
                pipe.expire(self._set("reasons"), RUN_TTL)
            else:
                pipe.srem(self._set("failed"), task_id)
                pipe.hdel(self._set("reasons"), task_id)
            pipe.expire(self._set(outcome), RUN_TTL)
            pipe.execute()

    def failures(self) -> dict[int, str]:
        """The tasks that failed in this run (and did not succeed on a retry), by id, with why."""
        with self.redis.pipeline() as pipe:
            pipe.sdiff([self._set("failed"), self._set("done"), self._set("skipped")])
            pipe.hgetall(self._set("reasons"))
            failed, reasons = pipe.execute()
        reasons = {int(task): reason.decode() for task, reason in reasons.items()}
        return {task: reasons.get(task, "unknown") for task in sorted(int(t) for t in failed)}

    def settled(self, task_ids: list[int]) -> set[int]:
        """Those of `task_ids` this run already posted or found predicted (a failed one is tried again)."""
        if not task_ids:
            return set()
        with self.redis.pipeline() as pipe:
            for outcome in ("done", "skipped"):
                pipe.smismember(self._set(outcome), task_ids)
            done, skipped = pipe.execute()
        return {task for task, a, b in zip(task_ids, done, skipped, strict=True) if a or b}

    def snapshot(self) -> ProgressSnapshot:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(self.key)
            pipe.scard(self._set("done"))
            pipe.sdiff([self._set("failed"), self._set("done"), self._set("skipped")])
            pipe.scard(self._set("skipped"))
            raw, done, failed, skipped = pipe.execute()
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return ProgressSnapshot(
            int(fields.get("total", 0)),
            done,
            len(failed),
            int(fields.get("skipped_when_listed", 0)) + skipped,
            float(fields.get("started_at", time.time())),
            int(fields["project"]) if "project" in fields else None,
            fields.get("version", ""),
        )


def recent_runs(redis: Redis, count: int = 5) -> list[dict]:
    """The latest `count` pre-annotation runs, newest first, each with its counts and its failed tasks with why."""
    runs = []
    for run_id in redis.zrevrange(RUNS_KEY, 0, count - 1):
        progress = RunProgress(redis, run_id.decode())
        snapshot = progress.snapshot()
        runs.append(
            {
                "run": progress.run_id,
                "project": snapshot.project,
                "version": snapshot.version,
                "total": snapshot.total,
                "done": snapshot.done,
                "failed": snapshot.failed,
                "skipped": snapshot.skipped,
                "started_at": snapshot.started_at,
                "failed_tasks": {str(task): reason for task, reason in progress.failures().items()},
            }
        )
    return runs
