"""Model versions: the base checkpoint and the fine-tuned versions of each project.

Label Studio keys predictions by `model_version` (it skips tasks that already have one of the current
version, and serves the lowest-scored tasks of the current version first), so the name must say which
weights made a prediction and must be stable across restarts.

    base:        the checkpoint's file stem, e.g. "xdecoder_focalt_last"
    fine-tuned:  "<base>.p<project>.v<n>", e.g. "xdecoder_focalt_last.p3.v2"

A fine-tuned version belongs to the base it was trained on, by that name prefix: its files hold only the tensors
fine-tuning changed, which would load onto another base (the shapes match) and give nonsense. So a registry lists
and serves only the versions of its own base; a project whose pointer names another base's version (the checkpoint
was changed, MODEL_DIR kept) is served the base, and serving such a version by hand is refused.

Layout under MODEL_DIR (shared by the server and the workers, which see each other's changes through it):

    versions/<name>/weights.safetensors   the tensors fine-tuning changed (the rest come from the base)
    versions/<name>/version.json          parent, creation time, training size, evaluation, status
    versions/.staging-*/                  a version being written (or left by a create that was killed)
    projects/<id>/current                 the version served for that project (absent: the base)
    projects/<id>/.lock                   taken (flock) by every change of what the project serves

Every write goes to a temporary name first, is fsynced, and is renamed into place, so a crash or power loss
never leaves a half-written version or pointer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
INFO_FILE = "version.json"
POINTER_FILE = "current"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
ABANDONED_STAGING_S = 3600  # a staging folder untouched this long belongs to a killed create, not a running one
FINE_TUNED_NAME = re.compile(r"(?P<base>.+)\.p(?P<project>\d+)\.v(?P<number>\d+)")


@dataclass
class ModelVersion:
    name: str
    project: int | None = None  # None for the base
    parent: str | None = None
    created_at: float = field(default_factory=time.time)
    trained_on: int = 0  # corrections used
    metrics: dict = field(default_factory=dict)  # evaluation of this version and its parent
    # base; served (its project's pointer names it); superseded (served before, then another was); candidate
    # (kept, not served: too few corrections to judge it, or the served version changed while it trained);
    # rejected (it did not gain enough). `versions --serve` serves any of them.
    status: str = "base"

    @property
    def is_base(self) -> bool:
        return self.project is None


def base_version_name(checkpoint: str) -> str:
    """Stable name of a checkpoint given as an official file name or a path."""
    return Path(checkpoint).stem


def project_id(project: str | int | None) -> int | None:
    """Label Studio sends projects as "<id>.<created timestamp>" (ML API) or as ids (webhooks)."""
    if project is None or project == "":
        return None
    match = re.fullmatch(r"\s*(\d+)(?:\.\d+)?\s*", str(project))
    if not match:
        raise ValueError(f"not a Label Studio project id: {project!r}")
    return int(match.group(1))


def _base_of(name: str) -> str | None:
    """The base a fine-tuned version's name says it was trained on; None for a name that is not a fine-tune's."""
    match = FINE_TUNED_NAME.fullmatch(name)
    return match.group("base") if match else None


class VersionRegistry:
    def __init__(self, model_dir: Path, checkpoint: str):
        self.root = Path(model_dir)
        self.base = ModelVersion(base_version_name(checkpoint))
        self._reported_foreign_pointers: set[str] = set()  # warned about once each, not on every prediction
        # Called with (project, version name) after every change of what a project serves (promotion, rollback):
        # Label Studio is told (backend.learning.served_version_changed). It must not raise.
        self.on_served_change: Callable[[int, str], None] | None = None
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        (self.root / "projects").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- reading
    def current(self, project: int | None) -> ModelVersion:
        """The version served for a project: its promoted fine-tune, else the base (also when the project's pointer
        names a version of another base checkpoint)."""
        if project is None:
            return self.base
        try:
            name = self._pointer(project).read_text().strip()
        except FileNotFoundError:
            return self.base
        if _base_of(name) != self.base.name:
            if name not in self._reported_foreign_pointers:
                self._reported_foreign_pointers.add(name)
                logger.warning(
                    "project %s: its served version %s was not trained on the base checkpoint %s; serving the base",
                    project, name, self.base.name,
                )  # fmt: skip
            return self.base
        return self.get(name)

    def get(self, name: str) -> ModelVersion:
        """The version named `name`; KeyError if there is none, or if it was trained on another base checkpoint."""
        if name == self.base.name:
            return self.base
        made_on = _base_of(name)
        if made_on is not None and made_on != self.base.name:
            raise KeyError(
                f"model version {name!r} was fine-tuned from the base checkpoint {made_on!r}, not from the current "
                f"one ({self.base.name!r}, XDECODER_CHECKPOINT); it cannot be served on it"
            )
        info = self.root / "versions" / name / INFO_FILE
        if not info.is_file():
            raise KeyError(f"unknown model version {name!r} (`xdecoder-ls versions` lists them)")
        return ModelVersion(**json.loads(info.read_text()))

    def weights_path(self, version: ModelVersion) -> Path:
        return self.root / "versions" / version.name / WEIGHTS_FILE

    def all(self, project: int | None = None) -> list[ModelVersion]:
        """The base and every version fine-tuned from it (of one project, if given), oldest first. Versions of other
        base checkpoints are left out, and so are staging folders (their names do not start with the base's)."""
        versions = []
        for info in (self.root / "versions").glob(f"*/{INFO_FILE}"):
            if _base_of(info.parent.name) != self.base.name:
                continue
            version = ModelVersion(**json.loads(info.read_text()))
            if project is None or version.project == project:
                versions.append(version)
        return [self.base, *sorted(versions, key=lambda v: v.created_at)]

    # ---------------------------------------------------------------------------------- writing
    def create(
        self,
        project: int,
        tensors: Mapping[str, torch.Tensor],
        parent: str,
        trained_on: int,
        metrics: dict,
        status: str = "candidate",
    ) -> ModelVersion:
        """Store a fine-tuned version atomically (the folder appears complete or not at all)."""
        from safetensors.torch import save_file

        self._sweep_abandoned_staging()
        number = 1 + max(
            (int(FINE_TUNED_NAME.fullmatch(v.name).group("number")) for v in self.all(project) if not v.is_base),
            default=0,
        )
        version = ModelVersion(
            f"{self.base.name}.p{project}.v{number}", project, parent, time.time(), trained_on, metrics, status
        )
        versions = self.root / "versions"
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=versions))
        try:
            weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(weights, str(staging / WEIGHTS_FILE), metadata={"base": self.base.name, "parent": parent})
            _fsync(staging / WEIGHTS_FILE)
            _write_synced(staging / INFO_FILE, json.dumps(asdict(version), indent=1))
            _fsync(staging)  # the folder's entries, before the rename publishes them
            os.rename(staging, versions / version.name)
            _fsync(versions)  # the rename itself
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def _sweep_abandoned_staging(self) -> None:
        """Remove the staging folders of creates that were killed before their rename (SIGKILL, out of memory).
        Only old ones: other processes share MODEL_DIR, and a fresh folder may be a create under way."""
        abandoned_before = time.time() - ABANDONED_STAGING_S
        for staging in (self.root / "versions").glob(f"{STAGING_PREFIX}*"):
            try:
                if staging.stat().st_mtime < abandoned_before:
                    shutil.rmtree(staging, ignore_errors=True)
            except FileNotFoundError:  # swept by another process meanwhile
                continue

    def promote(self, version: ModelVersion, parent: ModelVersion | None = None) -> ModelVersion:
        """Serve the fine-tuned `version` for its project from now on (`versions --serve`). With `parent`, the version
        a fine-tune trained from, only if the project still serves it: if another version was served meanwhile (a
        rollback by hand during the fine-tune), that choice stands and `version` stays a candidate. Returns the
        version the project serves now."""
        with self._project_lock(version.project):
            served = self.current(version.project)
            if parent is not None and served.name != parent.name:
                return served
            self._move_pointer(version.project, served, version)
            return version

    def roll_back_to_base(self, project: int) -> None:
        """Serve the base for `project` from now on (`versions --serve <base> --project`)."""
        with self._project_lock(project):
            self._move_pointer(project, self.current(project), self.base)

    def reject(self, version: ModelVersion) -> None:
        self._set_status(version, "rejected")

    def record_metrics(self, version: ModelVersion) -> None:
        """Store `version.metrics` as they are now (the gate's decision is known only after `create`)."""
        stored = self.get(version.name)
        stored.metrics = version.metrics
        _replace_atomically(self.root / "versions" / version.name / INFO_FILE, json.dumps(asdict(stored), indent=1))

    @contextmanager
    def _project_lock(self, project: int) -> Iterator[None]:
        """Exclusive across processes (the server and the workers share MODEL_DIR), held while deciding and changing
        what a project serves, so that no change is lost between reading the pointer and replacing it."""
        folder = self.root / "projects" / str(project)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_FILE, "a") as lock:  # released when closed, also by a process that dies holding it
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _move_pointer(self, project: int, served: ModelVersion, version: ModelVersion) -> None:
        """Point `project` from `served` to `version` (the base: no pointer); under the project's lock. The pointer is
        what serving reads; the statuses follow it."""
        if served.name == version.name:
            return
        pointer = self._pointer(project)
        if version.is_base:
            pointer.unlink(missing_ok=True)
            _fsync(pointer.parent)
        else:
            self._set_status(version, "served")
            _replace_atomically(pointer, version.name)
        if not served.is_base:
            self._set_status(served, "superseded")
        if self.on_served_change is not None:
            self.on_served_change(project, version.name)

    def _pointer(self, project: int) -> Path:
        return self.root / "projects" / str(project) / POINTER_FILE

    def _set_status(self, version: ModelVersion, status: str) -> None:
        version.status = status
        _replace_atomically(self.root / "versions" / version.name / INFO_FILE, json.dumps(asdict(version), indent=1))


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    _write_synced(partial, text)
    os.replace(partial, path)
    _fsync(path.parent)  # the replace itself
