"""Queue benchmarks: webhook acknowledgement latency, and pre-annotation throughput with 1 vs 2 workers.

    python bench/worker_queue.py [--posts 200] [--bursts 5] [--tasks 64] [--rounds 3] [--worker-threads 1]
                                 [--only webhooks|preannotate]
    (or: xdecoder-ls bench queue ...)

1. Webhooks: the real server (`xdecoder-ls serve` in its own process, loopback) with its Redis; --posts
   webhook posts one at a time, then all at once (--bursts times), each on a new connection as Label Studio
   sends them, from a bare asyncio client; p50/p99 of the time from connecting to the end of the 2xx (the event
   is in Redis by then; for the bursts, the median over bursts, and the worst burst's p99). Target p99 < 50 ms.
   All at once, the figures include the queue in front of each post: one client process sends all of them and
   one server process answers them. For scale, the same bursts against uvicorn serving a bare app that only
   answers 200.
2. Pre-annotation: a stand-in Label Studio on loopback with --tasks 683x512 images, the tiny random model
   at short side 512, `preannotate.start` enqueues the project in chunks of 4; time from enqueue to the last
   prediction posted, with one warm worker, then two (each worker computes with --worker-threads CPU threads, its
   `--threads`: with 1, two workers use both cores). Target: two workers at least 1.8x faster. With 2, each
   worker computes on all the cores, as workers started without --threads do on this machine, and
   OMP_WAIT_POLICY=ACTIVE in the environment shows what that costs without the PASSIVE that `xdecoder-ls` sets.
   Then the same images through the model alone in one, then two plain processes (no queue, no HTTP, no
   Redis): what this machine allows two workers, whose two cores are not independent (they slow each other
   down) and are shared with the stand-in Label Studio and Redis. This shared VM's speed wanders by 20-40 % from
   one second to the next, so the four runs alternate for --rounds rounds and medians are compared.

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for the model-only processes, as `xdecoder-ls` sets it
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvloop  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue, Worker  # noqa: E402

from backend import preannotate  # noqa: E402
from backend.queues import EmbeddedRedis  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.report import print_figures  # noqa: E402
from tests.helpers import backend_settings, subprocess_env, write_tiny_checkpoint  # noqa: E402
from tests.standin_ls import StandInLabelStudio, png  # noqa: E402

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


async def post_all(port: int, bodies: list[bytes], concurrency: int) -> list[float]:
    """Seconds from opening the connection to the end of the 2xx, for each webhook body posted; `concurrency` posts
    in flight at once, each on a new connection as Label Studio sends them.

    A bare asyncio client writing ready-made requests: an HTTP library would add more time of its own per post
    than the server takes to acknowledge one, and all of it would be counted as latency.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(body: bytes) -> float:
        request = (
            f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        async with gate:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status_line = await reader.readline()
            await reader.read()  # headers and body, until the server closes
            elapsed = time.perf_counter() - started
            writer.close()
        status = int(status_line.split()[1])
        if status != 200:
            raise RuntimeError(f"webhook answered {status_line!r}")
        return elapsed

    return sorted(await asyncio.gather(*(one(body) for body in bodies)))


async def bare_app(scope, receive, send) -> None:
    """An ASGI app that answers every request with an empty 200 and does nothing else: what uvicorn alone costs."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def start_server(command: list[str], env: dict, port: int) -> subprocess.Popen:
    """`command` in its own process (not sharing our GIL), once it answers on `port`."""
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError(f"{command} did not start")
        time.sleep(0.1)


def webhook_latency(settings: Settings, posts: int, bursts: int) -> dict:
    env = subprocess_env(settings)
    bodies = []
    for i in range(posts):
        payload = json.loads(json.dumps(WEBHOOK))
        payload["annotation"]["id"] = i
        bodies.append(json.dumps(payload).encode())

    def measure(command: list[str], port: int) -> tuple[list[float], list[list[float]]]:
        server = start_server([*command, "--port", str(port)], env, port)
        try:
            uvloop.run(post_all(port, bodies[:10], concurrency=1))  # warm the route
            one_at_a_time = uvloop.run(post_all(port, bodies, concurrency=1))
            return one_at_a_time, [uvloop.run(post_all(port, bodies, concurrency=posts)) for _ in range(bursts)]
        finally:
            server.terminate()
            server.wait(timeout=30)

    serve = [sys.executable, "-m", "backend.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1"]
    events = Queue("events", connection=Redis.from_url(settings.redis_url))
    jobs_before = events.count
    one_at_a_time, all_at_once = measure(serve, free_port())
    # Every post one at a time is a job of its own (nothing else is waiting); the bursts share the rest.
    jobs_per_burst = (events.count - jobs_before - 10 - posts) / bursts
    bare = [sys.executable, "-m", "uvicorn", "bench.worker_queue:bare_app", "--log-level", "warning", "--host"]
    _, bare_all_at_once = measure([*bare, "127.0.0.1"], free_port())

    def percentile(latencies: list[float], share: float) -> float:
        return 1000 * latencies[round(share * (len(latencies) - 1))]

    def median_of_bursts(runs: list[list[float]], share: float) -> float:
        return statistics.median(percentile(run, share) for run in runs)

    return {
        "webhook_posts": posts,
        "webhook_bursts": bursts,
        "webhook_p50_ms": median_of_bursts(all_at_once, 0.5),
        "webhook_p99_ms": median_of_bursts(all_at_once, 0.99),
        "webhook_worst_burst_p99_ms": max(percentile(run, 0.99) for run in all_at_once),
        "webhook_sequential_p50_ms": percentile(one_at_a_time, 0.5),
        "webhook_sequential_p99_ms": percentile(one_at_a_time, 0.99),
        "webhook_jobs_per_burst": jobs_per_burst,
        "bare_uvicorn_p99_ms": median_of_bursts(bare_all_at_once, 0.99),
    }


WARM_UP_PROJECT = 2
WARM_UP_TASKS = 2  # one for each worker


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its threads so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    settings: Settings, stand_in: StandInLabelStudio, redis: Redis, tasks: int, workers: int, threads: int
) -> tuple[float, float]:
    """(seconds from enqueueing the project to the last prediction posted, with warm workers; cores the workers kept
    busy on average meanwhile)."""
    env = subprocess_env(settings)
    command = [sys.executable, "-m", "backend.cli", "--log-level", "WARNING", "worker", "--queues", "predict"]
    command += ["--threads", str(threads)]
    processes = [subprocess.Popen(command, env=env) for _ in range(workers)]
    try:
        # The clock starts once every worker has loaded the model and listens (a worker registers after loading).
        pids = {process.pid for process in processes}
        deadline = time.monotonic() + 120
        while len({w.pid for w in Worker.all(connection=redis)} & pids) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            time.sleep(0.1)
        # Two warm-up tasks in another project with the same labels, one chunk each, done before the clock starts.
        # Two idle workers each take one (a blocked dequeue is served first come, first served), so each worker's
        # first forward pass and class embeddings are behind it, as for a worker that has been running (the
        # model-only runs below warm up the same way). One-time costs would otherwise weigh on a short run with two
        # workers as much as with one.
        preannotate.start(settings, redis, WARM_UP_PROJECT, chunk_size=1)
        while len(stand_in.predictions) < WARM_UP_TASKS:
            time.sleep(0.05)
        stand_in.predictions.clear()
        started, cpu_before = time.perf_counter(), sum(cpu_seconds(process.pid) for process in processes)
        run = preannotate.start(settings, redis, 1, chunk_size=4)
        while len(stand_in.predictions) < tasks:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        cores = (sum(cpu_seconds(process.pid) for process in processes) - cpu_before) / elapsed
        assert preannotate.watch(redis, run, poll_s=0.01).done == tasks
        return elapsed, cores
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _forward_images(checkpoint: str, seeds: list[int], threads: int, ready, go, done) -> None:
    """In a child process: load the model, wait for the start, then segment one image per seed."""
    import numpy as np
    import torch
    from PIL import Image

    from xdecoder import Predictor, load_model

    torch.set_num_threads(threads)
    predictor = Predictor(load_model(checkpoint, device="cpu"), short_side=512)
    images = [np.asarray(Image.open(io.BytesIO(png(683, 512, seed=seed))).convert("RGB")) for seed in seeds]
    predictor.panoptic(images[0], ["car", "sky", "road"])  # warm-up, and the class embeddings
    ready.put(None)
    go.wait()
    for image in images:
        predictor.panoptic(image, ["car", "sky", "road"])
    done.put(None)


def forward_seconds(checkpoint: str, tasks: int, processes: int, threads: int) -> float:
    """Seconds `processes` plain processes take to segment `tasks` images between them: the model alone, no
    queue, no HTTP, no Redis. What two processes gain over one here is what this machine allows two workers."""
    spawn = multiprocessing.get_context("spawn")
    ready, done, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    seeds = [list(range(tasks))[i::processes] for i in range(processes)]
    children = [
        spawn.Process(target=_forward_images, args=(str(checkpoint), s, threads, ready, go, done)) for s in seeds
    ]
    for child in children:
        child.start()
    try:
        for _ in children:
            ready.get(timeout=120)
        started = time.perf_counter()
        go.set()
        for _ in children:
            done.get(timeout=600)
        return time.perf_counter() - started
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()


def preannotation_speedup(
    settings: Settings, stand_in: StandInLabelStudio, redis: Redis, tasks: int, rounds: int, threads: int
) -> dict:
    stand_in.add_project(1, CONFIG)
    for i in range(tasks):
        stand_in.add_task(1, {"image": stand_in.upload(f"b{i}.png", png(683, 512, seed=i))})
    stand_in.add_project(WARM_UP_PROJECT, CONFIG)
    for i in range(WARM_UP_TASKS):
        upload = stand_in.upload(f"w{i}.png", png(683, 512, seed=1000 + i), project=WARM_UP_PROJECT)
        stand_in.add_task(WARM_UP_PROJECT, {"image": upload})
    ones, twos, model_ones, model_twos, one_cores, two_cores = [], [], [], [], [], []
    for _ in range(rounds):
        for seconds, cores, workers in (ones, one_cores, 1), (twos, two_cores, 2):
            elapsed, busy = throughput(settings, stand_in, redis, tasks, workers, threads)
            seconds.append(elapsed)
            cores.append(busy)
        model_ones.append(forward_seconds(settings.checkpoint, tasks, processes=1, threads=threads))
        model_twos.append(forward_seconds(settings.checkpoint, tasks, processes=2, threads=threads))
    one, two = statistics.median(ones), statistics.median(twos)
    return {
        "preannotate_tasks": tasks,
        "worker_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "one_worker_s": one,
        "two_workers_s": two,
        "one_worker_tasks_per_s": tasks / one,
        "two_workers_tasks_per_s": tasks / two,
        "speedup": one / two,
        "one_worker_cores_busy": statistics.median(one_cores),
        "two_workers_cores_busy": statistics.median(two_cores),
        "model_only_one_process_s": statistics.median(model_ones),
        "model_only_two_processes_s": statistics.median(model_twos),
        "model_only_speedup": statistics.median(model_ones) / statistics.median(model_twos),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--bursts", type=int, default=5, help="times the posts are sent all at once")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker-threads", type=int, default=1, help="each worker's --threads (default 1)")
    parser.add_argument("--only", choices=["webhooks", "preannotate"], help="run one of the two parts")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="xdls-bench-"))
    redis_server = EmbeddedRedis(folder / "redis")
    stand_in = StandInLabelStudio()
    try:
        settings = backend_settings(
            write_tiny_checkpoint(folder / "tiny.safetensors", fmt="safetensors"),
            folder / "models",
            stand_in.url,
            REDIS_URL=redis_server.ensure_running(),
            XDECODER_SHORT_SIDE=512,
        )
        redis = Redis.from_url(settings.redis_url)
        results = {} if args.only == "preannotate" else webhook_latency(settings, args.posts, args.bursts)
        if args.only != "webhooks":
            results |= preannotation_speedup(settings, stand_in, redis, args.tasks, args.rounds, args.worker_threads)
    finally:
        stand_in.close()
        redis_server.stop()
    print_figures(results)
    return results


if __name__ == "__main__":
    main()
