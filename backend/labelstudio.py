"""Label Studio's REST API, through label-studio-sdk: list a project's tasks, write predictions, read back the
annotations a webhook names (so that only what Label Studio confirms is trained on), and keep the project's model
version on the version we serve (docs/label_studio_sync.md).

Used by the pre-annotation command and the workers (the /predict path answers Label Studio directly).
The SDK accepts both kinds of API key (legacy token, or a Personal Access Token it refreshes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .settings import Settings

PAGE_SIZE = 100


class NotConfigured(RuntimeError):
    """LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is missing."""


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says what to check."""


class NotInLabelStudio(LabelStudioError):
    """Label Studio answered 404: it has no such project, task or annotation (never had, or it was deleted)."""


@dataclass
class LabelStudioTask:
    id: int
    data: dict[str, Any]
    model_versions: set[str] = field(default_factory=set)  # of the predictions it already has
    annotated: bool = False  # it has at least one annotation (a skipped one included)

    def to_payload(self) -> dict[str, Any]:
        """The shape /predict receives, which ModelService.predict takes."""
        return {"id": self.id, "data": self.data}


class LabelStudioAPI:
    def __init__(self, settings: Settings):
        if not settings.label_studio_url or settings.label_studio_api_key is None:
            raise NotConfigured(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to read tasks and write predictions"
            )
        from label_studio_sdk import LabelStudio

        self.url = settings.label_studio_url
        self.client = LabelStudio(
            base_url=settings.label_studio_url,
            api_key=settings.label_studio_api_key.get_secret_value(),
            timeout=60,
        )

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """SDK and transport errors as one LabelStudioError naming `what` was asked and what to check."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except ApiError as error:
            if error.status_code in (401, 403):
                raise LabelStudioError(
                    f"Label Studio at {self.url} refused the API key ({error.status_code}) for {what}: "
                    "check LABEL_STUDIO_API_KEY"
                ) from None
            if error.status_code == 404:
                raise NotInLabelStudio(f"Label Studio at {self.url} has no {what} (404)") from None
            raise LabelStudioError(
                f"Label Studio at {self.url} answered {error.status_code} for {what}: {str(error.body)[:200]}"
            ) from error
        except httpx.HTTPError as error:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url} for {what} ({type(error).__name__}: {error}): "
                "check LABEL_STUDIO_URL"
            ) from error

    def label_config(self, project: int) -> str:
        with self._call(f"project {project}"):
            return self.client.projects.get(id=project).label_config

    def tasks(self, project: int, ids: Sequence[int] | None = None) -> Iterator[LabelStudioTask]:
        """The project's tasks (or only `ids`), with the model versions of their predictions."""
        from label_studio_sdk.core.api_error import ApiError

        wanted = set(ids) if ids is not None else None
        page = 1
        while True:
            with self._call(f"the tasks of project {project}"):
                try:
                    items = self.client.tasks.list(project=project, fields="all", page=page, page_size=PAGE_SIZE).items
                except ApiError as error:
                    if error.status_code != 404:
                        raise
                    return  # Label Studio answers 404 past the last page
            for task in items:
                if wanted is None or task.id in wanted:
                    predictions = getattr(task, "predictions", None) or []
                    versions = {p.model_version for p in predictions if p.model_version}
                    annotated = bool(getattr(task, "annotations", None) or getattr(task, "total_annotations", 0))
                    yield LabelStudioTask(task.id, dict(task.data or {}), versions, annotated)
            if len(items) < PAGE_SIZE:
                return
            page += 1

    def prediction_versions(self, task: int) -> set[str]:
        with self._call(f"the predictions of task {task}"):
            return {p.model_version for p in self.client.predictions.list(task=task) if p.model_version}

    def create_prediction(self, project: int, task: int, result: list[dict], score: float, model_version: str) -> None:
        with self._call(f"a prediction for task {task}"):
            self.client.predictions.create(
                task=task, project=project, result=result, score=score, model_version=model_version
            )

    # ------------------------------------------------------------------------ what webhooks claim
    def annotation(self, annotation_id: int) -> dict[str, Any]:
        """The annotation as Label Studio has it now: id, project, task, result, was_cancelled, completed_by,
        updated_at. NotInLabelStudio if it has none by that id."""
        with self._call(f"annotation {annotation_id}"):
            found = self.client.annotations.get(id=annotation_id)
        return {
            "id": found.id,
            "project": found.project,
            "task": found.task,
            "result": list(found.result or []),
            "was_cancelled": bool(found.was_cancelled),
            "completed_by": found.completed_by,
            "updated_at": found.updated_at.isoformat() if found.updated_at else "",
        }

    def task(self, task_id: int) -> dict[str, Any]:
        """{id, project, data} of a task; NotInLabelStudio if it has none by that id."""
        with self._call(f"task {task_id}"):
            found = self.client.tasks.get(id=str(task_id))
        return {"id": found.id, "project": getattr(found, "project", None), "data": dict(found.data or {})}

    # ------------------------------------------------------------------------ the project's model version
    def show_model_version(self, project: int, version: str, ours: set[str], settings: Settings) -> list[str]:
        """Make `version` the model version Label Studio shows and sorts by for `project`: our ML backends (those
        whose model version, from our /setup, is one of `ours`) take it as their title, and the project's model
        version follows. Label Studio averages the Prediction score column over the predictions of the project's
        model version only, and asks a connected backend for predictions only while that model version is the
        backend's title: so both must be `version`. Returns what was changed (empty: nothing to change)."""
        changed = []
        with self._call(f"the ML backends of project {project}"):
            backends = self.client.ml.list(project=project)
        for backend in backends:
            if backend.model_version not in ours or backend.title == version:
                continue
            auth = {}
            if backend.auth_method == "BASIC_AUTH" and settings.basic_auth_enabled:
                auth = {
                    "auth_method": "BASIC_AUTH",
                    "basic_auth_user": settings.basic_auth_user,
                    "basic_auth_pass": settings.basic_auth_pass.get_secret_value(),
                }
            # Label Studio checks the backend again on every change (health, then setup), which needs its URL, its
            # project and its credentials in the request (1.23.2 answers 500 without the project).
            with self._call(f"ML backend {backend.id} of project {project}"):
                self.client.ml.update(id=backend.id, url=backend.url, project=project, title=version, **auth)
            changed.append(f"ML backend {backend.id} title {backend.title!r} -> {version!r}")
        with self._call(f"project {project}"):
            current = self.client.projects.get(id=project).model_version
            if current != version:
                self.client.projects.update(id=project, model_version=version)
                changed.append(f"project model version {current!r} -> {version!r}")
        return changed
