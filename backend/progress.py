"""Progress of a pre-annotation run, shared in Redis between the workers that do it and the command that
shows it.

Outcomes are kept per task id (sets under `xdls:run:<id>:`), not as counters: a chunk that RQ runs again
(its worker was killed, a post failed) neither counts a task twice nor asks Label Studio again about a task
this run already posted, and a task that failed and then succeeded on the retry counts as done only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis import Redis

from .corrections import PREFIX

RUN_TTL = 30 * 86400
OUTCOMES = ("done", "failed", "skipped")


@dataclass
class ProgressSnapshot:
    total: int
    done: int
    failed: int
    skipped: int
    started_at: float

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped


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
            pipe.execute()

    def record(self, outcome: str, task_id: int) -> None:
        """A task's outcome in this run; done overrides an earlier failure."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; choose from {OUTCOMES}")
        with self.redis.pipeline() as pipe:
            pipe.sadd(self._set(outcome), task_id)
            if outcome != "failed":
                pipe.srem(self._set("failed"), task_id)
            pipe.expire(self._set(outcome), RUN_TTL)
            pipe.execute()

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
        )
