"""Our modules produce exactly the official parameter names and shapes."""

import json
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import _variants
from runtime.model.config import NOVAConfig, num_heads_for, parse_arch
from runtime.model.transformer import NOVATransformer3DModel

KEYS = json.loads((Path(__file__).parent / "data" / "nova_transformer_keys.json").read_text())


@pytest.mark.parametrize("variant", sorted(KEYS))
def test_state_dict_matches_released_checkpoint(variant):
    config = NOVAConfig.from_dict(_variants()[variant]["transformer"])
    with torch.device("meta"):
        model = NOVATransformer3DModel(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == KEYS[variant]["keys"]
    params = sum(p.numel() for p in model.parameters())
    assert params == KEYS[variant]["params"]


def test_head_counts_follow_official_registry():
    assert [num_heads_for(w) for w in (768, 1024, 1536)] == [12, 16, 16]
    assert num_heads_for(64) == 4 and num_heads_for(2048) == 128
    assert parse_arch("mlp_d3w1280", "mlp") == (3, 1280)
    with pytest.raises(ValueError, match="vit_d<depth>w<width>"):
        parse_arch("vit_large", "vit")


def test_config_ignores_metadata_and_rejects_unknown_fields():
    raw = dict(_variants()["tiny-t2i"]["transformer"], _diffusers_version="0.31.0", _class_name="X")
    assert NOVAConfig.from_dict(raw).width == 64
    with pytest.raises(ValueError, match="unknown fields: colour"):
        NOVAConfig.from_dict(dict(raw, colour=1))
    with pytest.raises(ValueError, match="lacks required fields: arch"):
        NOVAConfig.from_dict({k: v for k, v in raw.items() if k != "arch"})
    with pytest.raises(ValueError, match="image_base_size"):
        NOVAConfig.from_dict(dict(raw, image_base_size=[8, 8]))


def test_derived_geometry_of_released_configs():
    t2v = NOVAConfig.from_dict(_variants()["d48w1024-osp480"]["transformer"])
    assert (t2v.latent_size, t2v.num_image_tokens, t2v.num_video_tokens) == ((60, 96), 1440, 360)
    assert t2v.has_motion and t2v.num_condition_tokens == 258 and t2v.mlp_width == 1280
    t2i = NOVAConfig.from_dict(_variants()["d48w1536-sdxl1024"]["transformer"])
    assert (t2i.num_image_tokens, t2i.num_video_tokens, t2i.num_heads) == (4096, 1024, 16)
    assert not t2i.has_motion and t2i.num_condition_tokens == 256
