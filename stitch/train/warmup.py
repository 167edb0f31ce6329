"""Encoder warm-up: train a from-scratch vision encoder and its projector without the LLM in the loop.

Each image's mean image token is scored against the LLM's own frozen input-embedding matrix, and the loss is the
cross-entropy to the bag of its caption's tokens (caption-word classification, as CatLIP pretrains encoders).
Why: through the frozen LLM's caption loss an encoder trained from scratch needs ~15k captions before it sees
shape, and every one of those steps pays the LLM's forward and backward; here a step costs the encoder alone,
and the projector's output lands in the LLM's input space (image tokens point at the words that describe them).
The encoder does learn what the captions say this way, but in the quickstart's measurements the captioning
stage after it did not start ahead (docs/quickstart.md), so no recipe uses it yet; `bench/quickstart_sweep.py`
runs it (`warmup=`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stitch.errors import StitchError
from stitch.models.vlm import VLM


@dataclass(frozen=True)
class WarmupResult:
    steps: int
    losses: list[float]
    seconds: float


def caption_targets(tokenizer, captions: Sequence[str], vocab_size: int) -> torch.Tensor:
    """[N, V] float targets: each caption's distinct (non-special) tokens, uniformly weighted."""
    targets = torch.zeros(len(captions), vocab_size)
    for i, caption in enumerate(captions):
        ids = sorted(set(tokenizer(caption, add_special_tokens=False)["input_ids"]))
        if not ids:
            raise StitchError(f"caption {i} ({caption!r}) has no tokens to warm the encoder up on")
        if max(ids) >= vocab_size:
            raise StitchError(f"caption {i} ({caption!r}): token id {max(ids)} is outside the LLM's "
                              f"{vocab_size} embeddings")
        targets[i, ids] = 1.0 / len(ids)
    return targets


def caption_word_loss(tokens: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy of each image's caption words, plus a pull of every image token to the embeddings' norm.

    tokens [B, n, D] (the image tokens), embeddings [V, D], targets [B, V]. The words are scored by the mean
    token's direction at the embeddings' mean norm, over `temperature`, and the norm term keeps each token at
    that norm: unconstrained, the cross-entropy grows the tokens far past a word's norm, which the frozen LLM
    never sees in its input."""
    norm = embeddings.norm(dim=-1).mean()
    direction = F.normalize(tokens.mean(1), dim=-1)  # [B, D]
    logits = (direction * norm) @ embeddings.T / temperature  # [B, V]
    words = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return words + ((tokens.norm(dim=-1) / norm - 1) ** 2).mean()


def warm_up_encoder(
    model: VLM,
    pixel_values: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    vision_lr: float = 3e-4,
    projector_lr: float = 1e-3,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    max_seconds: float | None = None,
    temperature: float = 0.1,
    log: Callable[[int, float], None] | None = None,
) -> WarmupResult:
    """Train `model.vision` and `model.projector` (the LLM untouched) on one-tile images.

    pixel_values [N, 3, s, s] (one tile per image), targets [N, V] from `caption_targets`. The encoder's rate is
    lower than the projector's for the reason `stitch.quickstart.stage_config` gives. Stops after `steps` or
    `max_seconds`, whichever comes first."""
    if pixel_values.shape[0] != targets.shape[0] or pixel_values.ndim != 4:
        raise StitchError(f"warm-up needs pixel_values [N, 3, s, s] and targets [N, V] for the same N, got "
                          f"{tuple(pixel_values.shape)} and {tuple(targets.shape)}")
    if steps < 1 or batch_size < 1:
        raise StitchError(f"warm-up needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    device = next(model.projector.parameters()).device
    embeddings = model.llm.embed_tokens.weight.detach().float()  # [V, D], frozen
    model.vision.train()
    model.projector.train()
    params = [{"params": [p for p in model.vision.parameters()], "lr": vision_lr},
              {"params": [p for p in model.projector.parameters()], "lr": projector_lr}]
    for group in params:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, weight_decay=0.0, fused=device.type in ("cuda", "cpu") or None)
    generator = torch.Generator().manual_seed(seed)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    losses: list[float] = []
    order = torch.randperm(len(pixel_values), generator=generator)
    cursor = 0
    start = time.perf_counter()
    step = 0
    while step < steps and (max_seconds is None or time.perf_counter() - start < max_seconds):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(pixel_values), generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        with autocast:
            tokens = model.image_embeddings(pixel_values[idx].to(device)).float()  # [B * tokens, D]
        loss = caption_word_loss(tokens.view(len(idx), -1, tokens.shape[-1]), embeddings, targets[idx].to(device),
                                 temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise StitchError(f"encoder warm-up: the loss became {value} at step {step}")
        losses.append(value)
        if log is not None:
            log(step, value)
    return WarmupResult(steps=step, losses=losses, seconds=time.perf_counter() - start)
