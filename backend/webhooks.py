"""POST /webhook: validate the event, store it on the `events` queue, answer.

Label Studio sends webhooks inside the annotator's save, synchronously, with a 1 s timeout, and a bulk action
sends hundreds at once. Two things keep every answer fast under such a burst:

- The route is a plain ASGI layer in front of the FastAPI app (only the request metrics come first): FastAPI's
  middleware, routing, dependency and response machinery cost more per request than the rest of the
  acknowledgement together.
- Events are stored in batches. The first event after a quiet moment is written at once; events that arrive while
  a write is under way wait for it to end and are then written together, as ONE job of the `events` queue
  (`backend.jobs.apply_events`, which applies them in order). Each request is answered only when the batch that
  holds its event is in Redis, so a 2xx still means "stored".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from . import metrics
from .corrections import CorrectionStore
from .queues import EVENTS, enqueue
from .schemas import WebhookEvent

logger = logging.getLogger(__name__)

PATH = "/webhook"
# Events per job at most: a burst larger than this becomes several jobs, none of them huge.
MAX_BATCH = 500
MAX_BODY_BYTES = 64 * 2**20
# While a burst goes on, the next batch waits this long to gather more events before it is written: each write
# costs about a millisecond of Python (an RQ job), so fewer, larger batches leave more time to answer requests.
BURST_GATHER_S = 0.004


class WebhookInbox:
    """Writes webhook events to the `events` queue, many per job when they arrive together."""

    def __init__(self, redis: Redis, max_batch: int = MAX_BATCH, restart_redis: Callable[[], object] | None = None):
        """`restart_redis`: starts the embedded Redis again if it has died (None with REDIS_URL: not ours)."""
        self.redis = redis
        self.max_batch = max_batch
        self.restart_redis = restart_redis
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def store(self, event: dict) -> str:
        """Store `event`; returns the id of the job that holds it once it is in Redis."""
        stored = asyncio.get_running_loop().create_future()
        self._pending.append((event, stored))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_pending())
        return await stored

    async def _write_pending(self) -> None:
        batch: list[tuple[dict, asyncio.Future]] = []
        try:
            first = True
            while self._pending:
                if not first:  # events arrived during the last write: a burst
                    await asyncio.sleep(BURST_GATHER_S)
                first = False
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                events = [event for event, _ in batch]
                try:
                    job = await asyncio.to_thread(self._enqueue, events)
                except Exception as error:  # Redis unreachable: every request of the batch answers 503
                    logger.exception("could not store %d webhook events", len(events))
                    for _, stored in batch:
                        if not stored.done():  # its request may have gone (client disconnected)
                            stored.set_exception(error)
                    continue
                for _, stored in batch:
                    if not stored.done():
                        stored.set_result(job.id)
        finally:
            self._writer = None
            # Cancelled (the server is shutting down): no request may wait for a write that will not come.
            for _, stored in [*batch, *self._pending]:
                if not stored.done():
                    stored.set_exception(RuntimeError("the server stopped before the event was stored"))

    def _enqueue(self, events: list[dict]):
        try:
            return enqueue(self.redis, EVENTS, "backend.jobs.apply_events", events)
        except RedisConnectionError:
            if self.restart_redis is None:
                raise
            logger.warning("the embedded Redis is not answering: starting it again")
            self.restart_redis()  # its append-only file brings back every event stored before it died
            return enqueue(self.redis, EVENTS, "backend.jobs.apply_events", events)


class WebhookRoute:
    """In front of the FastAPI app (only the request metrics come first): answers POST /webhook itself, hands
    everything else to `app`.

    The inbox is the one the app's lifespan puts on `app.state.webhooks`.
    """

    def __init__(self, app: FastAPI):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await _answer(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"POST")])
        body = await _read_body(receive)
        if body is None:
            return await _answer(send, 413, {"detail": f"webhook body over {MAX_BODY_BYTES} bytes"})
        try:
            event = WebhookEvent.model_validate_json(body)
        except ValidationError as error:
            await _answer_raw(send, 422, b'{"detail":' + error.json(include_url=False).encode() + b"}")
            # Recorded after the answer: with Redis down this waits out redis-py's retries, and Label Studio won't.
            return await asyncio.to_thread(_record_refused, self.app.state.redis, body, error)
        inbox: WebhookInbox = self.app.state.webhooks
        try:
            job_id = await inbox.store(event.model_dump(mode="json"))
        except Exception:
            return await _answer(send, 503, {"detail": "the event could not be stored; Redis is unreachable"})
        metrics.WEBHOOKS.labels(action=event.action).inc()
        return await _answer(send, 200, {"status": "ok", "job": job_id})


def _record_refused(redis: Redis, body: bytes, error: ValidationError) -> None:
    """A webhook refused as malformed is listed by `xdecoder-ls status` with the reason, like one a worker rejects."""
    try:
        action = json.loads(body).get("action")
    except (ValueError, AttributeError):
        action = None
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:3])
    try:
        CorrectionStore(redis).record_rejected(str(action or "(no action)"), f"refused with 422: {problems}")
    except RedisError:
        logger.warning("a malformed webhook was refused (%s) and could not be recorded", problems)


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _answer(send: Send, status: int, content: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _answer_raw(send, status, json.dumps(content).encode(), headers)


async def _answer_raw(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
