"""Resident memory of `xdecoder-ls serve` over rounds of concurrent /predict calls (target: rounds 2 to the last within
5 % of each other).

    python bench/memory.py [--rounds 8 --concurrency 32 --model focalt]      (or: xdecoder-ls bench memory)
    MALLOC_ARENA_MAX=64 python bench/memory.py       (another malloc setting: the variables reach the server and win)

The server runs as its own process through the CLI, as a user starts it (so what the CLI does at process start, the
malloc tuning of backend/memory.py, is part of what is measured); MALLOC_ARENA_MAX and MALLOC_MMAP_THRESHOLD_ set for
this command reach the server and win over that tuning (glibc's own, moving mmap threshold cannot be set by a
variable: docs/benchmarks.md, Memory, says how it was measured). Each round posts `--concurrency` one-task /predict
calls at once (each a task of its own, the same 683x512 image from a stand-in Label Studio) and reads the server's
VmRSS from /proc when all have been answered. `--model focalt` is Focal-T with random weights (the real model's size),
`tiny` the tests' tiny model.

    rss_mb          VmRSS after each round, in MB
    spread_after_1  (max - min) / min over rounds 2 to the last
    round_s         seconds each round took

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from backend.queues import EmbeddedRedis  # noqa: E402
from bench.report import print_figures  # noqa: E402
from tests.e2e import free_port, wait_for  # noqa: E402
from tests.helpers import backend_settings, subprocess_env, tiny_model  # noqa: E402
from tests.standin_ls import StandInLabelStudio  # noqa: E402
from xdecoder import XDecoderConfig, build_model, save_checkpoint  # noqa: E402
from xdecoder.bench import synthetic_image  # noqa: E402

CONFIG = (ROOT / "label_config" / "panoptic_polygons.xml").read_text()
MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", choices=("focalt", "tiny"), default="focalt")
    parser.add_argument("--threads", type=int, default=2, help="the server's --threads")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="xdls-memory-"))
    torch.manual_seed(0)
    model = build_model(XDecoderConfig.focalt()) if args.model == "focalt" else tiny_model(seed=11)
    checkpoint = save_checkpoint(model.eval(), folder / f"{args.model}.safetensors")
    del model
    redis_server = EmbeddedRedis(folder / "redis")
    stand_in = StandInLabelStudio()
    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(512, 683)).save(buffer, "PNG")
    url = stand_in.upload("bench.png", buffer.getvalue())
    settings = backend_settings(checkpoint, folder / "models", stand_in.url, REDIS_URL=redis_server.ensure_running())
    env = subprocess_env(settings)
    malloc = {name: os.environ[name] for name in MALLOC_VARIABLES if name in os.environ}
    env = {name: value for name, value in env.items() if name not in MALLOC_VARIABLES} | malloc
    port = free_port()
    log = folder / "serve.log"
    command = [sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--threads", str(args.threads)]
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    rss, seconds = [], []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", timeout=300, process=server, log=log)
        task_ids = iter(range(1, 1_000_000))

        def predict(client: httpx.Client) -> int:
            payload = {
                "tasks": [{"id": next(task_ids), "data": {"image": url}}],
                "project": "1.1",
                "label_config": CONFIG,
            }
            answer = client.post("/predict", json=payload)
            answer.raise_for_status()
            return len(answer.json()["results"][0]["result"])

        limits = httpx.Limits(max_connections=args.concurrency)
        with (
            httpx.Client(base_url=base, timeout=600, limits=limits) as client,
            ThreadPoolExecutor(args.concurrency) as pool,
        ):
            for number in range(1, args.rounds + 1):
                started = time.perf_counter()
                regions = list(pool.map(lambda _: predict(client), range(args.concurrency)))
                seconds.append(round(time.perf_counter() - started, 2))
                rss.append(round(resident_mb(server.pid), 1))
                print(f"round {number}: {rss[-1]:.0f} MB, {seconds[-1]:.1f} s, {min(regions)}-{max(regions)} regions",
                      flush=True)  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        stand_in.close()
        redis_server.stop()
    later = rss[1:] or rss
    results = {
        "model": args.model,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "malloc": malloc or "xdecoder-ls defaults",
        "rss_mb": rss,
        "spread_after_1": round((max(later) - min(later)) / min(later), 4),
        "round_s": seconds,
    }
    print_figures(results)
    return results


if __name__ == "__main__":
    main()
