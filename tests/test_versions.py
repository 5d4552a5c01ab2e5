"""The version registry on disk: what is listed and served, statuses as the pointer moves, the project lock, crash
leftovers, and versions of another base checkpoint."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from backend.versions import VersionRegistry

ROOT = Path(__file__).resolve().parents[1]
PROJECT = 3


@pytest.fixture
def registry(tmp_path) -> VersionRegistry:
    return VersionRegistry(tmp_path, "tiny.safetensors")


def fine_tune(registry: VersionRegistry, project: int = PROJECT):
    return registry.create(project, {"x": torch.zeros(1)}, registry.base.name, 4, {"miou": 0.5})


def test_serving_a_version_supersedes_the_one_served_before(registry):
    first, second = fine_tune(registry), fine_tune(registry)
    registry.promote(first)
    registry.promote(second)
    assert registry.current(PROJECT).name == second.name
    assert [(v.name, v.status) for v in registry.all(PROJECT)] == [
        ("tiny", "base"),
        (first.name, "superseded"),
        (second.name, "served"),
    ]

    registry.roll_back_to_base(PROJECT)
    assert registry.current(PROJECT).is_base and not (registry.root / "projects" / "3" / "current").exists()
    assert registry.get(second.name).status == "superseded"


def test_changing_what_a_project_serves_waits_for_the_project_lock(registry):
    version = fine_tune(registry)
    lock_file = registry.root / "projects" / str(PROJECT) / ".lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)

    def while_another_process_holds_the_lock(change) -> None:
        with open(lock_file, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            changing = threading.Thread(target=change)
            changing.start()
            changing.join(timeout=0.5)
            waited = changing.is_alive()
        changing.join(timeout=10)
        assert waited and not changing.is_alive()

    while_another_process_holds_the_lock(lambda: registry.promote(version))
    assert registry.current(PROJECT).name == version.name
    while_another_process_holds_the_lock(lambda: registry.roll_back_to_base(PROJECT))
    assert registry.current(PROJECT).is_base


def test_a_create_killed_before_its_rename_leaves_no_version_and_its_folder_is_swept_later(registry):
    killed_before_the_rename = f"""
import os, signal, torch
from backend.versions import VersionRegistry
registry = VersionRegistry({str(registry.root)!r}, "tiny.safetensors")
os.rename = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
registry.create({PROJECT}, {{"x": torch.zeros(1000)}}, registry.base.name, 3, {{}})
"""
    killed = subprocess.run([sys.executable, "-c", killed_before_the_rename], cwd=ROOT)
    assert killed.returncode == -9
    versions = registry.root / "versions"
    (abandoned,) = versions.iterdir()
    assert (abandoned / "version.json").is_file()
    assert [v.name for v in registry.all(PROJECT)] == ["tiny"]

    an_hour_ago = time.time() - 3601
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    under_way = Path(tempfile.mkdtemp(prefix=".staging-", dir=versions))  # another process's create, just begun
    version = fine_tune(registry)
    assert version.name == "tiny.p3.v1" and [v.name for v in registry.all(PROJECT)] == ["tiny", "tiny.p3.v1"]
    assert sorted(p.name for p in versions.iterdir()) == sorted([under_way.name, "tiny.p3.v1"])


def test_versions_of_another_base_checkpoint_are_neither_served_nor_listed(tmp_path, caplog):
    old_base = VersionRegistry(tmp_path, "xdecoder_focalt_last.pt")
    made_on_old = fine_tune(old_base)
    old_base.promote(made_on_old)

    new_base = VersionRegistry(tmp_path, "/models/xdecoder_focall_last.pt")  # XDECODER_CHECKPOINT changed
    with caplog.at_level(logging.WARNING, logger="backend.versions"):
        assert new_base.current(PROJECT).name == new_base.current(PROJECT).name == "xdecoder_focall_last"
    assert len(caplog.records) == 1 and made_on_old.name in caplog.records[0].getMessage()
    assert [v.name for v in new_base.all()] == ["xdecoder_focall_last"]
    with pytest.raises(KeyError, match="fine-tuned from the base checkpoint 'xdecoder_focalt_last'"):
        new_base.get(made_on_old.name)

    made_on_new = fine_tune(new_base)
    assert made_on_new.name == "xdecoder_focall_last.p3.v1"
    assert new_base.promote(made_on_new, parent=new_base.base).name == made_on_new.name
    assert new_base.current(PROJECT).name == made_on_new.name
    assert [v.name for v in old_base.all(PROJECT)] == ["xdecoder_focalt_last", made_on_old.name]


def test_a_version_and_a_pointer_reach_the_disk_before_they_count(registry, monkeypatch):
    synced = []
    fsync = os.fsync

    def record(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", record)
    version = fine_tune(registry)
    versions = registry.root.resolve() / "versions"
    staging = Path(synced[0]).parent
    assert staging.parent == versions and staging.name.startswith(".staging-")
    assert synced == [
        str(staging / "weights.safetensors"),
        str(staging / "version.json"),
        str(staging),  # its entries, before the rename
        str(versions),  # the rename
    ]

    synced.clear()
    registry.promote(version)
    assert str(versions / version.name) in synced  # its status, replaced
    assert synced[-1] == str(registry.root.resolve() / "projects" / str(PROJECT))  # the pointer, replaced
