"""The HTTP contract Label Studio 1.23 speaks to an ML backend.

    GET  /health, /        liveness (Label Studio waits 1 s)
    POST /setup            the project's model version (3 s; called before every batch prediction)
    POST /predict          one result per task, in order (100 s for the whole selection)
    POST /webhook          annotation events, stored in Redis before we answer (1 s, inside the save;
                           in front of the FastAPI app, see backend/webhooks.py)
    POST /train            Label Studio's older training call, handled like START_TRAINING
    GET  /versions         model versions
    GET  /metrics          Prometheus metrics

No model math here: predictions come from `ModelService`, events go to the `events` queue. The
model is loaded once, when the app starts; /setup and /health never wait for a prediction.
"""

from __future__ import annotations

import gc
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from redis import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .inference import ModelService
from .label_config import LabelConfigError, ProjectSpec
from .learning import request_label_studio_sync
from .preannotate import QueuedTasks, enqueue_chunks
from .queues import connect, embedded_redis
from .schemas import PredictRequest, SetupRequest, TrainRequest
from .settings import Settings, get_settings
from .versions import project_id
from .webhooks import WebhookInbox, WebhookRoute

logger = logging.getLogger(__name__)

basic_auth = HTTPBasic(auto_error=False)


class RequestMetrics:
    """Counts and times every HTTP request for /metrics. Plain ASGI: Starlette's `BaseHTTPMiddleware` costs
    more than a webhook's whole handling under load."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            metrics.observe_request(scope["path"], status_code, time.perf_counter() - started)


_frozen = False


def _freeze_what_is_loaded() -> None:
    """Keep everything loaded at start (torch, the model, the libraries), which lives as long as the process, out of
    the garbage collector's full passes. A full pass over it takes 0.2-0.3 s here (340,000 objects), and one can fall
    in the middle of a burst of webhooks or a health check. Once per process, after collecting what is already
    garbage."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True


