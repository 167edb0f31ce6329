"""The Llama-family decoder: Llama 2/3, Qwen2/2.5, Yi, Mistral and SmolLM2 in one implementation.

They differ only by config switches (QKV bias for Qwen2, RoPE theta/scaling, tied embeddings, GQA ratio), so one
readable module serves them all. Parameter names mirror HF's Llama (`layers.{i}.self_attn.q_proj`, ...) so the
HF name table is short and obvious. No parallelism here: `stitch.parallel` shards this module from outside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stitch.config import LLMConfig
from stitch.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    attention,
    varlen_available,
    varlen_causal_attention,
)


@dataclass
class AttentionContext:
    """Everything attention needs that is shared by all layers of one forward (computed once per forward)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool, True = attend, broadcastable to [B, 1, T, S]
    is_causal: bool
    kv_cache: KVCache | None = None
    cache_position: torch.Tensor | None = None  # [T] absolute slots written in the cache
    # A packed row on CUDA: FlashAttention's varlen kernel over these sample boundaries replaces `mask`.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # Prefill into an empty cache: keys are written to it but attention runs over this call's own keys.
    fresh_cache: bool = False


class KVCache:
    """A preallocated (static) key/value cache: fixed shapes, so decode steps can be compiled/graphed.

    k/v: one [B, kv_heads, max_len, head_dim] tensor per layer. Writes go to `cache_position` slots; attention
    reads the whole buffer and the caller's mask hides unwritten slots. One tensor per layer, not one stacked
    tensor: under torch.compile an in-place write into a view of a stacked input is functionalised into a copy
    of the whole stack, per layer and per step (2B at batch 64: 33 ms a decode step instead of 3-5, on an H200).
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """The same cache seen through rows [start, stop): writes land in this cache (a prompt prefilled alone
        into its own row of a running batch)."""
        view = object.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.max_len = self.max_len
        return view

    def slots(self, stop: int) -> KVCache:
        """The same cache seen through slots [0, stop): attention of a prompt resumed after a reused prefix
        reads only the slots up to its end, not the whole buffer."""
        view = object.__new__(KVCache)
        view.k = [k[:, :, :stop] for k in self.k]
        view.v = [v[:, :, :stop] for v in self.v]
        view.max_len = stop
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        self.k[layer].index_copy_(2, cache_position, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, cache_position, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout
        self.any_shape_kernels = False  # see stitch.models.layers.set_any_shape_attention

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        # [B, T, H*D] -> [B, H, T, D]; head counts come from the weights so a TP-sharded module works unchanged
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, ctx.cos, ctx.sin)
        if ctx.kv_cache is not None:
            cached_k, cached_v = ctx.kv_cache.update(self.layer_idx, k, v, ctx.cache_position)
            if not ctx.fresh_cache:
                k, v = cached_k, cached_v
        if ctx.cu_seqlens is not None:
            out = varlen_causal_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen)
        else:
            out = attention(q, k, v, ctx.mask, ctx.is_causal, self.dropout if self.training else 0.0,
                            self.any_shape_kernels)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def build_attention_mask(
    batch: int,
    q_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    kv_len: int | None = None,
    cache_position: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Return (bool mask [B,1,T,S] or None, is_causal).

    - plain batch: (None, True) so SDPA uses its fused causal kernel;
    - packed (`cu_seqlens`): block-diagonal causal, so attention never crosses samples;
    - padded (`attention_mask` [B, S]): causal and key padding;
    - with a KV cache: queries at `cache_position` see keys at slots <= their own (and not padding).
    """
    if cu_seqlens is None and attention_mask is None and cache_position is None:
        return None, True
    kv_len = kv_len or q_len
    q_pos = cache_position if cache_position is not None else torch.arange(q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, S]
    if cu_seqlens is not None:
        # sample id per position: positions in [cu[i], cu[i+1]) belong to sample i
        seg = torch.searchsorted(cu_seqlens[1:].to(device), torch.arange(kv_len, device=device), right=True)
        mask = mask & (seg[q_pos][:, None] == seg[None, :])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :kv_len].bool()
        # A fully padded query row would give NaN in SDPA; let such rows attend to themselves only.
        mask = mask | (~mask.any(-1, keepdim=True) & (k_pos[None, :] == q_pos[:, None])[None, None])
    return mask.expand(batch, 1, q_len, kv_len), False


