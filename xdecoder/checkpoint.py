"""Checkpoint I/O: find (local path or Hugging Face Hub name), read, and load strictly.

The official loader copies only keys whose names and shapes match and skips the rest silently, so a
201-query checkpoint in a 101-query model runs and gives garbage. Here any mismatch is an error that
names every missing, unexpected and wrongly shaped key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import XDecoderConfig
from .model import IGNORED_CHECKPOINT_KEYS, XDecoderModel, build_model

logger = logging.getLogger(__name__)

HUB_REPO = "xdecoder/X-Decoder"
OFFICIAL_CHECKPOINTS: dict[str, XDecoderConfig] = {
    "xdecoder_focalt_last.pt": XDecoderConfig.focalt(),
    "xdecoder_focalt_best_openseg.pt": XDecoderConfig.focalt(),
    "xdecoder_focalt_last_novg.pt": XDecoderConfig.focalt(),
    "xdecoder_focall_last.pt": XDecoderConfig.focall(num_queries=201),
    "xdecoder_focall_last_oq101.pt": XDecoderConfig.focall(num_queries=101),
}
# Key in a safetensors header where our own (fine-tuned) checkpoints keep their config.
CONFIG_METADATA_KEY = "xdecoder_config"
WRAPPER_KEYS = ("module", "model", "state_dict")
KEY_PREFIXES = ("module.", "model.")
MAX_KEYS_SHOWN = 20


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: see `missing`, `unexpected` and `wrong_shape`."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        hint: str = "",
    ):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [
            f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} wrongly shaped keys"
        ]
        lines += _listing("missing", missing)
        lines += _listing("unexpected", unexpected)
        lines += _listing(
            "wrong shape", [f"{k}: checkpoint {list(got)}, model {list(want)}" for k, got, want in wrong_shape]
        )
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {title}: {item}" for item in items[:MAX_KEYS_SHOWN]]
    if len(items) > MAX_KEYS_SHOWN:
        shown.append(f"  ... and {len(items) - MAX_KEYS_SHOWN} more {title}")
    return shown


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local file, or a bare official file name fetched from the Hub into its usual cache
    (so `HF_HUB_OFFLINE=1` works once it is there)."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    name = str(checkpoint)
    if "/" in name or "\\" in name or not name.endswith((".pt", ".pth", ".safetensors")):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from huggingface_hub import hf_hub_download

    logger.info("fetching %s from the Hugging Face Hub (%s)", name, HUB_REPO)
    try:
        return Path(hf_hub_download(repo_id=HUB_REPO, filename=name))
    except Exception as error:  # offline, proxy, Hub down, ...: huggingface_hub raises many types
        raise FileNotFoundError(
            f"checkpoint {name} could not be downloaded from the Hugging Face Hub ({HUB_REPO}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
            "download it elsewhere and give its path instead (official names: " + ", ".join(OFFICIAL_CHECKPOINTS) + ")"
        ) from error


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (wrappers and `model.`/`module.` prefixes removed) and the safetensors metadata, if any."""
    path = Path(path)
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch and safetensors raise many types on a file that is not theirs
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {first_line})") from error
    return _unwrap(raw, path), metadata


def _unwrap(raw: object, path: Path) -> dict[str, Tensor]:
    while isinstance(raw, Mapping) and len(raw) == 1 and next(iter(raw)) in WRAPPER_KEYS:
        raw = next(iter(raw.values()))
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(raw).__name__})")
    tensors = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith(KEY_PREFIXES):
            key = key.split(".", 1)[1]
        tensors[key] = value
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


def load_state_dict_strict(model: XDecoderModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load every model tensor from `state_dict` or raise CheckpointMismatchError. Replaces the model's
    tensors by the checkpoint's (so a model built on the meta device needs no memory of its own)."""
    state = {k: v for k, v in state_dict.items() if k not in IGNORED_CHECKPOINT_KEYS}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(missing, unexpected, wrong_shape, _hint(state, model.config))
    model.load_state_dict(state, strict=True, assign=True)


def with_replaced_weights(model: XDecoderModel, replaced: Mapping[str, Tensor]) -> XDecoderModel:
    """A new model, on `model`'s device, with `model`'s tensors except those named in `replaced` (e.g. a fine-tuned
    version's delta). The others are shared, not copied: a version costs only the memory of what it changes."""
    state = dict(model.state_dict())
    # A name the model lacks stays as it is, so that the strict load names it as unexpected.
    state.update({k: v.to(state[k].device, state[k].dtype) if k in state else v for k, v in replaced.items()})
    with torch.device("meta"):
        copy = build_model(model.config)
    load_state_dict_strict(copy, state)
    copy.reset_constants()
    return copy.to(model.device).eval()


def _hint(state: Mapping[str, Tensor], config: XDecoderConfig) -> str:
    try:
        inferred = XDecoderConfig.from_state_dict(state)
    except ValueError:
        return ""
    if inferred == config:
        return ""
    backbone = inferred.backbone
    return (
        f"the checkpoint looks like a {backbone.variant} backbone (embed dim {backbone.embed_dim}, depths "
        f"{list(backbone.depths)}) with {inferred.decoder.num_queries} queries; "
        "pass the matching config (or config=None to infer it)"
    )


def load_model(
    checkpoint: str | Path,
    config: XDecoderConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> XDecoderModel:
    """Load an X-Decoder checkpoint for inference.

    checkpoint: a path (`.pt`/`.pth` via `torch.load(weights_only=True)`, or `.safetensors`), or an
        official file name such as `xdecoder_focalt_last.pt`, downloaded from the Hub.
    config: the architecture; by default the official one for official names, the one stored in our
        own safetensors checkpoints, or else inferred from the tensor shapes.
    device: default CUDA when available, else CPU. dtype: default float32.
    """
    path = resolve_checkpoint(checkpoint)
    state, metadata = read_checkpoint(path)
    if config is None:
        if CONFIG_METADATA_KEY in metadata:
            config = XDecoderConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        else:
            config = OFFICIAL_CHECKPOINTS.get(path.name) or XDecoderConfig.from_state_dict(state)
    with torch.device("meta"):
        model = build_model(config)
    load_state_dict_strict(model, state)
    model.reset_constants()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RuntimeError(f"device {device} asked for, but this torch sees {torch.cuda.device_count()} CUDA devices")
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_checkpoint(model: XDecoderModel, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model` as safetensors with its config in the header, atomically (a crash leaves either
    the old file or none, never half of one)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), **(extra_metadata or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    partial.replace(path)
    return path
