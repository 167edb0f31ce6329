"""Building blocks shared by the LLM (and reused by the ViT where they fit).

Numerics follow `transformers` exactly (norms in fp32, RoPE tables in fp32) because the parity tests compare
logits at 1e-5; anything faster must keep that.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Llama/Qwen2 do (`weight * x_normed.to(dtype)`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for a rope config (default, linear, llama3).

    Llama 3.1's rule keeps high frequencies, divides low ones by `factor` and blends the band between them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type '{kind}' (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given positions; positions restart per packed sample via `position_ids`."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: [B, H, T, D]; cos, sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# On a CPU, SDPA's fused (flash) kernels lose to its plain math path for short rows: bf16 forward+backward at
# batch 32 with 9 query / 3 K/V heads, measured on a 2-core box: 46 keys 22 vs 8.5 ms, 128 keys 58 vs 40 ms,
# 512 keys 47 vs 96 ms. Rows up to this many keys take the math path there (GPUs always take the fused ones).
CPU_MATH_ATTENTION_MAX_KEYS = 256


# On CUDA, SDPA picks cuDNN's attention on Hopper: the fastest once warm (2B shapes on an H200, forward+backward:
# ViT 2.7 vs 4.4 ms for flash, LLM 1.2 vs 1.8 ms), but it builds an execution plan for every new shape (~140 ms
# each, fwd and bwd; bench/attention_backends.py). Where shapes keep changing (packed rows: tiles per row) a model
# can keep to the kernels that take any shape: `any_shape=True` here, `set_any_shape_attention` on a model.
ANY_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, any_shape: bool = False, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on the faster kernel for short rows on a CPU, and with `any_shape` on
    CUDA without cuDNN's per-shape plans (see above)."""
    if q.device.type == "cpu" and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if any_shape and q.device.type == "cuda":
        with sdpa_kernel(ANY_SHAPE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def set_any_shape_attention(model: nn.Module, on: bool) -> None:
    """Switch every attention module of `model` (those with an `any_shape_kernels` flag) to, or back from, the
    kernels that need no per-shape plan (see above): for runs whose batch shapes keep changing."""
    for module in _attention_modules(model):
        module.any_shape_kernels = on


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "any_shape_kernels")]


@contextlib.contextmanager
def any_shape_attention(model: nn.Module, on: bool = True) -> Iterator[None]:
    """`set_any_shape_attention` for the duration of a block, then each module's own setting again (an engine
    serving a model that is also being trained leaves the trainer's choice alone)."""
    modules = _attention_modules(model)
    before = [m.any_shape_kernels for m in modules]
    for m in modules:
        m.any_shape_kernels = on
    try:
        yield
    finally:
        for m, flag in zip(modules, before):
            m.any_shape_kernels = flag


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
    any_shape: bool = False,
) -> torch.Tensor:
    """SDPA with grouped-query heads (`any_shape`: see `sdpa`). q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D].

    `mask` is boolean (True = attend) broadcastable to [B, 1, T, S]. Three paths, all exact:
    - no mask: SDPA's own GQA support with its fused causal kernel (training, plain prefill);
    - a mask and few queries (decode with a KV cache): the query groups of each K/V head are folded into the
      query axis, so the cache is read in place instead of being copied `Hq/Hkv` times every step;
    - otherwise K/V heads are expanded explicitly (packed or padded prefill).
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hkv == hq:
        return sdpa(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, dropout_p=dropout,
                    any_shape=any_shape)
    rep = hq // hkv
    if mask is None:
        return sdpa(q, k, v, is_causal=is_causal, dropout_p=dropout, enable_gqa=True, any_shape=any_shape)
    if t * rep <= 64:
        folded = mask.expand(b, 1, t, mask.shape[-1])[:, :, None].expand(b, 1, rep, t, -1).reshape(b, 1, rep * t, -1)
        out = sdpa(q.reshape(b, hkv, rep * t, d), k, v, attn_mask=folded, dropout_p=dropout, any_shape=any_shape)
        return out.reshape(b, hq, t, d)
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, any_shape=any_shape)


def _find_varlen_kernel():
    """torch's FlashAttention varlen entry point and its causal keyword, or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


# Looked up once at import (a module constant, not a cached call, so torch.compile traces through it).
_VARLEN_KERNEL = _find_varlen_kernel()


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed rows can use FlashAttention's variable-length kernel (CUDA, half precision)."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _VARLEN_KERNEL is not None


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Causal attention within each packed sample of one row, without a mask.

    q [1, Hq, T, D], k/v [1, Hkv, T, D] -> [1, Hq, T, D]; `cu_seqlens` [n+1] int32 on q's device marks the
    samples. The kernel skips the blocks between samples, which a dense block-diagonal mask cannot.
    """
    fn, causal, native_gqa = _VARLEN_KERNEL
    if torch.is_autocast_enabled(q.device.type):
        # Under autocast RoPE leaves q/k in the embeddings' fp32; SDPA casts for itself, this op does not.
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = (x.to(half) for x in (q, k, v))
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D]
    extra = dict(causal)
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **extra)
    return out.transpose(0, 1)[None]


class SwiGLU(nn.Module):
    """Llama-family MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
