"""Label Studio's REST API, through label-studio-sdk: list a project's tasks, write predictions.

Used by the pre-annotation command and workers (the /predict path answers Label Studio directly).
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


@dataclass
class LabelStudioTask:
    id: int
    data: dict[str, Any]
    model_versions: set[str] = field(default_factory=set)  # of the predictions it already has

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
                raise LabelStudioError(f"Label Studio at {self.url} has no {what} (404)") from None
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
                    yield LabelStudioTask(task.id, dict(task.data or {}), versions)
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
