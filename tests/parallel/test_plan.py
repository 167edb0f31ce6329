"""Layout rules without processes: splits, clear errors for impossible layouts, head padding that changes nothing."""

from __future__ import annotations

import pytest
import torch

from stitch.errors import StitchConfigError
from stitch.layout import Layout, local_name, shard_rule, split_layers, stage_of
from stitch.models.vision import VisionEncoder
from stitch.parallel.tensor import apply_vision_tp
from tests.parallel.common import tiny_config


def test_split_layers_even_uneven_and_empty_stage():
    assert [len(r) for r in split_layers(4, 3)] == [1, 1, 2]  # extras on later stages (stage 0 has the ViT)
    assert split_layers(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    assert split_layers(4, 3, [0, 2, 2])[0] == range(0, 0)
    with pytest.raises(StitchConfigError, match="sums to 5"):
        split_layers(4, 2, [2, 3])
    with pytest.raises(StitchConfigError, match="3 entries but there are 2"):
        split_layers(4, 2, [1, 1, 2])


def test_stage_assignment_and_renumbering():
    ranges = split_layers(4, 3, [2, 1, 1])
    assert stage_of("vision.layers.1.attn.q_proj.weight", ranges) == 0
    assert stage_of("projector.linear_1.weight", ranges) == 0
    assert stage_of("llm.embed_tokens.weight", ranges) == 0
    assert stage_of("llm.layers.2.mlp.up_proj.weight", ranges) == 1
    assert stage_of("llm.norm.weight", ranges) == 2
    assert stage_of("llm.lm_head.weight", ranges) == 2
    assert local_name("llm.layers.3.mlp.up_proj.weight", ranges) == "llm.layers.0.mlp.up_proj.weight"


def test_shard_rules():
    cfg = tiny_config()
    assert shard_rule("llm.layers.0.self_attn.o_proj.weight", cfg).dim == 1
    assert shard_rule("llm.layers.0.self_attn.k_proj.weight", cfg).dim == 0
    assert shard_rule("llm.embed_tokens.weight", cfg).dim == 0
    assert shard_rule("llm.norm.weight", cfg).dim is None
    rule = shard_rule("vision.layers.0.attn.q_norm.weight", cfg)
    assert (rule.dim, rule.vision, rule.heads) == (0, True, True)
    assert shard_rule("vision.layers.0.attn.o_proj.bias", cfg).dim is None
    assert shard_rule("vision.layers.0.mlp.fc2.weight", cfg) == shard_rule("vision.layers.0.mlp.fc2.weight", cfg)


@pytest.mark.parametrize(
    "layout,world,message",
    [
        ({"tp": 3}, 3, "does not divide llm.num_heads = 4"),
        ({"tp": 4}, 4, "llm.num_kv_heads"),
        ({"tp": 2, "vision_tp": 4}, 2, "vision_tp 4 must divide parallel.tp 2"),
        ({"dp": 2, "tp": 2}, 2, "needs dp x tp x pp = 2 x 2 x 1 = 4 processes, but 2 were launched"),
        ({"pp": 2, "pp_layers_per_stage": [1, 1]}, 2, "sums to 2, but the LLM has 4 layers"),
        ({"pp": 2, "pp_schedule": "zero_bubble"}, 2, "choose one of"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 3}, 2, "multiple of pp"),
        ({"tp": 2, "vision_padded_heads": 5}, 2, "vision_padded_heads 5 must be >= "),
        ({"dp": 4, "dp_replicate": 3}, 4, "does not divide parallel.dp 4"),
    ],
)
def test_impossible_layouts_fail_clearly(layout, world, message):
    with pytest.raises(StitchConfigError, match=message):
        Layout.from_config(layout, tiny_config(), world)


def test_layout_defaults():
    layout = Layout.from_config({"tp": 2, "pp": 2}, tiny_config(), 8)
    assert (layout.dp, layout.dp_shard, layout.vision_tp, layout.padded_heads(tiny_config())) == (2, 2, 2, 6)
    assert Layout.from_config({"dp": 4, "fsdp": False}, tiny_config(), 4).dp_replicate == 4
    hsdp = Layout.from_config({"dp": 4, "dp_replicate": 2}, tiny_config(), 4)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 2)
    assert Layout.from_config({"pp": 2, "pp_schedule": "interleaved_1f1b"}, tiny_config(), 2).num_stages == 4


def test_padded_vision_heads_change_neither_outputs_nor_padding():
    """25 -> 32 style padding (here 5 -> 8) with the full-width QK-norm: same features, zero pad gradients."""
    cfg = tiny_config().vision
    torch.manual_seed(0)
    plain = VisionEncoder(cfg)
    padded = VisionEncoder(cfg)
    padded.load_state_dict(plain.state_dict())
    apply_vision_tp(padded, None, padded_heads=8)
    attn = padded.layers[0].attn
    assert attn.q_proj.weight.shape == (64, 40) and attn.o_proj.weight.shape == (40, 64)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(padded(pixels), plain(pixels), atol=1e-6, rtol=0)
    padded(pixels).square().sum().backward()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad[40:].abs().max() == 0
    assert attn.o_proj.weight.grad[:, 40:].abs().max() == 0
    assert attn.q_norm.weight.grad[40:].abs().max() == 0
