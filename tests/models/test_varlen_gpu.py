"""Packed rows on CUDA take FlashAttention's varlen kernel; it must equal running each sample on its own."""

from __future__ import annotations

import pytest
import torch

from stitch.config import LLMConfig
from stitch.models.layers import varlen_available
from stitch.models.llm import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_packed_varlen_equals_separate_samples_forward_and_backward():
    assert varlen_available(torch.device("cuda"), torch.bfloat16)
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64)
    model = LLM(cfg).cuda()
    lengths = [37, 100, 19, 4]  # the last segment plays collate's padding segment
    embeds = torch.randn(1, sum(lengths), cfg.hidden_size, device="cuda", requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(embeds, positions, cu_seqlens=cu, max_seqlen=max(lengths))
        separate = torch.cat([model(part) for part in embeds.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed.float(), separate.float(), atol=3e-2, rtol=3e-2)
    (grad_packed,) = torch.autograd.grad(packed.float().square().sum(), embeds)
    (grad_separate,) = torch.autograd.grad(separate.float().square().sum(), embeds)
    cos = torch.nn.functional.cosine_similarity(grad_packed.flatten(), grad_separate.flatten(), dim=0)
    assert cos > 0.999, cos
    # The dense block-diagonal mask (the CPU path, and fp32) agrees too.
    with torch.no_grad():
        dense = model(embeds.float(), positions, cu_seqlens=cu)
        plain = torch.cat([model(part) for part in embeds.float().split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(dense, plain, atol=1e-4, rtol=1e-4)
