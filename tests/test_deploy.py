"""The deployment files: Dockerfile (hadolint), docker-compose.yml and its CPU override (the Compose specification's
JSON schema, dclint, and what our services need), and backend.preflight, the compose health check.

No Docker engine runs here, so nothing is built or started; scripts/test.sh installs dclint (which ships the Compose
schema) with npm, and hadolint comes with the test extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from backend.preflight import problems
from backend.settings import Settings
from tests import e2e
from tests.standin_ls import TOKEN

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
DCLINT = Path(os.environ.get("XDECODER_DCLINT", ROOT / ".venv" / "npm" / "node_modules" / ".bin" / "dclint"))
COMPOSE_SCHEMA = DCLINT.resolve().parents[1] / "schemas" / "compose.schema.json"  # bin/dclint.cjs -> the package
HADOLINT = Path(sys.executable).parent / "hadolint"
OUR_IMAGE = "xdecoder-ls:latest"

needs_dclint = pytest.mark.skipif(
    not DCLINT.exists(), reason=f"dclint is not at {DCLINT}: scripts/test.sh installs it with npm"
)


# ------------------------------------------------------------------------------------------------- compose files
class Reset:
    """Compose's `!reset` tag: the key goes, whatever the files before set."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node, deep=True))


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merged(base: dict, override: dict) -> dict:
    """`override` over `base` as Compose merges files: mappings key by key, `!reset` removes. Our override file has
    no sequences; Compose merges some of those in ways this does not."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            assert not isinstance(value, list), f"{key}: sequences are not merged here"
            result[key] = value
    return result


def gpu_and_cpu_configs() -> dict[str, dict]:
    base = load(COMPOSE)
    return {"gpu": base, "cpu": merged(base, load(CPU_OVERRIDE))}


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@needs_dclint
@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_configs_follow_the_compose_specification_schema(variant):
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(gpu_and_cpu_configs()[variant])
    ]
    assert errors == []


@needs_dclint
def test_the_schema_check_refuses_a_misspelt_key():
    config = load(COMPOSE)
    config["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    errors = [e.message for e in validator().iter_errors(config)]
    assert any("intervall" in message for message in errors), errors


@needs_dclint
def test_dclint_finds_no_problem_in_the_compose_files():
    run = subprocess.run(
        [str(DCLINT), "--max-warnings", "0", "--color", "false", str(COMPOSE), str(CPU_OVERRIDE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def our_services(config: dict) -> dict[str, dict]:
    return {name: service for name, service in config["services"].items() if service.get("image") == OUR_IMAGE}


def settings_names() -> set[str]:
    """Every environment variable backend/settings.py reads."""
    return {name for field in Settings.model_fields.values() for name in field.validation_alias.choices}


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_our_services_set_only_variables_that_settings_read(variant):
    services = our_services(gpu_and_cpu_configs()[variant])
    assert set(services) == {"backend", "worker"}
    known = settings_names()
    for name, service in services.items():
        unknown = set(service["environment"]) - known
        assert not unknown, f"{name} sets {unknown}, which backend/settings.py does not read"


def test_settings_names_are_read_from_the_environment(monkeypatch):
    """The names the test above accepts are the ones Settings takes its values from."""
    monkeypatch.setenv("XDECODER_DEVICE", "cuda:3")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    settings = Settings(_env_file=None)
    assert (settings.device, settings.redis_url) == ("cuda:3", "redis://redis:6379/0")
    assert {"XDECODER_DEVICE", "REDIS_URL", "LABEL_STUDIO_API_KEY"} <= settings_names()
    assert "XDECODER_NO_SUCH_SETTING" not in settings_names()


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile (one `ENV a=b \\` block)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for pair in line.split()[1:])


def test_server_and_worker_share_model_versions_redis_and_the_hub_cache():
    image_env = dockerfile_env()
    model_dir, hub_cache = Path(image_env["MODEL_DIR"]), Path(image_env["HF_HOME"])
    assert model_dir in hub_cache.parents  # the Hub cache lives in the model volume
    for config in gpu_and_cpu_configs().values():
        backend, worker = our_services(config)["backend"], our_services(config)["worker"]
        for service in (backend, worker):
            volume = next(v for v in service["volumes"] if v.endswith(f":{model_dir}"))
            assert volume.split(":")[0] in config["volumes"]  # a named volume, not a container's own layer
            assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
            assert service["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert backend["volumes"] == worker["volumes"]
        assert worker["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_the_gpu_worker_reserves_a_gpu_and_the_cpu_variant_does_not():
    configs = gpu_and_cpu_configs()
    gpu_worker, cpu_worker = configs["gpu"]["services"]["worker"], configs["cpu"]["services"]["worker"]
    (device,) = gpu_worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and gpu_worker["environment"]["XDECODER_DEVICE"] == "cuda"
    assert "deploy" not in cpu_worker and cpu_worker["environment"]["XDECODER_DEVICE"] == "cpu"
    assert cpu_worker["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"  # merged, not replaced
    # one image for both services: built with the same torch
    for config in configs.values():
        args = [s["build"]["args"]["TORCH_INDEX_URL"] for s in our_services(config).values()]
        assert len(set(args)) == 1
    assert "/whl/cpu" in configs["cpu"]["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"]


def test_every_service_has_a_health_check_and_restarts():
    for config in gpu_and_cpu_configs().values():
        for name, service in config["services"].items():
            assert service["healthcheck"]["test"][0] == "CMD", name
            assert service["restart"] == "unless-stopped", name
    compose = load(COMPOSE)
    assert compose["services"]["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert compose["services"]["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    label_studio_env = compose["services"]["label-studio"]["environment"]
    assert label_studio_env["ML_BLOCK_LOCAL_IP"] == "false" and label_studio_env["SSRF_PROTECTION_ENABLED"] == "false"


# ---------------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_passes_hadolint():
    run = subprocess.run([str(HADOLINT), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_refuses_an_unpinned_apt_install(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN apt-get update && apt-get install -y curl\n")
    run = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and "DL3008" in run.stdout


def test_the_docker_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore sends only what the image needs; every COPY source must be among it, or the build fails."""
    sources = [each for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
               for each in line.split()[1:-1]]  # fmt: skip
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    assert "locks" in sources and all(source.rstrip("/") in allowed for source in sources), (sources, allowed)
    assert all((ROOT / source).exists() for source in sources)
    assert "pip install -c locks/product.txt ." in (ROOT / "Dockerfile").read_text()
    assert dockerfile_env()["MALLOC_ARENA_MAX"] == "2"
    assert dockerfile_env()["MALLOC_MMAP_THRESHOLD_"] == "1048576"


