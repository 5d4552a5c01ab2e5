"""Parity with the official X-Decoder: `python -m xdecoder.parity` on the shared fixtures."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import PARITY_FIXTURES
from xdecoder import parity

FIXTURE_A = PARITY_FIXTURES / "A"
FIXTURE_C = PARITY_FIXTURES / "C"  # captioning-capable (80 queries, text width = projection)


def needs(fixture):
    return pytest.mark.skipif(
        not (fixture / "meta.json").exists(),
        reason=f"parity fixture {fixture.name} not found at {PARITY_FIXTURES} (the shared folder beside the checkout)",
    )


def run_tool(fixture) -> tuple[int, list[str]]:
    lines = []
    code = parity.main([str(fixture)], out=lines.append)
    return code, lines


def copy_with_checkpoint(fixture, tmp_path, change) -> None:
    """The fixture's files (linked) with a checkpoint whose state dict `change` altered."""
    for item in fixture.iterdir():
        if item.name != "checkpoint.pt":
            (tmp_path / item.name).symlink_to(item)
    state = torch.load(fixture / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "checkpoint.pt")


def perturb(state, key: str) -> None:
    state[key] += 0.01 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))


@needs(FIXTURE_A)
def test_fixture_a_matches_the_official_outputs():
    code, lines = run_tool(FIXTURE_A)
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
        "retrieval/similarity_ensemble",
        "retrieval/text_rank",
        "retrieval/classification_logits",
        "retrieval/Predictor.classify probabilities",
    ):
        assert stage in names  # fmt: skip
    checked = next(line for line in lines if line.startswith("files checked: "))
    assert "retrieval.npz" in checked and "batch2.npz" in checked
    assert not any(line.startswith("files NOT checked") for line in lines)


@needs(FIXTURE_C)
def test_fixture_c_captions_and_retrieval_match_the_official_outputs():
    code, lines = run_tool(FIXTURE_C)
    failed = [line for line in lines if line.startswith("FAIL")]
    assert code == 0, "\n".join(failed)
    names = " ".join(lines)
    for check in (
        "PASS  captioning/generated_token_ids",
        "PASS  captioning/step_topk_ids",
        "PASS  captioning/step_logits_first",
        "PASS  captioning/step0_outputs_captioning_all_layers",
        "PASS  captioning/last_step_outputs_captioning",
        "PASS  captioning.json/Predictor.caption text",
        "PASS  retrieval/similarity_ensemble",
    ):
        assert check in names
    assert "files checked: captioning.npz, captioning.json, retrieval.npz" in lines


@needs(FIXTURE_A)
def test_a_wrong_weight_is_caught(tmp_path):
    """The tool must be able to fail: perturb one decoder weight slightly and run it as users do."""
    copy_with_checkpoint(
        FIXTURE_A, tmp_path, lambda s: perturb(s, "sem_seg_head.predictor.transformer_ffn_layers.0.linear2.weight")
    )
    run = subprocess.run([sys.executable, "-m", "xdecoder.parity", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "FAIL  predictor_seg/pred_masks" in run.stdout
    assert "PASS  backbone/res2" in run.stdout  # stages before the change still agree


@needs(FIXTURE_C)
def test_a_wrong_captioning_weight_is_caught(tmp_path):
    copy_with_checkpoint(FIXTURE_C, tmp_path, lambda s: perturb(s, "sem_seg_head.predictor.caping_embed"))
    run = subprocess.run([sys.executable, "-m", "xdecoder.parity", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "FAIL  captioning/step_caption_embedding" in run.stdout
    assert "PASS  retrieval/similarity_ensemble" in run.stdout  # the captioning head plays no part in retrieval


@needs(FIXTURE_C)
def test_a_fixture_without_captioning_support_says_why(tmp_path):
    """A captioning.npz beside a model that cannot caption fails with the reason, not a crash."""
    copy_with_checkpoint(FIXTURE_C, tmp_path, lambda s: None)
    (tmp_path / "config.yaml").unlink()
    config = (FIXTURE_C / "config.yaml").read_text().replace("NUM_OBJECT_QUERIES: 80", "NUM_OBJECT_QUERIES: 11")
    (tmp_path / "config.yaml").write_text(config)
    state = torch.load(FIXTURE_C / "checkpoint.pt", weights_only=True)
    for key in ("query_feat.weight", "query_embed.weight"):
        state[f"sem_seg_head.predictor.{key}"] = state[f"sem_seg_head.predictor.{key}"][:11]
    torch.save(state, tmp_path / "checkpoint.pt")
    code, lines = run_tool(tmp_path)
    assert code == 1
    assert any(
        line.startswith("FAIL  captioning/model can caption (official captioning needs at least 77") for line in lines
    )
