"""All configuration, read once from the environment (and an optional `.env` file).

Label Studio's own variable names are used where they exist (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY,
BASIC_AUTH_USER, BASIC_AUTH_PASS, MODEL_DIR, REDIS_URL); ours start with XDECODER_.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def env(name: str, default=None, **kwargs):
    """A field read from the environment variable `name`."""
    if "default_factory" in kwargs:
        return Field(validation_alias=AliasChoices(name), **kwargs)
    return Field(default, validation_alias=AliasChoices(name), **kwargs)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # --- Label Studio
    label_studio_url: str | None = Field(None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    label_studio_api_key: SecretStr | None = env("LABEL_STUDIO_API_KEY")
    basic_auth_user: str | None = env("BASIC_AUTH_USER")
    basic_auth_pass: SecretStr | None = env("BASIC_AUTH_PASS")
    local_files_document_root: Path | None = env(
        "LOCAL_FILES_DOCUMENT_ROOT",
        None,
        description="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: /data/local-files/?d=... is read from here when set.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = env("LOG_LEVEL", "INFO")

    # --- storage
    model_dir: Path = env("MODEL_DIR", Path("data"))
    redis_url: str | None = env("REDIS_URL", None, description="unset: an embedded redis-server under MODEL_DIR/redis")

    # --- model
    checkpoint: str = env("XDECODER_CHECKPOINT", "xdecoder_focalt_last.pt")
    official_config: Path | None = env("XDECODER_CONFIG", None)
    device: str | None = env("XDECODER_DEVICE", None, description="cpu, cuda, cuda:1 ...; default: CUDA if available")
    short_side: int = env("XDECODER_SHORT_SIDE", 512, ge=32)
    max_long_side: int = env("XDECODER_MAX_LONG_SIDE", 1333, ge=32)
    object_mask_threshold: float = env("XDECODER_OBJECT_MASK_THRESHOLD", 0.8, ge=0, le=1)
    overlap_threshold: float = env("XDECODER_OVERLAP_THRESHOLD", 0.8, ge=0, le=1)
    batch_size: int = env("XDECODER_BATCH_SIZE", 1, ge=1)
    threads: int | None = env(
        "XDECODER_THREADS",
        None,
        ge=1,
        description="CPU threads of this process's model; default: torch's (the cores), capped by a container's quota",
    )

    # --- results
    result_max_pixels: int = env(
        "XDECODER_RESULT_MAX_PIXELS",
        4_000_000,
        ge=0,
        description="masks and polygons of larger images are made at this many pixels and scaled up; 0: no limit",
    )
    polygon_tolerance_px: float = env("XDECODER_POLYGON_TOLERANCE", 0.75, ge=0)
    polygon_max_points: int = env("XDECODER_POLYGON_MAX_POINTS", 256, ge=4)
    polygon_min_area_px: float = env("XDECODER_POLYGON_MIN_AREA", 64.0, ge=0)
    polygon_keep_holes: bool = env("XDECODER_POLYGON_HOLES", True)
    both_controls_output: Literal["polygons", "brush", "both"] = env(
        "XDECODER_BOTH_CONTROLS",
        "polygons",
        description="what to fill when an image has both PolygonLabels and BrushLabels (or BitmaskLabels)",
    )
    choices_top_k: int = env(
        "XDECODER_CHOICES_TOP_K", 3, ge=1, description='most choices a choice="multiple" <Choices> gets'
    )
    choices_min_probability: float = env(
        "XDECODER_CHOICES_MIN_PROBABILITY",
        0.2,
        ge=0,
        le=1,
        description='probability a choice="multiple" choice needs (the most probable one is always chosen)',
    )

    # --- fetching task images
    image_max_bytes: int = env("XDECODER_IMAGE_MAX_BYTES", 50 * 2**20, ge=1)
    image_max_pixels: int = env("XDECODER_IMAGE_MAX_PIXELS", 100_000_000, ge=1)
    image_timeout_s: float = env("XDECODER_IMAGE_TIMEOUT", 20.0, gt=0)
    allowed_hosts: Annotated[list[str], NoDecode] = env(
        "XDECODER_ALLOWED_HOSTS",
        default_factory=list,
        description="hosts (names, IPs or CIDR ranges) that may be fetched although private or loopback",
    )

    # --- queue and learning loop
    predict_budget_s: float = env(
        "XDECODER_PREDICT_BUDGET",
        80.0,
        gt=0,
        description="time /predict may spend before handing the rest to the queue (LS waits 100 s)",
    )
    worker_heartbeat_s: int = env(
        "XDECODER_WORKER_HEARTBEAT", 15, ge=1, description="a dead worker's job is retried about 2x this later"
    )
    worker_maintenance_s: int = env("XDECODER_WORKER_MAINTENANCE", 60, ge=1, description="how often a worker looks")
    finetune_every: int = env("XDECODER_FINETUNE_EVERY", 50, ge=1)
    finetune_cron: str = env("XDECODER_FINETUNE_CRON", "0 2 * * *")
    finetune_epochs: int = env("XDECODER_FINETUNE_EPOCHS", 4, ge=1, description="passes over the corrections")
    finetune_min_steps: int = env("XDECODER_FINETUNE_MIN_STEPS", 20, ge=1)
    finetune_max_steps: int = env("XDECODER_FINETUNE_MAX_STEPS", 400, ge=1)
    finetune_min_gain: float = env(
        "XDECODER_FINETUNE_MIN_GAIN",
        0.005,
        ge=-1.0,
        le=1.0,
        description="held-out mean IoU a fine-tuned version must gain over the served one to be served",
    )
    finetune_max_class_drop: float = env(
        "XDECODER_FINETUNE_MAX_CLASS_DROP",
        5.0,
        ge=0.0,
        le=100.0,
        description="IoU points any class with held-out pixels may lose in a fine-tuned version that is served",
    )
    train_devices: str | None = env(
        "XDECODER_TRAIN_DEVICES",
        None,
        description="e.g. cuda:0,cuda:1: each fine-tune runs data parallel over these (torch.distributed); unset: "
        "one device, the worker's",
    )
    finetune_learning_rate: float = env("XDECODER_FINETUNE_LR", 1e-4, gt=0, description="AdamW's, after warmup")
    finetune_augment: bool = env(
        "XDECODER_FINETUNE_AUGMENT", True, description="scale jitter, crop and flip of the corrections while training"
    )
    repredict_after_promotion: bool = env(
        "XDECODER_REPREDICT_AFTER_PROMOTION",
        True,
        description="after the served version changes, predict the project's unannotated tasks again with it",
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("label_studio_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