def test_every_command_of_the_image_starts_through_the_preflight():
    """The image's entrypoint logs what is missing, then runs the command: the compose services' commands go through
    it, so a missing token is one line at start of the server and the worker alike."""
    (entrypoint,) = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == ["python", "-m", "backend.preflight", "--then"]
    for config in gpu_and_cpu_configs().values():
        for name, service in our_services(config).items():
            assert "entrypoint" not in service, name
            assert service["command"][0] == "xdecoder-ls", name


# ------------------------------------------------------------------------------------------ the compose health check
@pytest.fixture
def preflight_settings(monkeypatch):
    """Settings from `environment` alone, whatever this process's environment holds."""
    for name in settings_names():
        monkeypatch.delenv(name, raising=False)
    return lambda **environment: Settings(_env_file=None, **environment)


def test_preflight_names_a_missing_api_key(preflight_settings):
    found = problems(preflight_settings(LABEL_STUDIO_URL="http://127.0.0.1:9"))
    assert len(found) == 1 and found[0].startswith("LABEL_STUDIO_API_KEY is not set")


def test_preflight_names_an_unreachable_label_studio_and_redis(preflight_settings):
    port = e2e.free_port()  # nothing listens there
    settings = preflight_settings(
        LABEL_STUDIO_URL=f"http://127.0.0.1:{port}", LABEL_STUDIO_API_KEY=TOKEN, REDIS_URL=f"redis://127.0.0.1:{port}"
    )
    found = problems(settings, server_url=f"http://127.0.0.1:{port}", timeout_s=2)
    assert len(found) == 3, found
    assert found[0].startswith(f"cannot reach Label Studio at http://127.0.0.1:{port}")
    assert found[1].startswith(f"the backend at http://127.0.0.1:{port} does not answer /health")
    assert found[2].startswith("cannot reach Redis at REDIS_URL")


def run_preflight(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in settings_names()}
    return subprocess.run(
        [sys.executable, "-m", "backend.preflight", *args],
        env={**env, **environment}, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_preflight_health_check_fails_with_the_reason():
    run = run_preflight(LABEL_STUDIO_URL="http://127.0.0.1:9")
    assert run.returncode == 1
    assert run.stderr.startswith("LABEL_STUDIO_API_KEY is not set")


def test_preflight_logs_the_problem_then_starts_the_command_anyway():
    """A missing token must not become a crash loop: the one line is logged, and the server starts."""
    run = run_preflight("--then", sys.executable, "-c", "print('started')", LABEL_STUDIO_URL="http://127.0.0.1:9")
    assert run.returncode == 0
    assert run.stdout == "started\n"
    assert "ERROR xdecoder-ls.preflight: LABEL_STUDIO_API_KEY is not set" in run.stderr


@pytest.mark.e2e
def test_preflight_against_a_real_label_studio(label_studio_url, preflight_settings):
    assert problems(preflight_settings(LABEL_STUDIO_URL=label_studio_url, LABEL_STUDIO_API_KEY=TOKEN)) == []
    wrong = preflight_settings(LABEL_STUDIO_URL=label_studio_url, LABEL_STUDIO_API_KEY="f" * 40)
    (found,) = problems(wrong)
    assert found.startswith(f"Label Studio at {label_studio_url} refused LABEL_STUDIO_API_KEY (401)")
