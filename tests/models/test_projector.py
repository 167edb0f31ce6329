"""The projector's two grid reductions and the CPU attention-kernel choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stitch.checkpoint.hf import vlm_config_to_hf
from stitch.errors import CheckpointError
from stitch.models.layers import CPU_MATH_ATTENTION_MAX_KEYS, attention
from stitch.models.presets import vlm_preset
from stitch.models.projector import Projector, average_pool, pixel_shuffle
from stitch.models.vlm import VLM


def test_average_pool_is_the_mean_of_each_block_in_raster_order():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5)  # a 4x4 grid of 5-channel features
    pooled = average_pool(x, 0.5)
    grid = x.reshape(2, 4, 4, 5)
    want = torch.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    torch.testing.assert_close(pooled, want)
    assert average_pool(x, 0.25).shape == (2, 1, 5)
    torch.testing.assert_close(average_pool(x, 0.25)[:, 0], x.mean(1))
    # pixel shuffle keeps every value (folded into channels); pooling averages them away
    assert pixel_shuffle(x, 0.5).shape == (2, 4, 20)


@pytest.mark.parametrize("downsample", ["pixel_shuffle", "avg_pool"])
def test_avg_pool_projector_feeds_the_llm_the_configured_number_of_tokens(downsample):
    cfg = vlm_preset("vlm-tiny")
    cfg.projector.downsample = downsample
    model = VLM(cfg).eval()
    features = torch.randn(3, (cfg.vision.image_size // cfg.vision.patch_size) ** 2, cfg.vision.hidden_size)
    out = model.projector(features)
    assert out.shape == (3, cfg.tokens_per_tile, cfg.llm.hidden_size)
    width = model.projector.linear_1.in_features
    assert width == cfg.vision.hidden_size * (4 if downsample == "pixel_shuffle" else 1)
    # a whole forward with the image tokens in the prompt runs and trains end to end
    ids = torch.full((1, cfg.tokens_per_tile + 3), 5)
    ids[0, 1:1 + cfg.tokens_per_tile] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    loss = model(ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.vision.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_avg_pool_projector_refuses_internvl_export():
    cfg = vlm_preset("vlm-tiny")
    cfg.projector.downsample = "avg_pool"
    with pytest.raises(CheckpointError, match="downsample 'pixel_shuffle'"):
        vlm_config_to_hf(cfg, "internvl")


def test_projector_state_names_do_not_depend_on_the_reduction():
    cfg = vlm_preset("vlm-tiny")
    names = set(Projector(cfg).state_dict())
    cfg.projector.downsample = "avg_pool"
    assert set(Projector(cfg).state_dict()) == names


@pytest.mark.parametrize("keys", [12, CPU_MATH_ATTENTION_MAX_KEYS + 8])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_matches_every_sdpa_kernel(keys, masked):
    """Short CPU rows take SDPA's math kernels, longer ones the fused kernels: same values and gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, keys, 16, requires_grad=True)
    k = torch.randn(2, 2, keys, 16, requires_grad=True)
    v = torch.randn(2, 2, keys, 16, requires_grad=True)
    mask = torch.ones(2, 1, keys, keys, dtype=torch.bool).tril() if masked else None
    if masked:
        mask[1, :, :, :3] = False  # left padding in the second row
        mask[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    got = attention(q, k, v, mask, is_causal=True)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the any-shape kernel choice is a CUDA matter")
@pytest.mark.parametrize("masked", [False, True])
def test_any_shape_attention_is_as_exact_as_sdpas_own_choice_on_cuda(masked):
    """`any_shape` (no cuDNN plans) takes flash / memory-efficient kernels: against an fp32 reference its bf16
    values and gradients are as close as SDPA's own choice, with and without a mask, GQA included, at
    tile-batch sizes that change from call to call."""
    torch.manual_seed(0)
    for rows in (3, 5):
        q, k, v = (torch.randn(rows, h, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (8, 2, 2))
        mask = torch.ones(rows, 1, 300, 300, dtype=torch.bool, device="cuda").tril() if masked else None
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = attention(*ref_in, mask, is_causal=True)
        ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
        errors = {}
        for any_shape in (False, True):
            out = attention(q, k, v, mask, is_causal=True, any_shape=any_shape)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            errors[any_shape] = [(out.float() - ref).abs().max().item()] + [
                ((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)]
        for got, own in zip(errors[True], errors[False]):
            assert got <= 2 * own + 1e-2, errors
