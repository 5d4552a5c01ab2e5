"""The architecture: state-dict keys and shapes equal the official manifests; configs read and inferred."""

import pytest
import torch
import yaml

from tests.helpers import PARITY_FIXTURES, REFERENCE, tiny_config
from xdecoder import XDecoderConfig, build_model
from xdecoder.model import IGNORED_CHECKPOINT_KEYS


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"official key manifest {path} not available (../shared is absent in this checkout)")
    entries = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        entries.append((key, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())))
    return entries


def meta_state_shapes(config: XDecoderConfig) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = build_model(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize(
    ("config", "manifest", "entries"),
    [
        (XDecoderConfig.focalt(), "focalt_state_dict_keys.txt", 726),
        (XDecoderConfig.focall(), "focall_state_dict_keys.txt", 930),
    ],
)
def test_presets_reproduce_official_state_dict(config, manifest, entries):
    official = read_manifest(manifest)
    assert len(official) == entries
    expected = [(k, s) for k, s in official if k not in IGNORED_CHECKPOINT_KEYS]
    assert meta_state_shapes(config) == expected  # same keys, same shapes, same order


@pytest.mark.parametrize(
    ("config", "count"), [(XDecoderConfig.focalt(), 164_493_809), (XDecoderConfig.focall(), 341_551_353)]
)
def test_parameter_counts_match_the_official_models(config, count):
    with torch.device("meta"):
        model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == count  # the manifests' headers


def test_config_inferred_from_official_shapes_is_the_preset():
    for preset in (XDecoderConfig.focalt(), XDecoderConfig.focall(), XDecoderConfig.focall(num_queries=101)):
        with torch.device("meta"):
            state = build_model(preset).state_dict()
        assert XDecoderConfig.from_state_dict(state) == preset


def test_official_yaml_is_read():
    path = PARITY_FIXTURES / "A" / "config.yaml"
    if not path.exists():
        pytest.skip("parity fixture A not available (../shared is absent in this checkout)")
    config = XDecoderConfig.from_official_yaml(path)
    assert config.backbone.variant == "focal_dw"
    assert config.backbone.depths == (1, 1, 2, 1)
    assert config.decoder.num_queries == 11 and config.decoder.nheads == 4 and config.decoder.dec_layers == 4
    assert config.text.width == 32 and config.text.heads == 4
    assert config.pixel_decoder.transformer_layers == 2
    # The mapping form gives the same config.
    assert XDecoderConfig.from_official_yaml(yaml.safe_load(path.read_text())) == config


def test_official_yaml_rejects_unsupported_options():
    path = PARITY_FIXTURES / "A" / "config.yaml"
    if not path.exists():
        pytest.skip("parity fixture A not available (../shared is absent in this checkout)")
    cfg = yaml.safe_load(path.read_text())
    cfg["MODEL"]["DECODER"]["PRE_NORM"] = True
    with pytest.raises(ValueError, match="PRE_NORM"):
        XDecoderConfig.from_official_yaml(cfg)
    cfg["MODEL"]["DECODER"]["PRE_NORM"] = False
    cfg["MODEL"]["BACKBONE"]["NAME"] = "davit"
    with pytest.raises(ValueError, match="davit"):
        XDecoderConfig.from_official_yaml(cfg)


def test_config_dict_round_trip():
    config = tiny_config("focal")
    assert XDecoderConfig.from_dict(config.to_dict()) == config


def test_any_number_of_queries_and_both_variants_build():
    for variant in ("focal_dw", "focal"):
        for queries in (5, 11, 33):
            shapes = dict(meta_state_shapes(tiny_config(variant, queries)))
            assert shapes["sem_seg_head.predictor.query_feat.weight"] == (queries, 64)
            has_dw = "backbone.layers.0.blocks.0.dw1.weight" in shapes
            assert has_dw == (variant == "focal_dw")
