"""Model versions: the base checkpoint and the fine-tuned versions of each project.

Label Studio keys predictions by `model_version` (it skips tasks that already have one of the current
version, and serves the lowest-scored tasks of the current version first), so the name must say which
weights made a prediction and must be stable across restarts.

    base:        the checkpoint's file stem, e.g. "xdecoder_focalt_last"
    fine-tuned:  "<base>.p<project>.v<n>", e.g. "xdecoder_focalt_last.p3.v2"

Layout under MODEL_DIR (shared by the server and the workers, which see each other's changes through it):

    versions/<name>/weights.safetensors   the tensors fine-tuning changed (the rest come from the base)
    versions/<name>/version.json          parent, creation time, training size, evaluation, status
    projects/<id>/current                 the version served for that project (absent: the base)

Every write goes to a temporary name first and is renamed into place, so a crash never leaves a
half-written version or pointer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WEIGHTS_FILE = "weights.safetensors"
INFO_FILE = "version.json"


@dataclass
class ModelVersion:
    name: str
    project: int | None = None  # None for the base
    parent: str | None = None
    created_at: float = field(default_factory=time.time)
    trained_on: int = 0  # corrections used
    metrics: dict = field(default_factory=dict)  # evaluation of this version and its parent
    status: str = "base"  # base | served | candidate | rejected

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


class VersionRegistry:
    def __init__(self, model_dir: Path, checkpoint: str):
        self.root = Path(model_dir)
        self.base = ModelVersion(base_version_name(checkpoint))
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        (self.root / "projects").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- reading
    def current(self, project: int | None) -> ModelVersion:
        """The version served for a project: its promoted fine-tune, else the base."""
        if project is None:
            return self.base
        pointer = self.root / "projects" / str(project) / "current"
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return self.base
        return self.get(name)

    def get(self, name: str) -> ModelVersion:
        if name == self.base.name:
            return self.base
        info = self.root / "versions" / name / INFO_FILE
        if not info.is_file():
            raise KeyError(f"unknown model version {name!r}")
        return ModelVersion(**json.loads(info.read_text()))

    def weights_path(self, version: ModelVersion) -> Path:
        return self.root / "versions" / version.name / WEIGHTS_FILE

    def all(self, project: int | None = None) -> list[ModelVersion]:
        """The base and every fine-tuned version (of one project, if given), oldest first."""
        versions = []
        for info in (self.root / "versions").glob(f"*/{INFO_FILE}"):
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

        number = 1 + max(
            (int(v.name.rsplit(".v", 1)[1]) for v in self.all(project) if not v.is_base),
            default=0,
        )
        version = ModelVersion(
            f"{self.base.name}.p{project}.v{number}", project, parent, time.time(), trained_on, metrics, status
        )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / "versions"))
        try:
            weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(weights, str(staging / WEIGHTS_FILE), metadata={"base": self.base.name, "parent": parent})
            _write_synced(staging / INFO_FILE, json.dumps(asdict(version), indent=1))
            os.rename(staging, self.root / "versions" / version.name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def promote(self, version: ModelVersion) -> None:
        """Serve `version` for its project from now on."""
        self._set_status(version, "served")
        folder = self.root / "projects" / str(version.project)
        folder.mkdir(parents=True, exist_ok=True)
        _replace_atomically(folder / "current", version.name)

    def reject(self, version: ModelVersion) -> None:
        self._set_status(version, "rejected")

    def _set_status(self, version: ModelVersion, status: str) -> None:
        version.status = status
        _replace_atomically(self.root / "versions" / version.name / INFO_FILE, json.dumps(asdict(version), indent=1))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    _write_synced(partial, text)
    os.replace(partial, path)
