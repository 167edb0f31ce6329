"""Pipeline stages are the model pruned: chained in one process, they give the unsplit model's loss and gradients.

No process group is needed: a `StageModule` is a `VLM` sharing the model's modules, so running stage after stage
by hand is what a schedule does, minus the send/recv. Packed rows (cu_seqlens) and padded rows both go through
`VLM.forward` on each slice.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stitch.models.layers import varlen_available
from stitch.models.vlm import VLM
from stitch.parallel.pipeline import StageModule, microbatch_side
from tests.parallel.common import build, make_batch, make_packed_microbatches, tiny_config


def _stages(model: VLM, cuts: list[range]) -> list[StageModule]:
    model.llm.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(model.llm.layers)})
    return [StageModule(model, i, len(cuts), layers, tp_loss=False) for i, layers in enumerate(cuts)]


def _batch(kind: str) -> dict:
    cfg = tiny_config()
    if kind == "packed":
        return make_packed_microbatches(cfg, 0)[0]
    batch = make_batch(cfg, 0)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][3, 18:] = 0  # a right-padded row
    return batch


@pytest.mark.parametrize("kind", ["packed", "padded"])
@pytest.mark.parametrize("cuts", [[range(0, 2), range(2, 4)], [range(0, 0), range(0, 3), range(3, 4)]])
def test_chained_stages_give_the_models_loss_and_gradients(kind, cuts):
    batch = _batch(kind)
    reference = build(tiny_config())
    expected = reference(**batch, num_label_tokens=1, return_logits=False).loss  # summed loss
    expected.backward()

    model = build(tiny_config())
    stages = _stages(model, cuts)
    assert all(isinstance(s, VLM) for s in stages)
    assert stages[1].llm.embed_tokens is None and stages[0].llm.lm_head is None
    side = {**microbatch_side(batch), "loss_scale": 0.5}
    h = batch["input_ids"]
    for stage in stages:
        h = stage(h, **side)
    assert h.shape == (1,)
    torch.testing.assert_close(h[0], 0.5 * expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stages[-1].loss_sums[0], expected.detach(), atol=1e-5, rtol=0)
    (2 * h).sum().backward()
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_last_stage_logits_match_the_model():
    batch = _batch("padded")
    reference = build(tiny_config()).eval()
    with torch.no_grad():
        expected = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
        stages = _stages(build(tiny_config()).eval(), [range(0, 1), range(1, 4)])
        stages[1].mode = "logits"
        side = {**microbatch_side(batch), "loss_scale": 1.0}
        logits = stages[1](stages[0](batch["input_ids"], **side), **side)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_rows_keep_the_varlen_kernel_in_stages():
    """On CUDA in bf16 a stage's packed row takes FlashAttention's varlen kernel, as the unsplit model does."""
    assert varlen_available(torch.device("cuda"), torch.bfloat16)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch("packed").items()}
    reference = build(tiny_config()).cuda()
    model = build(tiny_config()).cuda()
    stages = _stages(model, [range(0, 2), range(2, 4)])
    side = {**microbatch_side(batch), "loss_scale": 1.0}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = reference(**batch, num_label_tokens=1, return_logits=False).loss
        h = stages[0](batch["input_ids"], **side)
        assert stages[1].llm._use_varlen(batch["cu_seqlens"], 1, None, h)
        got = stages[1](h, **side)
    # Same kernels, same order: the hidden state crosses the cut in the weights' dtype (fp32) either way.
    torch.testing.assert_close(got[0], expected.detach(), atol=1e-3, rtol=1e-4)
