"""One fine-tune on several devices: torch.distributed data parallel over XDECODER_TRAIN_DEVICES.

The fine-tune job (finetune.py) stays the one place that reads corrections, builds examples, evaluates and writes
the version; only the training steps run here. The job saves a `TrainingRun` (the model to train, its inputs, the
schedule) in a temporary folder and starts one rank process per device, `python -m backend.distributed FOLDER
JOB_PID DEVICE`, with the environment torchrun gives (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE). Every
rank runs `train` on its slice of each global batch (NCCL between GPUs, gloo on the CPU); the gradients are
summed across ranks before each step, so the ranks stay identical and rank 0 saves the trained tensors. A rank that
fails or is killed fails the job: the others are killed, the job raises (no version is written; the fine-tune
claim goes through the job's usual failure path) and the error names the rank and how it ended. Ranks die with the
job process (a parent-death signal), and a collective that waits for a dead peer gives up after GROUP_TIMEOUT.
With one device the job calls `train` itself: one process and the ranks share the training steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from xdecoder import XDecoderModel
from xdecoder.training import Augmentation, FineTuneConfig, FineTuner, SegmentationTarget

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(minutes=10)  # the longest a rank waits in a collective for a peer that stopped
POLL_S = 0.2  # how often the job looks at its ranks
# (rank, steps): that rank SIGKILLs itself after that many steps. Only tests set it, to kill a rank mid-training.
KILL_RANK_AT_STEP_FOR_TESTS: tuple[int, int] | None = None


@dataclass
class TrainingRun:
    """Everything the training steps of a fine-tune need, picklable: it is saved for the ranks of a fine-tune on
    several devices (distributed.py). inputs: (image [3, h, w] uint8, target masks [T, h, w]) at model-input size."""

    model: XDecoderModel  # trained in place
    config: FineTuneConfig
    text_to_label: torch.Tensor
    class_embeddings: torch.Tensor  # [K+1, D]
    inputs: list[tuple[torch.Tensor, SegmentationTarget]]
    steps: int
    batch_size: int  # global: images per step over all ranks
    augment: bool


def train(
    run: TrainingRun,
    rank: int = 0,
    world_size: int = 1,
    sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> FineTuner:
    """The training steps of a fine-tune, in one process or as rank `rank` of `world_size` (`sum_across` all-reduces
    across them). Each global batch, its images' augmentation and random draws come from the seed and the step
    alone, and each rank takes its slice of the batch, so N ranks take the steps one process would with the same
    global batch (up to the order of float sums). on_step(step, steps, loss of the global batch) after each step."""
    if run.batch_size % world_size:
        raise ValueError(f"a global batch of {run.batch_size} does not split over {world_size} ranks")
    tuner = FineTuner(run.model, run.config, text_to_label=run.text_to_label)
    augment = Augmentation() if run.augment else None
    share = run.batch_size // world_size
    for step in range(run.steps):
        draw = random.Random(f"{run.config.seed}/{step}")  # the same on every rank
        batch = [(draw.randrange(len(run.inputs)), draw.getrandbits(63)) for _ in range(run.batch_size)]
        images, targets, generators = [], [], []
        for index, seed in batch[rank * share : (rank + 1) * share]:
            image, target = run.inputs[index]
            if augment is not None:  # on the CPU, where the images are
                image, target = augment(image, target, torch.Generator().manual_seed(seed))
            images.append(image)
            targets.append(target)
            generators.append(torch.Generator(device=run.model.device).manual_seed(seed))
        result = tuner.step(images, targets, run.class_embeddings, generators=generators, sum_across=sum_across)
        on_step(step, run.steps, result["loss"])
    return tuner


def die_with_parent(parent: int) -> None:
    """In a child of the worker (RQ's scheduler, a fine-tune's ranks): exit when the worker dies.

    Otherwise the child outlives a killed worker holding copies of its Redis sockets, so Redis never sees the
    worker's blocking dequeue end, hands it the next job anyway, and that job waits for a maintenance pass.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before the call above
        os._exit(1)


