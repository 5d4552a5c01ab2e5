"""`xdecoder-ls`: every command of the backend.

    xdecoder-ls serve        the ML backend Label Studio connects to
    xdecoder-ls worker       run queued jobs (webhook events, pre-annotation, fine-tunes)
    xdecoder-ls preannotate  pre-annotate a project through the workers, with a progress bar
    xdecoder-ls finetune     fine-tune a project's model on its corrections now
    xdecoder-ls versions     list (or serve) model versions
    xdecoder-ls status       queues, workers, corrections, fine-tunes
    xdecoder-ls bench        the benchmarks (model, polygons, server, queue, memory, learning)

Configuration comes from the environment (see backend/settings.py and docs/configuration.md); docs/operations.md
says what the output means.
"""

from __future__ import annotations

import os

# Large CPU tensors on transparent huge pages: far fewer page faults per forward pass. Read by torch
# at its first allocation, so it is set before anything imports torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# OpenMP threads waiting for work sleep rather than spin. A server and a worker on one CPU machine, each computing
# with all the cores, otherwise spin away each other's time whenever both run the model (docs/benchmarks.md, Queues,
# measures it). Read when torch loads OpenMP, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .memory import tune_malloc  # noqa: E402

# Two malloc arenas and a fixed mmap threshold (unless MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_ are set): the
# server's memory stays flat under concurrent requests (backend/memory.py). Before any thread starts.
tune_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

from redis.exceptions import RedisError  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Column, Table  # noqa: E402

from .settings import Settings, get_settings  # noqa: E402

