"""The nightly fine-tune: a cron expression (XDECODER_FINETUNE_CRON, croniter syntax) evaluated by a
thread in each training worker. Every worker computes the same firing times; a Redis key per firing
makes exactly one of them enqueue the job, so several workers never queue it twice."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from croniter import croniter
from redis import Redis

from .corrections import PREFIX
from .queues import TRAIN, enqueue
from .settings import Settings

logger = logging.getLogger(__name__)


class NightlySchedule:
    def __init__(self, redis: Redis, settings: Settings):
        if not croniter.is_valid(settings.finetune_cron):
            raise ValueError(f"XDECODER_FINETUNE_CRON is not a cron expression: {settings.finetune_cron!r}")
        self.redis = redis
        self.expression = settings.finetune_cron
        self._stopped = threading.Event()

    def next_firing(self, after: datetime) -> datetime:
        return croniter(self.expression, after).get_next(datetime)

    def fire(self, at: datetime) -> bool:
        """Enqueue the nightly job for the firing at `at`, unless another worker already did."""
        claim = f"{PREFIX}:cron:nightly:{at.isoformat()}"
        if not self.redis.set(claim, "1", nx=True, ex=7 * 86400):
            return False
        enqueue(self.redis, TRAIN, "backend.jobs.nightly_finetunes")
        logger.info("nightly fine-tunes queued (%s)", at.isoformat())
        return True

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="nightly-schedule", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            now = datetime.now(UTC)
            firing = self.next_firing(now)
            if self._stopped.wait(max(0.0, (firing - now).total_seconds())):
                return
            try:
                self.fire(firing)
            except Exception:  # a Redis hiccup must not end the schedule
                logger.exception("could not queue the nightly fine-tunes")
