"""Can this backend do its work? The container health check and the line logged at start.

    python -m backend.preflight [--server URL]    exit 1 and one line per problem (a failing health check)
    python -m backend.preflight --then CMD ...    log the problems, then run CMD whatever they are

The server answers Label Studio's /health as soon as the model is loaded: Label Studio needs that to connect. But the
server and the workers also call Label Studio (task images, bulk predictions) and need Redis, and a deployment that
cannot is broken although /health says UP. This check says so, with what to set, without crashing the process: a
container restarted in a loop for a missing token only buries the one line that explains it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import httpx
from redis import Redis
from redis.exceptions import RedisError

from .images import TOKEN_REFRESH_PATH, ImageFetchError, LabelStudioCredentials
from .settings import Settings, get_settings

logger = logging.getLogger("xdecoder-ls.preflight")

TIMEOUT_S = 5.0
WHOAMI_PATH = "/api/current-user/whoami"  # any authenticated call would do; this one is cheap


def problems(settings: Settings, server_url: str | None = None, timeout_s: float = TIMEOUT_S) -> list[str]:
    """What stops this deployment from working, one sentence each; empty when nothing does."""
    found = []
    with httpx.Client(timeout=timeout_s) as client:
        found += _label_studio_problems(settings, client)
        if server_url:
            found += _server_problems(server_url.rstrip("/"), client)
    if settings.redis_url:  # unset: the embedded Redis, which the first process to need it starts
        try:
            Redis.from_url(settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()
        except RedisError as error:
            found.append(f"cannot reach Redis at REDIS_URL ({error})")
    return found


def _label_studio_problems(settings: Settings, client: httpx.Client) -> list[str]:
    url = settings.label_studio_url
    if not url:
        return ["LABEL_STUDIO_URL is not set: the backend cannot read task images or write predictions"]
    if settings.label_studio_api_key is None:
        return [
            "LABEL_STUDIO_API_KEY is not set: copy the token from Label Studio (Account & Settings) into the "
            "backend's environment (.env beside docker-compose.yml) and restart the backend and the workers"
        ]
    credentials = LabelStudioCredentials(
        settings.label_studio_api_key.get_secret_value(),
        refresh_url=httpx.URL(url + TOKEN_REFRESH_PATH),
        client=client,
        timeout_s=client.timeout.read or TIMEOUT_S,
    )
    try:
        response = client.get(url + WHOAMI_PATH, headers={"Authorization": credentials.authorization()})
    except ImageFetchError as error:  # a Personal Access Token that Label Studio would not exchange
        return [f"Label Studio at {url}: {error}"]
    except httpx.HTTPError as error:
        return [f"cannot reach Label Studio at {url} ({type(error).__name__}: {error}): check LABEL_STUDIO_URL"]
    if response.status_code in (401, 403):
        return [f"Label Studio at {url} refused LABEL_STUDIO_API_KEY ({response.status_code}): copy the token again"]
    if not response.is_success:
        return [f"Label Studio at {url} answered {response.status_code} to {WHOAMI_PATH}"]
    return []


def _server_problems(server_url: str, client: httpx.Client) -> list[str]:
    try:
        response = client.get(server_url + "/health")
    except httpx.HTTPError as error:
        return [f"the backend at {server_url} does not answer /health ({type(error).__name__}); still loading?"]
    if not response.is_success:
        return [f"the backend at {server_url} answered {response.status_code} to /health"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", metavar="URL", help="also ask this backend server's /health")
    parser.add_argument("--then", nargs=argparse.REMAINDER, metavar="CMD", help="log the problems, then run CMD")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        found = problems(get_settings(), args.server)
    except ValueError as error:  # settings that do not validate; the command itself says which, in its own words
        found = [f"invalid settings: {error}"]
    if args.then:
        for problem in found:
            logger.error("%s (the container reports unhealthy until this is fixed)", problem)
        os.execvp(args.then[0], args.then)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
