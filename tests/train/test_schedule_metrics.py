"""LR schedule shape and the FLOP model behind MFU."""

from __future__ import annotations

import math

import pytest
import torch

from stitch.models.presets import vlm_preset
from stitch.train.metrics import BatchShape, FlopModel, batch_shape, peak_flops
from stitch.train.schedule import LRSchedule


def test_schedule_warmup_cosine_linear_floor():
    s = LRSchedule("cosine", warmup_steps=4, decay_steps=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cosine at pi/2
    assert s(14) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)
    lin = LRSchedule("linear", warmup_steps=0, decay_steps=10, min_ratio=0.0)
    assert lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert LRSchedule("constant", warmup_steps=2, decay_steps=5)(100) == 1.0


def _llm_matmul_params(cfg) -> int:
    l = cfg.llm
    q, kv = l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim
    return l.num_layers * (l.hidden_size * (q + 2 * kv) + q * l.hidden_size + 3 * l.hidden_size * l.intermediate_size)


def test_flop_model_multipliers():
    cfg = vlm_preset("internvl-2b")
    shape = BatchShape(seq_lens=[1000, 3000], label_tokens=500, tiles=4)
    sft = FlopModel(cfg, vision_trainable_layers=0, vision_embeddings_train=False, llm_trains=True)
    pre = FlopModel(cfg, vision_trainable_layers=0, vision_embeddings_train=False, llm_trains=False)
    # Trained LLM: 6 FLOPs per matmul weight per token; frozen but back-propagated through: 4.
    assert sft.llm_per_token == 6 * _llm_matmul_params(cfg)
    assert pre.llm_per_token == 4 * _llm_matmul_params(cfg)
    # Causal attention counts n(n+1)/2 pairs per sample, forward + backward = 3x.
    l = cfg.llm
    pairs = 1000 * 1001 // 2 + 3000 * 3001 // 2
    assert sft.llm_per_pair * pairs == 3 * 4 * l.num_heads * l.head_dim * l.num_layers * pairs
    # The frozen ViT (first in line) runs forward only in both stages: the same cost.
    assert sft.vision_per_tile == pre.vision_per_tile
    unfrozen = FlopModel(cfg, vision_trainable_layers=24, vision_embeddings_train=True, llm_trains=True)
    assert unfrozen.vision_per_tile == 3 * sft.vision_per_tile
    total = sft.flops(shape)
    assert total == pytest.approx(
        4 * (sft.vision_per_tile + sft.projector_per_tile) + 4000 * sft.llm_per_token + pairs * sft.llm_per_pair
        + 500 * 6 * l.hidden_size * l.vocab_size
    )
    # Sanity against the usual 6N rule: within a few % for text-heavy batches.
    n_params = _llm_matmul_params(cfg) + l.hidden_size * l.vocab_size
    rough = 6 * n_params * 4000
    assert 0.5 < (4000 * sft.llm_per_token + 500 * sft.llm_per_label) / rough < 1.0


def test_batch_shape_and_peak():
    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 1, 2, 3, -100, -100]]),
        "pixel_values": torch.zeros(3, 3, 56, 56),
    }
    s = batch_shape(batch)
    assert s.seq_lens == [4, 6] and s.label_tokens == 5 and s.tiles == 3
    packed = {"input_ids": torch.zeros(1, 9, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4, 9])}
    assert batch_shape(packed).seq_lens == [4, 5]
    assert peak_flops(torch.device("cpu"), "fp32", None) is None
    assert peak_flops(torch.device("cpu"), "fp32", 2.5) == 2.5e12
    assert math.isclose(peak_flops(torch.device("cpu"), "bf16", 989), 989e12)