def create_app(
    settings: Settings | None = None,
    service: ModelService | None = None,
    redis: Redis | None = None,
) -> ASGIApp:
    """The ASGI app: request metrics, then the /webhook route, then the FastAPI app. `service` and `redis` default
    to ones built from `settings` at startup."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = service or await run_in_threadpool(ModelService, settings)
        app.state.redis = redis or connect(settings)
        embedded = embedded_redis(settings) if redis is None else None
        app.state.webhooks = WebhookInbox(app.state.redis, restart_redis=embedded and embedded.ensure_running)
        _freeze_what_is_loaded()
        yield
        if service is None:
            app.state.service.close()

    app = FastAPI(title="xdecoder-ls", summary="X-Decoder ML backend for Label Studio", lifespan=lifespan)

    def require_auth(credentials: Annotated[HTTPBasicCredentials | None, Depends(basic_auth)]) -> None:
        if not settings.basic_auth_enabled:
            return
        expected_user = settings.basic_auth_user.encode()
        expected_pass = settings.basic_auth_pass.get_secret_value().encode()
        if credentials is None or not (
            secrets.compare_digest(credentials.username.encode(), expected_user)
            & secrets.compare_digest(credentials.password.encode(), expected_pass)
        ):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "basic authentication required", {"WWW-Authenticate": "Basic"}
            )

    @app.exception_handler(LabelConfigError)
    async def label_config_error(request: Request, error: LabelConfigError):
        logger.warning("%s refused: %s", request.url.path, error)
        return JSONResponse({"status": "error", "error": str(error)}, status_code=status.HTTP_400_BAD_REQUEST)

    def health(request: Request) -> dict:
        service: ModelService = request.app.state.service
        return {
            "status": "UP",
            "model_class": "XDecoder",
            "model": service.registry.base.name,
            "device": str(service.base_model.device),
        }

    @app.get("/health")
    async def health_route(request: Request) -> dict:
        return health(request)

    @app.get("/", dependencies=[Depends(require_auth)])
    async def root(request: Request) -> dict:
        return health(request)

    @app.post("/setup", dependencies=[Depends(require_auth)])
    async def setup(payload: SetupRequest, request: Request) -> dict:
        spec = ProjectSpec.parse(payload.schema_)  # refuse unusable configs when the project connects
        project = project_id(payload.project)
        version = request.app.state.service.current_version(project)
        # Not refused: Label Studio calls /setup before every batch, and a refusal would stop the masks too.
        if uncaptioned := request.app.state.service.no_caption_reason(spec, version):
            logger.warning("/setup, project %s: %s", project, uncaptioned)
        if project is not None:  # Label Studio is told to show this version (docs/label_studio_sync.md)
            await run_in_threadpool(sync_label_studio_soon, request.app.state.redis, project, version.name)
        return {"model_version": version.name}

    def sync_label_studio_soon(redis: Redis, project: int, version: str) -> None:
        try:
            request_label_studio_sync(redis, settings, project, version)
        except RedisError as error:  # /setup still answers: the next one asks again
            logger.warning("project %s: cannot queue the Label Studio sync (%s)", project, error)

    @app.post("/predict", dependencies=[Depends(require_auth)])
    async def predict(payload: PredictRequest, request: Request) -> dict:
        received = time.monotonic()
        service: ModelService = request.app.state.service
        spec = ProjectSpec.parse(payload.label_config)
        project = project_id(payload.project)
        tasks = [task.model_dump() for task in payload.tasks]
        context = payload.params.context if payload.params else None
        deadline = received + settings.predict_budget_s
        redis = request.app.state.redis  # its calls go through the thread pool: a Redis down must not stall the loop
        queued = await run_in_threadpool(queued_elsewhere, redis, project, tasks, context)
        outcome = await run_in_threadpool(service.predict, tasks, spec, project, context, deadline, queued=queued)
        if outcome.unfinished:
            leftovers = [tasks[i] for i in outcome.unfinished]
            await run_in_threadpool(hand_over, redis, project, payload.label_config, leftovers)
        metrics.observe_predictions(outcome.predictions)
        return {"results": [p.to_label_studio() for p in outcome.predictions]}

    def queued_elsewhere(redis: Redis, project: int | None, tasks: list[dict], context) -> set[int]:
        """Tasks of a batch that the workers are predicting already (a second Retrieve predictions during a run).
        An interactive request, or a task opened in the editor (a batch of one), is always answered here."""
        if project is None or context or len(tasks) < 2:
            return set()
        try:
            return QueuedTasks(redis, project).in_flight([task["id"] for task in tasks if task["id"] is not None])
        except RedisError as error:
            logger.warning("cannot tell which tasks the workers are predicting (%s); predicting all of them", error)
            return set()

    def hand_over(redis: Redis, project: int | None, label_config: str | None, tasks: list[dict]) -> None:
        """Tasks /predict had no time for go to the pre-annotation workers, in chunks, which post their predictions
        to Label Studio themselves. If that fails, Label Studio still gets the answer with what was finished."""
        unfinished = f"{len(tasks)} tasks were not predicted within {settings.predict_budget_s:.0f} s"
        if project is None or not settings.label_studio_url or settings.label_studio_api_key is None:
            logger.error(
                "%s and cannot be handed to the workers: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                "(or use `xdecoder-ls preannotate`)",
                unfinished,
            )
            return
        run_id = f"handover-p{project}-{uuid.uuid4().hex[:8]}"
        tasks = [task for task in tasks if task.get("id") is not None]  # the workers post predictions by task id
        try:
            jobs = enqueue_chunks(redis, project, tasks, label_config, run_id)
        except RedisError as error:
            logger.error(
                "%s and cannot be handed to the workers (%s): "
                "run `xdecoder-ls preannotate --project %s --tasks missing`",
                unfinished, error, project,
            )  # fmt: skip
            return
        logger.info("%d tasks handed to the predict queue (run %s, %d jobs)", len(tasks), run_id, len(jobs))

    @app.post("/train", dependencies=[Depends(require_auth)])
    async def train(payload: TrainRequest, request: Request) -> dict:
        event = {
            "action": "START_TRAINING",
            "project": {"id": project_id(payload.project), "label_config": payload.label_config},
            "tasks": payload.annotations,
        }
        return {"status": "ok", "job": await request.app.state.webhooks.store(event)}

    @app.get("/versions", dependencies=[Depends(require_auth)])
    async def versions(request: Request) -> dict:
        registry = request.app.state.service.registry
        return {"versions": [v.name for v in registry.all() if v.status in ("base", "served")]}

    @app.get("/metrics", dependencies=[Depends(require_auth)])
    async def prometheus(request: Request) -> PlainTextResponse:
        body, content_type = metrics.render(request.app.state.redis)
        return PlainTextResponse(body, media_type=content_type)

    return RequestMetrics(WebhookRoute(app))  # outermost: every route is counted and timed, /webhook included
