"""Prometheus metrics for /metrics: requests, predictions, webhooks, and the queues' state."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

from .queues import QUEUE_NAMES

ROUTES = {"/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions", "/metrics"}

REGISTRY = CollectorRegistry()
REQUESTS = Counter("xdls_requests", "HTTP requests", ["route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "xdls_request_seconds",
    "HTTP request duration",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
    registry=REGISTRY,
)
PREDICTIONS = Counter("xdls_task_predictions", "Task predictions by outcome", ["outcome"], registry=REGISTRY)
WEBHOOKS = Counter("xdls_webhooks", "Webhook events stored", ["action"], registry=REGISTRY)
QUEUED = Gauge("xdls_queue_jobs", "Jobs waiting", ["queue"], registry=REGISTRY)
RUNNING = Gauge("xdls_queue_running", "Jobs running", ["queue"], registry=REGISTRY)
FAILED = Gauge("xdls_queue_failed", "Jobs failed and kept", ["queue"], registry=REGISTRY)


def observe_request(path: str, status: int, seconds: float) -> None:
    route = path if path in ROUTES else "other"
    REQUESTS.labels(route=route, status=str(status)).inc()
    LATENCY.labels(route=route).observe(seconds)


def observe_predictions(predictions) -> None:
    for prediction in predictions:
        outcome = prediction.model_version.rsplit("/", 1)[1] if "/" in prediction.model_version else "ok"
        PREDICTIONS.labels(outcome=outcome).inc()


def render(redis: Redis) -> tuple[bytes, str]:
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=redis)
        QUEUED.labels(queue=name).set(queue.count)
        RUNNING.labels(queue=name).set(StartedJobRegistry(queue=queue).count)
        FAILED.labels(queue=name).set(FailedJobRegistry(queue=queue).count)
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
