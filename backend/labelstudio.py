"""Label Studio's REST API, through label-studio-sdk: list a project's tasks, write predictions.

Used by the pre-annotation command and workers (the /predict path answers Label Studio directly).
The SDK accepts both kinds of API key (legacy token, or a Personal Access Token it refreshes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .settings import Settings

PAGE_SIZE = 100


class NotConfigured(RuntimeError):
    """LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is missing."""


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

        self.client = LabelStudio(
            base_url=settings.label_studio_url,
            api_key=settings.label_studio_api_key.get_secret_value(),
            timeout=60,
        )

    def label_config(self, project: int) -> str:
        return self.client.projects.get(id=project).label_config

    def tasks(self, project: int, ids: Sequence[int] | None = None) -> Iterator[LabelStudioTask]:
        """The project's tasks (or only `ids`), with the model versions of their predictions."""
        from label_studio_sdk.core.api_error import ApiError

        wanted = set(ids) if ids is not None else None
        page = 1
        while True:
            try:
                items = self.client.tasks.list(project=project, fields="all", page=page, page_size=PAGE_SIZE).items
            except ApiError as error:
                if error.status_code == 404:  # Label Studio answers 404 past the last page
                    return
                raise
            for task in items:
                if wanted is None or task.id in wanted:
                    predictions = getattr(task, "predictions", None) or []
                    versions = {p.model_version for p in predictions if p.model_version}
                    yield LabelStudioTask(task.id, dict(task.data or {}), versions)
            if len(items) < PAGE_SIZE:
                return
            page += 1

    def prediction_versions(self, task: int) -> set[str]:
        return {p.model_version for p in self.client.predictions.list(task=task) if p.model_version}

    def create_prediction(self, project: int, task: int, result: list[dict], score: float, model_version: str) -> None:
        self.client.predictions.create(
            task=task, project=project, result=result, score=score, model_version=model_version
        )
