"""Throughput metrics: tokens/s, model FLOPs and MFU, peak memory.

FLOP convention (what MFU divides by the peak):
- Model FLOPs, not hardware FLOPs: activation-checkpoint recomputation is not counted (as in PaLM's MFU).
- A matmul of an [n, a] input with an [a, b] weight costs 2nab forward. Its backward costs 2nab for the
  activation gradient (needed when anything upstream of it trains) and 2nab for the weight gradient (when
  the weight trains). So a trained part costs 3x its forward (the usual 6N per token), a frozen part that
  gradients must flow through (the LLM in pretraining) 2x, and a frozen part with nothing trainable upstream
  (the ViT in both NVLM stages) 1x: it runs forward only, and we count only what runs.
- Attention scores and the weighted sum (QK^T and PV, 2 x 2 FLOPs per query-key pair per channel) are
  counted, forward 1x and backward 2x when gradients flow. LLM attention is causal and per sample: a sample
  of n tokens costs n(n+1)/2 query-key pairs (FlashAttention's convention; packed samples never attend to
  each other). ViT attention is bidirectional: T^2 pairs per tile (class token included).
- The LM head runs only where a label exists (the loss is computed from hidden states at labelled
  positions only), so it is counted per label token; the embedding lookup, norms, activations, RoPE and
  biases are not counted (they are not matmuls).
- Padding is not counted: tokens are the real ones of each sample (attention_mask / cu_seqlens).
Peak FLOP/s per device comes from `log.peak_tflops`, else from the device name (dense bf16 tensor-core
numbers, e.g. H100/H200 989 TFLOP/s); on a CPU without a configured peak MFU is not reported.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stitch.config import VLMConfig

__all__ = ["BatchShape", "FlopModel", "RunSummary", "batch_shape", "peak_flops", "peak_memory_gb", "PEAK_TFLOPS"]

# Dense (non-sparse) tensor-core TFLOP/s per device for bf16, and for fp32 without TF32.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


@dataclass
class BatchShape:
    """What the FLOP count needs from one micro-batch."""

    seq_lens: list[int] = field(default_factory=list)  # real tokens of each sample
    label_tokens: int = 0  # positions whose next token carries a loss (where the LM head runs)
    tiles: int = 0  # image tiles through the ViT

    @property
    def tokens(self) -> int:
        return sum(self.seq_lens)


def batch_shape(batch: dict) -> BatchShape:
    """Per-sample lengths, label count and tile count of a collated batch (see docs/CONTRACTS.md)."""
    ids = batch["input_ids"]
    if batch.get("cu_seqlens") is not None:
        lens = torch.diff(batch["cu_seqlens"].long()).tolist()
    elif batch.get("attention_mask") is not None:
        lens = batch["attention_mask"].sum(1).tolist()
    else:
        lens = [ids.shape[1]] * ids.shape[0]
    labels = batch.get("labels")
    n_labels = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
    pixels = batch.get("pixel_values")
    tiles = int(pixels.shape[0]) if pixels is not None else 0
    return BatchShape([int(n) for n in lens if n > 0], n_labels, tiles)


class FlopModel:
    """Training FLOPs of one micro-batch for a VLM with a given trainable set (see the module docstring)."""

    def __init__(self, cfg: VLMConfig, vision_trainable_layers: int, vision_embeddings_train: bool,
                 llm_trains: bool, projector_trains: bool = True):
        v, l, p = cfg.vision, cfg.llm, cfg.projector
        # ---- ViT, per tile
        t = v.num_positions
        layer_w = 2 * t * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        layer_a = 4 * t * t * v.hidden_size
        used = v.num_layers_used
        k = min(vision_trainable_layers, used)
        embed = 2 * v.num_patches * v.num_channels * v.patch_size**2 * v.hidden_size
        # Layers before the first trainable one run forward only; trainable ones cost 3x.
        self.vision_per_tile = (
            embed * (3 if vision_embeddings_train else 1)
            + (used - k) * (layer_w + layer_a)
            + k * 3 * (layer_w + layer_a)
        )
        vision_upstream = k > 0 or vision_embeddings_train
        # ---- projector, per tile
        n_out = cfg.tokens_per_tile
        c_in = p.input_width(v.hidden_size)
        hidden = p.hidden_size or l.hidden_size
        if p.kind in ("mlp", "mlp2x_gelu"):
            proj = 2 * n_out * (c_in * hidden + hidden * l.hidden_size)
        else:
            proj = 2 * n_out * c_in * l.hidden_size
        if projector_trains:
            self.projector_per_tile = 3 * proj
        else:
            self.projector_per_tile = proj * (2 if vision_upstream else 1)
        # ---- LLM: per token, per causal query-key pair, per label token
        q, kv = l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim
        per_layer = l.hidden_size * (q + 2 * kv) + q * l.hidden_size + 3 * l.hidden_size * l.intermediate_size
        upstream = projector_trains or vision_upstream
        w_mult = 3 if llm_trains else (2 if upstream else 1)
        a_mult = 3 if (llm_trains or upstream) else 1
        self.llm_per_token = w_mult * 2 * per_layer * l.num_layers
        self.llm_per_pair = a_mult * 4 * q * l.num_layers
        self.llm_per_label = w_mult * 2 * l.hidden_size * l.vocab_size

    def flops(self, shape: BatchShape) -> float:
        pairs = sum(n * (n + 1) // 2 for n in shape.seq_lens)
        return float(
            shape.tiles * (self.vision_per_tile + self.projector_per_tile)
            + shape.tokens * self.llm_per_token
            + pairs * self.llm_per_pair
            + shape.label_tokens * self.llm_per_label
        )


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table above by device name, else None."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]["bf16" if precision == "bf16" else "fp32"] * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated bytes on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)  # bytes on macOS, KiB on Linux


@dataclass
class RunSummary:
    """What `Trainer.fit` returns: the last step, the final folder, and this session's step records."""

    step: int
    final_dir: Path | None
    interrupted: str | None = None
    losses: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # this session's step records

    def throughput(self) -> dict[str, Any]:
        """Tokens/s, TFLOP/s and MFU over this session's steps, leaving out the first 10% (at least one step
        when there are several): they carry allocator growth, kernel autotuning and lazy initialisation."""
        recs = self.records
        skip = max(1, len(recs) // 10) if len(recs) > 1 else 0
        timed = recs[skip:]
        if not timed:
            return {}
        seconds = sum(r["step_s"] for r in timed)
        tokens = sum(r["tokens"] for r in timed)
        flops = sum(r["tflops_per_device"] * r["step_s"] for r in timed)
        mfus = [r["mfu"] * r["step_s"] for r in timed if r.get("mfu") is not None]
        return {
            "steps_timed": len(timed),
            "tokens_per_s": tokens / seconds,
            "tflops_per_device": flops / seconds,
            "mfu": sum(mfus) / seconds if mfus else None,
            "step_s": seconds / len(timed),
        }

