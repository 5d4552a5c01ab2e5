"""The payloads Label Studio 1.23 sends to an ML backend (shapes in shared/reference/label-studio.md).

Only what we read is declared; everything else Label Studio adds is accepted and ignored, so new
fields in later versions do not break the contract. Malformed payloads fail validation (a 422 that
names the field), never deep inside the model code.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .versions import project_id


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow")


def _valid_project(value: str | int | None) -> str | int | None:
    project_id(value)  # raises ValueError (a 422) for anything that is not a project reference
    return value


# How the ML API names a project: "<id>.<created timestamp>", or the id alone.
ProjectRef = Annotated[str | int | None, AfterValidator(_valid_project)]


class SetupRequest(Payload):
    project: ProjectRef = None
    schema_: str | None = Field(None, alias="schema")  # the labeling config
    hostname: str | None = None
    access_token: str | None = None
    extra_params: Any = None


class PredictParams(Payload):
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = None


class Task(Payload):
    id: int | None = None
    data: dict[str, Any]


class PredictRequest(Payload):
    tasks: list[Task]
    project: ProjectRef = None
    label_config: str | None = None
    params: PredictParams | None = None


class WebhookEvent(Payload):
    """Any webhook: annotation events carry `annotation`/`task` (lists for the bulk ANNOTATIONS_CREATED),
    deletions `annotations` (ids), START_TRAINING only `project`."""

    action: str = Field(min_length=1)
    project: dict[str, Any] | int | str | None = None

    @property
    def project_id(self) -> int | None:
        if isinstance(self.project, dict):
            return project_id(self.project.get("id"))
        return project_id(self.project)

    @field_validator("project")
    @classmethod
    def _project(cls, value):
        _valid_project(value.get("id") if isinstance(value, dict) else value)
        return value


class TrainRequest(Payload):
    """Label Studio's older training call (POST /train), sent when its webhook-based training is off."""

    project: ProjectRef = None
    annotations: list[dict[str, Any]] = Field(default_factory=list)  # tasks, each with its annotations
    label_config: str | None = None
