"""`xdecoder-ls worker`: an RQ worker that loads the model once and keeps it for every job.

RQ's default worker forks a child per job, which would reload the weights each time (and CUDA does
not survive fork), so jobs run in the worker's own process (RQ's SimpleWorker). A job that outlives
its queue's timeout is interrupted. While a job runs, a thread renews its heartbeat every
XDECODER_WORKER_HEARTBEAT seconds; when a worker dies (even by SIGKILL) the heartbeat stops, and the
next maintenance pass of any worker puts the job back on its queue (it counts as a retry). Run one
worker per GPU with --device to share a multi-GPU machine.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import uuid

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.worker import WorkerStatus

from .distributed import die_with_parent, training_devices
from .jobs import WorkerContext, set_context
from .labelstudio import NotConfigured
from .queues import PREDICT, QUEUE_NAMES, TRAIN, connect, queue
from .schedule import NightlySchedule
from .settings import Settings

logger = logging.getLogger(__name__)


class ModelWorker(SimpleWorker):
    """Runs each job in this process, where the model is already loaded, with a live heartbeat."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # Renewed every job_monitoring_interval by the heartbeat thread: one missed beat of grace.
        interval = self.job_monitoring_interval
        remaining = job.timeout - working_time if job.timeout and job.timeout > 0 else interval
        return int(max(1, min(remaining, interval))) + interval

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # a missed beat only shortens the grace period
                    logger.warning("heartbeat for job %s failed", job.id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


def run_worker(settings: Settings, queues: list[str], burst: bool = False, name: str | None = None) -> bool:
    """Work until stopped (or, with burst, until the queues are empty). Returns True if jobs ran."""
    unknown = sorted(set(queues) - set(QUEUE_NAMES))
    if not queues:
        raise ValueError(f"no queue to listen on; choose from {list(QUEUE_NAMES)}")
    if unknown:
        raise ValueError(f"unknown queues {unknown}; choose from {list(QUEUE_NAMES)}")
    training_devices(settings.train_devices)  # a mistaken list fails here, not in the first fine-tune
    if sys.platform == "linux":
        worker_pid = os.getpid()
        os.register_at_fork(after_in_child=lambda: die_with_parent(worker_pid))
    redis = connect(settings)
    context = WorkerContext(settings, redis)
    set_context(context)
    if PREDICT in queues or TRAIN in queues:
        context.load_model()  # now, once, rather than in the first job
    if PREDICT in queues:
        try:
            context.connect_label_studio()  # the client and its import (about a second) before the first job too
        except NotConfigured as error:
            logger.warning("predict jobs will fail until Label Studio is configured: %s", error)
    if TRAIN in queues and not burst:
        NightlySchedule(redis, settings).start()
    worker = ModelWorker(
        [queue(redis, q) for q in queues],
        connection=redis,
        name=name or f"xdecoder-{socket.gethostname()}-{uuid.uuid4().hex[:6]}",
        job_monitoring_interval=settings.worker_heartbeat_s,
        maintenance_interval=settings.worker_maintenance_s,
        # An idle worker waits this long for a job before it looks again (and runs maintenance).
        worker_ttl=settings.worker_maintenance_s + 15,
    )
    logger.info("worker %s listening on %s", worker.name, ", ".join(queues))
    return worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
