"""Loading checkpoints: formats, wrappers, strictness, Hub names, saving."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xdecoder.checkpoint as checkpoint_module
from tests.helpers import official_state_dict, tiny_config, tiny_model, write_tiny_checkpoint
from xdecoder import CheckpointMismatchError, XDecoderConfig, load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_pt_loads_with_inferred_config(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.pt", seed=3)
    model = load_model(path, device="cpu")
    assert model.config == tiny_config()
    assert same_weights(model, tiny_model(seed=3))
    assert not model.training
    assert model.device.type == "cpu"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"module": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"model.{k}": v for k, v in sd.items()}},
    ],
    ids=["module-wrapper", "module-prefix", "model-wrapper-and-prefix"],
)
def test_training_snapshot_wrappers_and_prefixes_are_removed(tmp_path, wrap):
    reference = tiny_model(seed=1)
    torch.save(wrap(official_state_dict(reference)), tmp_path / "snap.pt")
    assert same_weights(load_model(tmp_path / "snap.pt", device="cpu"), reference)


def test_safetensors_keep_their_config(tmp_path):
    reference = tiny_model(seed=2, variant="focal", num_queries=7)
    save_checkpoint(reference, tmp_path / "tiny.safetensors")
    loaded = load_model(tmp_path / "tiny.safetensors", device="cpu")
    assert loaded.config == reference.config
    assert same_weights(loaded, reference)
    assert not (tmp_path / "tiny.safetensors.partial").exists()


def test_dtype_argument_converts_weights(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.pt")
    model = load_model(path, device="cpu", dtype=torch.bfloat16)
    assert model.backbone_proj.dtype == torch.bfloat16


def test_other_query_count_is_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.pt")  # 11 queries
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(path, config=tiny_config(num_queries=21), device="cpu")
    wrong = {k: (got, want) for k, got, want in error.value.wrong_shape}
    assert wrong["sem_seg_head.predictor.query_feat.weight"] == ((11, 64), (21, 64))
    assert wrong["sem_seg_head.predictor.query_embed.weight"] == ((11, 64), (21, 64))
    assert not error.value.missing and not error.value.unexpected
    assert "11 queries" in str(error.value)  # the hint names what the checkpoint is


def test_other_backbone_variant_is_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.pt")  # focal_dw
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(path, config=tiny_config(variant="focal"), device="cpu")
    assert "backbone.layers.0.blocks.0.dw1.weight" in error.value.unexpected
    assert not error.value.missing
    message = str(error.value)
    assert "unexpected: backbone.layers.0.blocks.0.dw1.weight" in message
    assert "focal_dw" in message


def test_missing_keys_are_listed(tmp_path):
    state = official_state_dict(tiny_model())
    del state["sem_seg_head.predictor.class_embed"]
    del state["backbone.norm3.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(tmp_path / "partial.pt", config=tiny_config(), device="cpu")
    assert sorted(error.value.missing) == ["backbone.norm3.weight", "sem_seg_head.predictor.class_embed"]


def test_pickled_objects_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weights": Payload()}, f)
    with pytest.raises(ValueError, match="evil.pt is not a readable checkpoint .UnpicklingError: Weights only load"):
        load_model(tmp_path / "evil.pt", config=tiny_config(), device="cpu")


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=f"{name} is not a readable checkpoint") as raised:
        load_model(tmp_path / name, config=tiny_config(), device="cpu")
    assert "\n" not in str(raised.value)


def test_a_cuda_device_this_torch_does_not_have_is_a_clear_error(tmp_path, monkeypatch):
    write_tiny_checkpoint(tmp_path / "tiny.pt")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="device cuda:3 asked for, but this torch sees 1 CUDA devices"):
        load_model(tmp_path / "tiny.pt", config=tiny_config(), device="cuda:3")


def test_official_names_resolve_from_the_hub_cache_offline(tmp_path):
    """A bare official name goes through huggingface_hub's own cache: filled as a download would leave it, with
    HF_HUB_OFFLINE=1 so that nothing can reach the network. A fresh interpreter, because huggingface_hub reads
    those variables when it is imported."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + checkpoint_module.HUB_REPO.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    write_tiny_checkpoint(repo / "snapshots" / revision / "custom_tiny.pt", seed=5)
    script = (
        "from xdecoder import load_model; from tests.helpers import tiny_config; "
        "model = load_model('custom_tiny.pt', config=tiny_config(), device='cpu'); "
        "print(model.config.decoder.num_queries, float(model.backbone_proj.sum()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    queries, weight_sum = done.stdout.split()
    assert int(queries) == 11
    assert float(weight_sum) == pytest.approx(float(tiny_model(seed=5).backbone_proj.detach().sum()), abs=1e-4)

    missing = script.replace("custom_tiny.pt", "not_cached.pt")
    done = subprocess.run([sys.executable, "-c", missing], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "LocalEntryNotFoundError" in done.stderr  # offline: refused, not fetched
    assert (
        "FileNotFoundError: checkpoint not_cached.pt could not be downloaded from the Hugging Face Hub" in done.stderr
    )


def test_official_names_use_the_official_configs():
    assert checkpoint_module.OFFICIAL_CHECKPOINTS["xdecoder_focalt_last.pt"] == XDecoderConfig.focalt()
    assert checkpoint_module.OFFICIAL_CHECKPOINTS["xdecoder_focall_last.pt"].decoder.num_queries == 201
    assert checkpoint_module.OFFICIAL_CHECKPOINTS["xdecoder_focall_last_oq101.pt"].decoder.num_queries == 101


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere" / "model.pt")


def test_replaced_weights_share_the_rest():
    base = tiny_model(seed=1)
    name = "sem_seg_head.predictor.query_feat.weight"
    new = torch.ones_like(base.state_dict()[name], dtype=torch.float64)  # cast to the model's dtype
    copy = checkpoint_module.with_replaced_weights(base, {name: new})
    assert torch.equal(copy.state_dict()[name], new.float()) and copy.state_dict()[name].dtype == torch.float32
    assert not torch.equal(base.state_dict()[name], copy.state_dict()[name])
    other = "backbone.patch_embed.proj.weight"
    assert copy.state_dict()[other].data_ptr() == base.state_dict()[other].data_ptr()
    assert not copy.training
    with pytest.raises(CheckpointMismatchError, match="1 unexpected"):
        checkpoint_module.with_replaced_weights(base, {"no.such.weight": new})
