"""X-Decoder in plain PyTorch: official checkpoints, panoptic and referring segmentation, captioning,
image-text ranking and image-level classification.

Public API: XDecoderConfig, build_model, load_model, Predictor (and the result types).
"""

from .checkpoint import CheckpointMismatchError, load_model, save_checkpoint
from .config import XDecoderConfig
from .image import ResizePolicy
from .model import XDecoderModel, build_model
from .predictor import (
    Caption,
    PanopticResult,
    Prediction,
    Predictor,
    PreparedImage,
    ReferringResult,
    Segment,
    SemanticResult,
    TextRanking,
    Vocabulary,
)

__all__ = [
    "Caption",
    "CheckpointMismatchError",
    "PanopticResult",
    "Prediction",
    "Predictor",
    "PreparedImage",
    "ReferringResult",
    "ResizePolicy",
    "Segment",
    "SemanticResult",
    "TextRanking",
    "Vocabulary",
    "XDecoderConfig",
    "XDecoderModel",
    "build_model",
    "load_model",
    "save_checkpoint",
]