def training_devices(text: str | None) -> list[str]:
    """The devices of XDECODER_TRAIN_DEVICES / --devices ("cuda:0,cuda:1"; "cpu,cpu" for two CPU ranks), [] when
    unset. Raises ValueError, in one line, for an unknown, repeated (a GPU) or mixed (CPU and GPU) list."""
    devices = [d.strip() for d in (text or "").split(",") if d.strip()]
    for device in devices:
        try:
            torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"train device {device!r} is not a device (cpu, cuda:0, cuda:1 ...): {error}") from None
    normalised = ["cuda:0" if d == "cuda" else d for d in devices]
    kinds = {torch.device(d).type for d in normalised}
    if len(kinds) > 1:
        raise ValueError(f"train devices {','.join(devices)} mix {' and '.join(sorted(kinds))}: use one kind")
    gpus = [d for d in normalised if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"train devices {','.join(devices)} name a GPU twice: one rank per GPU")
    return normalised


def train_on_devices(run, devices: list[str], progress: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Train `run` (a finetune.TrainingRun) with one rank per device; returns the trained tensors by state-dict name
    (CPU). progress(line) hears rank 0's "step/steps loss" lines. Raises RuntimeError when a rank fails."""
    with tempfile.TemporaryDirectory(prefix="xdecoder-ranks-") as folder:
        workdir = Path(folder)
        torch.save({"run": run, "kill_rank_at_step": KILL_RANK_AT_STEP_FOR_TESTS}, workdir / "run.pt")
        ranks = _start_ranks(workdir, devices)
        try:
            _wait(ranks, devices, workdir, progress)
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                rank.wait()
        return torch.load(workdir / "trained.pt", map_location="cpu")


def _start_ranks(workdir: Path, devices: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    ranks = []
    for rank, device in enumerate(devices):
        environment = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(devices)),
        }
        with open(workdir / f"rank{rank}.log", "wb") as log:
            command = [sys.executable, "-m", "backend.distributed", str(workdir), str(os.getpid()), device]
            ranks.append(subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT))
    logger.info("fine-tune ranks %s started on %s", [r.pid for r in ranks], ",".join(devices))
    return ranks


def _wait(ranks: list[subprocess.Popen], devices: list[str], workdir: Path, progress: Callable[[str], None]) -> None:
    """Until every rank has exited 0; the first that does not fails the run."""
    reported = ""
    while True:
        codes = [rank.poll() for rank in ranks]
        for index, code in enumerate(codes):
            if code not in (None, 0):
                failure = f"fine-tune rank {index} on {devices[index]} {_ending(code)}: {_last_line(workdir, index)}"
                logger.error("%s; stopping the other ranks", failure)
                raise RuntimeError(failure)
        line = _read(workdir / "progress")
        if line and line != reported:
            progress(line)
            reported = line
        if all(code == 0 for code in codes):
            return
        time.sleep(POLL_S)


def _ending(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _last_line(workdir: Path, rank: int) -> str:
    lines = _read(workdir / f"rank{rank}.log").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------- a rank
def _rank_main(workdir: Path, parent: int, device: torch.device) -> None:
    die_with_parent(parent)  # a killed job takes its ranks with it
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU ranks share the cores rather than each starting a thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logger.info("rank %d of %d on %s", rank, world, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    try:
        saved = torch.load(workdir / "run.pt", map_location=device, weights_only=False)  # our own file, just written
        run, kill_at = saved["run"], saved["kill_rank_at_step"]

        def sum_across(tensor: torch.Tensor) -> torch.Tensor:
            summed = tensor.detach().clone()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            return summed

        def on_step(step: int, steps: int, loss: float) -> None:
            if kill_at == (rank, step + 1):
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == 0:
                _write_atomically(workdir / "progress", lambda path: path.write_text(f"{step + 1}/{steps} {loss:.4f}"))

        logger.info("loaded the run: %d steps of %d images", run.steps, run.batch_size)
        tuner = train(run, rank, world, sum_across, on_step)
        logger.info("trained")
        if rank == 0:
            _write_atomically(workdir / "trained.pt", lambda path: torch.save(tuner.trained_state(), path))
        dist.barrier()  # no rank leaves (and tears the group down) while another still needs it
    finally:
        dist.destroy_process_group()


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


if __name__ == "__main__":
    rank_name = os.environ.get("RANK", "?")
    logging.basicConfig(level="INFO", format=f"%(asctime)s %(levelname)s rank {rank_name}: %(message)s")
    _rank_main(Path(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3]))