class LLM(nn.Module):
    """Decoder-only LM. `forward` returns final hidden states; `logits()`/loss helpers sit on top.

    Prunable the torchtitan way: `forward` runs whatever layers `layers` holds (a ModuleList, or a ModuleDict
    keyed by global layer index when a pipeline stage keeps only its slice) and skips a missing (`None`) final
    norm, so a stage runs this same forward on its part. `embed_tokens`/`lm_head` may be `None` too; they are
    read by `stitch.models.vlm.VLM`, not here.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        fresh_cache: bool = False,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> final normed hidden states [B, T, D].

        A packed row (`cu_seqlens`, one row, no cache) runs FlashAttention's varlen kernel on CUDA in half
        precision (`max_seqlen`, the longest sample, saves a host sync when the caller knows it); elsewhere,
        and with attention dropout, a block-diagonal mask gives the same result.

        `fresh_cache`: the prompt attends to nothing already in `kv_cache` (a prefill; `cache_position`, the T
        slots it fills, is `arange(T)`, or for a prompt joining a running batch the T slots before the batch's next).
        The keys are still written to the cache, but attention runs over these T keys instead of the whole
        cache buffer: a [B, 1, T, T] mask from `attention_mask[:, :T]` (left padding), or with no
        `attention_mask` none at all, so SDPA takes its fused causal kernel.
        """
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if position_ids is None:
            base = cache_position if cache_position is not None else torch.arange(t, device=device)
            position_ids = base[None].expand(b, t)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        if self._use_varlen(cu_seqlens, b, kv_cache, inputs_embeds):
            cu = cu_seqlens.to(device=device, dtype=torch.int32)
            longest = int(max_seqlen) if max_seqlen else int(torch.diff(cu).max())
            ctx = AttentionContext(cos, sin, None, True, cu_seqlens=cu, max_seqlen=longest)
        elif kv_cache is not None and fresh_cache:
            prompt_mask = attention_mask[:, :t] if attention_mask is not None else None
            mask, is_causal = build_attention_mask(b, t, device, prompt_mask)
            ctx = AttentionContext(cos, sin, mask, is_causal, kv_cache, cache_position, fresh_cache=True)
        else:
            kv_len = kv_cache.max_len if kv_cache is not None else None
            mask, is_causal = build_attention_mask(b, t, device, attention_mask, cu_seqlens, kv_len, cache_position)
            ctx = AttentionContext(cos, sin, mask, is_causal, kv_cache, cache_position)
        x = inputs_embeds
        layers = self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.norm(x) if self.norm is not None else x

    def _use_varlen(self, cu_seqlens, batch: int, kv_cache, inputs_embeds) -> bool:
        """Packed rows need no mask: collate makes any padding its own segment, so `attention_mask` is moot."""
        if cu_seqlens is None or batch != 1 or kv_cache is not None:
            return False
        if self.training and self.config.dropout > 0:
            return False  # the varlen kernel has no attention dropout
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else inputs_embeds.dtype
        return varlen_available(inputs_embeds.device, dtype)


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a label, and those labels: ([N, D], [N]) with labels shifted by one."""
    targets = labels[:, 1:]
    keep = targets != -100
    return hidden[:, :-1][keep], targets[keep]


def chunked_cross_entropy_sum(
    h: torch.Tensor, y: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int = 4096
) -> torch.Tensor:
    """Summed cross-entropy of `logits_fn(h)` against `y`, a chunk of rows at a time.

    Each chunk's logits are recomputed in backward instead of stored: with 150k-token vocabularies the full
    logits tensor would be the memory peak. `logits_fn` may return a DTensor (vocabulary-parallel head).
    """

    def chunk_sum(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits_fn(h_chunk).float(), y_chunk, reduction="sum")
        return loss.to_local() if hasattr(loss, "to_local") else loss

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(chunk_sum, hc, yc, use_reentrant=False)
        else:
            total = total + chunk_sum(hc, yc)
    return total


def answer_logps(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of the labelled tokens' log-probs and their counts ([N], [N]; fp32), for preference losses.

    As in `token_loss` the output layer runs only at the M positions that predict a label, never over the full
    [N, T, V]. `lm_head` is called as a module, so a vocabulary-parallel head (a Shard(-1) DTensor under
    `loss_parallel`) works unchanged: the per-token cross-entropy comes back replicated."""
    target = labels[:, 1:]  # position t predicts token t+1
    mask = target != -100
    logits = lm_head(hidden[:, :-1][mask])  # [M, V]
    nll = F.cross_entropy(logits.float(), target[mask], reduction="none")  # [M]
    nll = nll.to_local() if hasattr(nll, "to_local") else nll
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, -nll)
    return per_token.sum(1), mask.sum(1)


def token_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    num_label_tokens: torch.Tensor | int | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over labelled positions only, in chunks; returns (loss, n_tokens).

    Logits exist only for positions that carry a label (see `chunked_cross_entropy_sum`). The loss is
    `sum / num_label_tokens` (token-weighted): pass the global count to make gradient accumulation and data
    parallelism exact; by default it is this batch's own count (a per-token mean).
    """
    h, y = labelled_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, torch.tensor(0, device=hidden.device)
    denom = num_label_tokens if num_label_tokens is not None else n
    total = chunked_cross_entropy_sum(h, y, lambda x: F.linear(x, lm_head.weight), chunk_size)
    return total / denom, torch.tensor(n, device=hidden.device)
