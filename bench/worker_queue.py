"""Queue benchmarks: webhook acknowledgement latency, and pre-annotation throughput with 1 vs 2 workers.

    python bench/worker_queue.py [--posts 200] [--tasks 48]        (or: xdecoder-ls bench queue)

1. Webhooks: the real server (uvicorn, loopback) with its Redis; 200 webhook posts at once from an
   async client; p50/p99 of the time to the 2xx (the event is in Redis by then). Target p99 < 50 ms.
2. Pre-annotation: a stand-in Label Studio on loopback with --tasks images, the tiny random model,
   `preannotate.start` enqueues the project; time from enqueue to the last prediction posted, with one
   worker, then two (each worker process runs torch on one thread, so two workers use both cores).
   Target: two workers at least 1.8x faster.

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from redis import Redis  # noqa: E402

from backend import preannotate  # noqa: E402
from backend.queues import EmbeddedRedis  # noqa: E402
from backend.server import create_app  # noqa: E402
from backend.settings import Settings  # noqa: E402
from tests.helpers import settings_env, write_tiny_checkpoint  # noqa: E402
from tests.standin_ls import TOKEN, StandInLabelStudio, png  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="Car"/><Label value="Sky"/><Label value="Road"/></PolygonLabels>
</View>"""
WEBHOOK = {
    "action": "ANNOTATION_CREATED",
    "project": {"id": 1, "label_config": CONFIG},
    "annotation": {"id": 1, "task": 1, "result": [], "updated_at": "2026-11-23T00:00:00Z"},
    "task": {"id": 1, "data": {"image": "/data/upload/1/a.png"}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webhook_latency(settings: Settings, posts: int) -> dict:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    async def post_all() -> list[float]:
        limits = httpx.Limits(max_connections=posts)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as client:
            await client.post("/webhook", json=WEBHOOK)  # warm the connection pool and the route

            async def one(i: int) -> float:
                payload = json.loads(json.dumps(WEBHOOK))
                payload["annotation"]["id"] = i
                started = time.perf_counter()
                response = await client.post("/webhook", json=payload)
                response.raise_for_status()
                return time.perf_counter() - started

            return await asyncio.gather(*(one(i) for i in range(posts)))

    latencies = sorted(asyncio.run(post_all()))
    server.should_exit = True
    thread.join()
    return {
        "webhook_posts": posts,
        "webhook_p50_ms": 1000 * statistics.median(latencies),
        "webhook_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "webhook_max_ms": 1000 * latencies[-1],
    }


def throughput(settings: Settings, stand_in: StandInLabelStudio, redis: Redis, tasks: int, workers: int) -> float:
    """Seconds from enqueueing the project to the last prediction posted."""
    stand_in.predictions.clear()
    redis.delete(*redis.keys("xdls:predicted:*") or ["none"])
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "backend.cli", "--log-level", "WARNING", "worker", "--queues", "predict"]
    processes = [subprocess.Popen(command, env=env) for _ in range(workers)]
    try:
        time.sleep(8)  # let the workers import torch and load the model before the clock starts
        started = time.perf_counter()
        run = preannotate.start(settings, redis, 1, chunk_size=2)
        while len(stand_in.predictions) < tasks:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        assert preannotate.watch(redis, run, poll_s=0.01).done == tasks
        return elapsed
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=48)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="xdls-bench-"))
    redis_server = EmbeddedRedis(folder / "redis")
    stand_in = StandInLabelStudio()
    try:
        settings = Settings(
            XDECODER_CHECKPOINT=str(write_tiny_checkpoint(folder / "tiny.safetensors", fmt="safetensors")),
            XDECODER_DEVICE="cpu",
            XDECODER_SHORT_SIDE=128,
            XDECODER_OBJECT_MASK_THRESHOLD=0.0,
            XDECODER_OVERLAP_THRESHOLD=0.0,
            MODEL_DIR=str(folder / "models"),
            REDIS_URL=redis_server.ensure_running(),
            LABEL_STUDIO_URL=stand_in.url,
            LABEL_STUDIO_API_KEY=TOKEN,
        )
        redis = Redis.from_url(settings.redis_url)
        results = webhook_latency(settings, args.posts)
        stand_in.add_project(1, CONFIG)
        for i in range(args.tasks):
            stand_in.add_task(1, {"image": stand_in.upload(f"b{i}.png", png(256, 192, seed=i))})
        one = throughput(settings, stand_in, redis, args.tasks, workers=1)
        two = throughput(settings, stand_in, redis, args.tasks, workers=2)
        results |= {
            "preannotate_tasks": args.tasks,
            "one_worker_s": one,
            "two_workers_s": two,
            "one_worker_tasks_per_s": args.tasks / one,
            "two_workers_tasks_per_s": args.tasks / two,
            "speedup": one / two,
        }
    finally:
        stand_in.close()
        redis_server.stop()
    for key, value in results.items():
        print(f"{key:<26} {value:10.3f}" if isinstance(value, float) else f"{key:<26} {value}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