LOG_LEVELS = typing.get_args(Settings.model_fields["log_level"].annotation)
THREADS_HELP = (
    "CPU threads of the model (default: XDECODER_THREADS, else the cores); "
    "give the server and the workers that share a CPU machine a share each"
)
LONG_RUNNING = ("serve", "worker")  # the commands that say what became of the embedded Redis when they stop
console = Console()
errors = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xdecoder-ls",
        description="The X-Decoder ML backend for Label Studio: its server, its workers, and the commands that "
        "pre-annotate, fine-tune and show what it is doing.",
        epilog="Configuration comes from the environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, "
        "REDIS_URL, XDECODER_*; docs/configuration.md). `xdecoder-ls COMMAND --help` describes a command; "
        "docs/operations.md says what the logs and messages mean.",
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, help="default: LOG_LEVEL from the environment, else INFO"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def command(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=description or summary[0].upper() + summary[1:] + "."
        )

    serve = command(
        "serve",
        "run the ML backend server that Label Studio connects to",
        "Runs the ML backend server (Label Studio's /predict, /setup, /webhook ...) with the model loaded once.",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on (default: %(default)s)")
    serve.add_argument("--threads", type=_positive, help=THREADS_HELP)

    worker = command(
        "worker",
        "run queued jobs: webhook events, pre-annotation, fine-tunes",
        "Runs queued jobs with the model loaded once. Start at least one next to the server.",
    )
    worker.add_argument("--queues", default="events,predict,train", help="comma-separated (default: %(default)s)")
    worker.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: XDECODER_DEVICE; one worker per GPU)")
    worker.add_argument(
        "--devices",
        help="cuda:0,cuda:1 ...: run each fine-tune data parallel over these devices (default: "
        "XDECODER_TRAIN_DEVICES; unset: the worker's one device); see docs/distributed.md",
    )
    worker.add_argument("--threads", type=_positive, help=THREADS_HELP)
    worker.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    worker.add_argument("--name", help="the worker's name in `status` (default: xdecoder-HOST-RANDOM)")

    pre = command(
        "preannotate",
        "pre-annotate a project's tasks through the workers",
        "Queues a project's tasks for the workers and shows their progress; lists the tasks that failed and why. "
        "Running it again predicts only the tasks without a prediction of the served model version.",
    )
    pre.add_argument("--project", type=int, required=True, metavar="ID", help="the Label Studio project")
    pre.add_argument("--tasks", default="all", help="all, missing (no prediction at all), or ids: 1,2,3")
    pre.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a referring prompt (repeatable)")
    pre.add_argument("--detach", action="store_true", help="queue the tasks and return at once")

    tune = command(
        "finetune",
        "fine-tune a project's model on its corrections now",
        "Queues a fine-tune of a project on its corrections and waits for a train worker to run it.",
    )
    tune.add_argument("--project", type=int, required=True, metavar="ID", help="the Label Studio project")
    tune.add_argument("--detach", action="store_true", help="queue the fine-tune and return at once")

    versions = command(
        "versions",
        "list model versions, or serve one",
        "Lists model versions; * marks what --project serves (without --project, the base's * means: "
        "served for the projects without a fine-tune of their own).",
    )
    versions.add_argument("--project", type=int, metavar="ID", help="only this project's versions")
    versions.add_argument(
        "--serve", metavar="VERSION", help="serve this version for its project (the base: roll --project back to it)"
    )
    versions.add_argument("--json", action="store_true", help="print JSON instead of a table")

    status = command(
        "status",
        "show queues, workers, projects, fine-tunes and pre-annotation runs",
        "Shows where Redis is, the queues and workers, each project's corrections, fine-tunes and served version, "
        "and the latest pre-annotation runs with their failed tasks.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")

    bench = command(
        "bench",
        "run a benchmark; prints one JSON line of figures last",
        "Runs one of the benchmarks (docs/benchmarks.md); they need a source checkout. The last line is JSON.",
    )
    bench.add_argument("which", choices=["model", "polygons", "server", "queue", "memory", "learning"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (`bench WHICH --help`)")

    args = parser.parse_args(argv)
    handler = {
        "serve": _serve,
        "worker": _worker,
        "preannotate": _preannotate,
        "finetune": _finetune,
        "versions": _versions,
        "status": _status,
        "bench": _bench,
    }[args.command]
    settings = None
    try:
        settings = get_settings()
        if args.log_level:
            settings = settings.model_copy(update={"log_level": args.log_level})
        configure_logging(settings.log_level)
        from .queues import set_role

        set_role(args.command)
        return handler(settings, args) or 0
    except RedisError as error:
        errors.print(f"[red]error:[/] {_redis_location(settings)}: {error}", highlight=False)
        return 2
    except (ValueError, LookupError, OSError, RuntimeError) as error:  # configuration, input and environment problems
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) adds quotes
        errors.print(f"[red]error:[/] {message}", highlight=False)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted; jobs already queued go on in the workers")
        return 130
    finally:
        if settings is not None:
            _release_embedded_redis(settings, args.command in LONG_RUNNING)


# Libraries' INFO lines that say nothing an operator needs (every HTTP request httpx sends: each Label Studio call
# and image download), shown only at DEBUG.
CHATTY_LIBRARIES = ("httpx", "httpx2", "httpcore")  # httpx2: huggingface_hub's
# RQ's worker lines shown only at DEBUG: routine maintenance (every XDECODER_WORKER_MAINTENANCE seconds) and the
# result retention of every job.
RQ_ROUTINE = ("cleaning registries", "cleaning group registries", "result is kept for")


def configure_logging(level: str) -> None:
    """One handler (the root's) for every library, at `level`, with the routine chatter of httpx and RQ kept to
    DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    rq_worker = logging.getLogger("rq.worker")
    rq_worker.addFilter(lambda record: level == "DEBUG" or not any(p in str(record.msg) for p in RQ_ROUTINE))
    # huggingface_hub gives its loggers a handler of their own that also propagates to the root's: every warning
    # (a download's retries) was printed twice.
    from huggingface_hub.utils import logging as hub_logging

    hub_root = hub_logging.get_logger()
    for handler in list(hub_root.handlers):
        hub_root.removeHandler(handler)


def _release_embedded_redis(settings: Settings, say_what_happened: bool) -> None:
    """Stop the embedded Redis when no other process uses it (the last xdecoder-ls process to exit stops it, and
    the next one to need it starts it again: nothing is left running that nobody uses). A server or worker that
    leaves it running says for whom and how to stop it."""
    from .queues import client_name, embedded_redis

    embedded = embedded_redis(settings)
    if embedded is None:
        return
    try:
        others = embedded.release(client_name())
    except (RedisError, OSError, RuntimeError) as error:
        errors.print(f"the embedded Redis under {embedded.folder} was not stopped: {error}", highlight=False)
        return
    if not say_what_happened:
        return
    if others:
        errors.print(
            f"The embedded Redis keeps running for {', '.join(others)}; it stops when the last xdecoder-ls process "
            f"using it exits. To stop it now (its data is saved): {embedded.stop_command}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        errors.print(f"Stopped the embedded Redis ({embedded.folder}): no other process uses it.", highlight=False)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1 (got {text!r})")
    return int(text)


def _with_flags(settings: Settings, args) -> Settings:
    """`settings` with what the command's flags override (--device, --threads, --devices)."""
    flags = {
        "device": getattr(args, "device", None),
        "threads": getattr(args, "threads", None),
        "train_devices": getattr(args, "devices", None),
    }
    return settings.model_copy(update={name: value for name, value in flags.items() if value is not None})


def _redis_location(settings: Settings | None) -> str:
    from .queues import shown_redis_url

    if settings is None or not settings.redis_url:
        return "the embedded Redis" + (f" under {settings.model_dir / 'redis'}" if settings else "")
    return f"Redis at {shown_redis_url(settings.redis_url)}"


def _serve(settings: Settings, args) -> int:
    import uvicorn

    from .inference import ModelService
    from .server import create_app

    settings = _with_flags(settings, args)
    service = ModelService(settings)  # here, so that a missing checkpoint or MODEL_DIR is one line, not a traceback
    try:
        uvicorn.run(create_app(settings, service), host=args.host, port=args.port, log_level=settings.log_level.lower())
    finally:
        service.close()
    return 0


def _worker(settings: Settings, args) -> int:
    from .worker import run_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    run_worker(_with_flags(settings, args), queues, args.burst, args.name)
    return 0


def _preannotate(settings: Settings, args) -> int:
    from . import preannotate
    from .progress import RunProgress
    from .queues import connect

    redis = connect(settings)
    which, ids = args.tasks, None
    if which not in ("all", "missing"):
        pieces = [piece.strip() for piece in which.split(",")]
        if not all(piece.isdigit() for piece in pieces):
            raise ValueError(f"--tasks takes all, missing, or task ids such as 1,2,3 (got {args.tasks!r})")
        ids, which = [int(piece) for piece in pieces], "all"
    run = preannotate.start(settings, redis, args.project, which, ids, args.prompt)
    jobs = len(run.job_ids)
    console.print(
        f"run {run.run_id}: {run.total} tasks, model version {run.version}, {jobs} job{'s' * (jobs != 1)} queued"
    )
    if args.detach:
        return 0
    final = preannotate.watch(redis, run, console=console)
    console.print(f"done {final.done}, failed {final.failed}, skipped {final.skipped} of {run.total}")
    if failures := RunProgress(redis, run.run_id).failures():
        console.print(preannotate.failures_table(failures, f"{len(failures)} tasks failed"))
        console.print(
            "A failed task gets no prediction. Fix the cause and run the same command again: "
            "it predicts only the tasks without a prediction of this model version."
        )
    for job_id, tasks, error in preannotate.failed_jobs(redis, run.job_ids):
        errors.print(f"[red]job {job_id}[/] ({tasks} tasks) failed after its retries: {error}", highlight=False)
    if final.finished < run.total:
        errors.print(f"{run.total - final.finished} tasks were not reached: `xdecoder-ls status` lists failed jobs")
    return 0 if final.failed == 0 and final.finished >= run.total else 1


def _finetune(settings: Settings, args) -> int:
    from rq.job import Job

    from .corrections import CorrectionStore
    from .learning import request_finetune
    from .queues import LIVE_JOB_STATES, connect

    redis = connect(settings)
    job_id, queued = request_finetune(redis, settings, args.project, "command")
    console.print(f"fine-tune {'queued' if queued else 'already queued or running'}: {job_id}")
    if args.detach:
        return 0
    store = CorrectionStore(redis)
    shown = None
    with console.status("waiting for a train worker") as spinner:
        while (state := Job.fetch(job_id, connection=redis).get_status()) in LIVE_JOB_STATES:
            meta = store.meta(args.project)
            # Until a worker starts the job, the meta still describes the previous fine-tune.
            line = (
                f"{state}: waiting for a train worker"
                if state != "started"
                else " ".join(meta.get(f"finetune_{k}", "") for k in ("status", "progress", "loss"))
            )
            if line != shown:
                spinner.update(line)
                shown = line
            time.sleep(1)
    job = Job.fetch(job_id, connection=redis)
    latest = job.latest_result()
    console.print(
        job.return_value() if job.return_value() is not None else (latest and latest.exc_string) or job.get_status()
    )
    return 0 if job.return_value() is not None else 1


def _versions(settings: Settings, args) -> int:
    from .learning import served_version_changed
    from .versions import VersionRegistry

    registry = VersionRegistry(settings.model_dir, settings.checkpoint)
    registry.on_served_change = lambda project, version: served_version_changed(settings, project, version)
    if args.project is not None:
        _check_project_exists(settings, registry, args.project)
    if args.serve:
        version = registry.get(args.serve)  # refuses a version of another base checkpoint
        if version.is_base:
            if args.project is None:
                errors.print("the base is served by rolling a project back to it: add --project ID")
                return 1
            project = args.project
            registry.roll_back_to_base(project)
        else:
            if args.project not in (None, version.project):
                errors.print(f"{version.name} is a version of project {version.project}, not of {args.project}")
                return 1
            project = version.project
            registry.promote(version)
        console.print(f"project {project} now serves {version.name}")
        return 0
    versions = registry.all(args.project)
    if args.project is not None:
        served_names = {registry.current(args.project).name}
    else:  # the base is marked too: it is served for every project without a fine-tune of its own
        projects = {v.project for v in versions if v.project is not None}
        served_names = {registry.base.name} | {registry.current(p).name for p in projects}
    rows = [
        {
            "name": v.name,
            "project": v.project,
            "status": v.status,
            "served": v.name in served_names,
            "parent": v.parent,
            "created_at": v.created_at,
            "trained_on": v.trained_on,
            "metrics": v.metrics,
        }
        for v in versions
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    # Borderless, without `trained_on` (--json has it), so that it fits 80 columns with the official checkpoints'
    # names and the version names are never cut.
    table = Table(Column("version", no_wrap=True), "project", "status", "mIoU", "created", box=box.SIMPLE_HEAD)
    for row in rows:
        metrics = row["metrics"]
        miou = f"{metrics['parent_miou']:.3f}→{metrics['miou']:.3f}" if "parent_miou" in metrics else ""
        table.add_row(
            ("* " if row["served"] else "  ") + row["name"], "all" if row["project"] is None else str(row["project"]),
            row["status"], miou, time.strftime("%m-%d %H:%M", time.localtime(row["created_at"])),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"* served for project {args.project}"
        if args.project is not None
        else "* served; the base serves every project that has no fine-tune of its own"
    )
    return 0


def _check_project_exists(settings: Settings, registry, project: int) -> None:
    """Raises LookupError unless `project` has versions here, corrections in the store, or is in Label Studio."""
    from .corrections import CorrectionStore
    from .labelstudio import LabelStudioAPI, LabelStudioError, NotConfigured
    from .queues import connect

    if registry.all(project)[1:] or project in CorrectionStore(connect(settings)).projects():
        return
    try:
        LabelStudioAPI(settings).label_config(project)
    except (LabelStudioError, NotConfigured) as error:
        raise LookupError(
            f"no project {project}: it has no model versions and no corrections here, and {error}"
        ) from None


def _status(settings: Settings, args) -> int:
    from .queues import connect, redis_url, shown_redis_url
    from .status import collect, render

    location = shown_redis_url(redis_url(settings))
    status = collect(settings, connect(settings), location)
    if args.json:
        print(json.dumps(status))
    else:
        render(status, console)
    return 0


def _bench(settings: Settings, args) -> int:
    if args.which == "model":
        from xdecoder import bench as model_bench

        model_bench.main(args.args)
        return 0
    import runpy

    script = {
        "polygons": "polygons.py",
        "server": "server.py",
        "queue": "worker_queue.py",
        "memory": "memory.py",
        "learning": "learning.py",
    }[args.which]
    checkout = Path(__file__).resolve().parents[1]
    path = next(
        (folder / "bench" / script for folder in (Path.cwd(), checkout) if (folder / "bench" / script).is_file()), None
    )
    if path is None:
        raise FileNotFoundError(
            f"bench {args.which} runs from a source checkout (it needs bench/ and tests/): run it from there"
        )
    sys.argv = [str(path), *args.args]
    runpy.run_path(str(path), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
