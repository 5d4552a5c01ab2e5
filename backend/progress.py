"""Progress of a pre-annotation run, shared in Redis between the workers that do it and the command
that shows it; and the set of tasks already predicted per model version (what makes re-runs resume)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis import Redis

from .corrections import PREFIX

RUN_TTL = 30 * 86400


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

    def start(self, total: int, project: int, version: str) -> None:
        self.redis.hset(
            self.key,
            mapping={"total": total, "done": 0, "failed": 0, "skipped": 0, "started_at": time.time(),
                     "project": project, "version": version},
        )  # fmt: skip
        self.redis.expire(self.key, RUN_TTL)

    def add(self, done: int = 0, failed: int = 0, skipped: int = 0) -> None:
        with self.redis.pipeline() as pipe:
            for name, value in (("done", done), ("failed", failed), ("skipped", skipped)):
                if value:
                    pipe.hincrby(self.key, name, value)
            pipe.expire(self.key, RUN_TTL)
            pipe.execute()

    def snapshot(self) -> ProgressSnapshot:
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        return ProgressSnapshot(
            int(raw.get("total", 0)),
            int(raw.get("done", 0)),
            int(raw.get("failed", 0)),
            int(raw.get("skipped", 0)),
            float(raw.get("started_at", time.time())),
        )

    def _predicted_key(self, project: int, version: str) -> str:
        return f"{PREFIX}:predicted:{project}:{version}"

    def already_predicted(self, project: int, version: str, task_id: int) -> bool:
        return bool(self.redis.sismember(self._predicted_key(project, version), task_id))

    def mark_predicted(self, project: int, version: str, task_id: int) -> None:
        self.redis.sadd(self._predicted_key(project, version), task_id)
