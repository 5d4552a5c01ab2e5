"""Parity with the official X-Decoder: `python -m xdecoder.parity` on the shared fixtures."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import PARITY_FIXTURES
from xdecoder import parity

FIXTURE_A = PARITY_FIXTURES / "A"

pytestmark = pytest.mark.skipif(
    not (FIXTURE_A / "meta.json").exists(),
    reason=f"parity fixtures not found at {PARITY_FIXTURES} (the shared folder beside the checkout)",
)


def test_fixture_a_matches_the_official_outputs():
    lines = []
    code = parity.main([str(FIXTURE_A)], out=lines.append)
    failed = [line for line in lines if line.startswith("FAIL")]
    assert code == 0, "\n".join(failed)
    assert lines[-1].endswith(" 0 failed")
    names = " ".join(lines)
    for stage in (
        "meta/tokenizer_cases",
        "text/class_embeddings",
        "backbone/res5",
        "pixel_decoder/mask_features",
        "predictor_seg/pred_masks",
        "seg_outputs/panoptic_id_map",
        "grounding/masks_output",
        "batch2/",
    ):
        assert stage in names  # fmt: skip


def test_a_wrong_weight_is_caught(tmp_path):
    """The tool must be able to fail: perturb one decoder weight slightly and run it as users do."""
    for item in FIXTURE_A.iterdir():
        if item.name != "checkpoint.pt":
            (tmp_path / item.name).symlink_to(item)
    state = torch.load(FIXTURE_A / "checkpoint.pt", weights_only=True)
    weight = state["sem_seg_head.predictor.transformer_ffn_layers.0.linear2.weight"]
    weight += 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    torch.save(state, tmp_path / "checkpoint.pt")
    run = subprocess.run([sys.executable, "-m", "xdecoder.parity", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "FAIL  predictor_seg/pred_masks" in run.stdout
    assert "PASS  backbone/res2" in run.stdout  # stages before the change still agree
