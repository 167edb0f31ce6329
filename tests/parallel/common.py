"""Shared by the tests and the torchrun worker: a tiny InternViT-6B-style VLM, batches, the reference run.

The ViT has 5 heads (like InternViT-6B's 25, divisible by no TP degree > 1) with full-width QK-norm, so every
vision-TP layout exercises head padding. Everything is fp32 and deterministic from fixed seeds.
"""

from __future__ import annotations

import torch

from stitch.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
from stitch.data.collate import Sample, collate
from stitch.models.vlm import VLM

IMAGE_TOKEN = 5
ROWS, SEQ = 4, 24
STEPS = 3
# make_batch's rows cut to these lengths and packed two per row: two packed micro-batches of unequal length
# (41 and 29 tokens), so a pipeline pads the second, and every row's tiles stay whole.
PACKED_LENGTHS = ((24, 17), (20, 9))
MODEL_KEYS = ("input_ids", "labels", "pixel_values", "attention_mask", "position_ids", "cu_seqlens", "max_seqlen")
MAX_GRAD_NORM = 2.0  # below most steps' norm (2.3 to 4.8), so clipping is exercised too


def make_optimizer(params, kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD for weight comparisons (linear in the gradients, so rounding differences stay ~1e-7; Adam divides
    by sqrt(v) and turns rounding noise on near-zero gradients into whole-step differences); AdamW where the
    optimizer state itself is under test (DCP resume)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.5)


def tiny_config(variant: str = "base") -> VLMConfig:
    """"base"; "tied" (tied embeddings); "mha" (4 KV heads, so the LLM takes TP 4 while the ViT takes 2)."""
    assert variant in ("base", "tied", "mha"), variant
    tied = variant == "tied"
    vision = VisionConfig(kind="internvit", image_size=56, patch_size=14, hidden_size=40, intermediate_size=64,
                          num_layers=2, num_heads=5, norm_type="rms_norm", qk_norm=True, qkv_bias=False,
                          layer_scale_init=0.1)
    llm = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=4 if variant == "mha" else 2, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    return VLMConfig(vision=vision, llm=llm, projector=ProjectorConfig(kind="mlp"), image_token_id=IMAGE_TOKEN,
                     max_tiles=2)


def build(cfg: VLMConfig, seed: int = 0) -> VLM:
    torch.manual_seed(seed)
    model = VLM(cfg)
    with torch.no_grad():  # non-trivial norm weights and biases so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.llm.embed_tokens.weight.mul_(0.05)  # N(0, 1) embeddings make tied logits (and losses) huge
    return model


def make_batch(cfg: VLMConfig, step: int) -> dict[str, torch.Tensor]:
    """4 rows of 24 tokens: row 0 one tile, row 1 two tiles, row 2 one tile, row 3 text only."""
    g = torch.Generator().manual_seed(1000 + step)
    tpt = cfg.tokens_per_tile
    ids = torch.randint(6, cfg.llm.vocab_size, (ROWS, SEQ), generator=g)
    tiles_per_row = [1, 2, 1, 0]
    for row, tiles in enumerate(tiles_per_row):
        ids[row, 2 : 2 + tiles * tpt] = IMAGE_TOKEN
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    labels[:, :4] = -100
    labels[torch.rand(ROWS, SEQ, generator=g) < 0.2] = -100
    size = cfg.vision.image_size
    pixels = torch.randn(sum(tiles_per_row), 3, size, size, generator=g)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def reference_run(cfg: VLMConfig, steps: int = STEPS, optimizer: str = "sgd"):
    """One process, whole batches: losses, weights afterwards and (pre-clipping) gradient norms of `steps`
    clipped optimizer steps."""
    model = build(cfg)
    opt = make_optimizer(model.parameters(), optimizer)
    losses, norms = [], []
    for step in range(steps):
        out = model(**make_batch(cfg, step), return_logits=False)
        out.loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, state, norms


def make_packed_microbatches(cfg: VLMConfig, step: int) -> list[dict]:
    """Batch `step`'s rows cut to `PACKED_LENGTHS` and packed by `stitch.data.collate` (one micro-batch a row)."""
    batch = make_batch(cfg, step)
    tiles = ((batch["input_ids"] == IMAGE_TOKEN).sum(1) // cfg.tokens_per_tile).tolist()
    first_tile = [sum(tiles[:row]) for row in range(ROWS)]
    lengths = [n for row in PACKED_LENGTHS for n in row]
    samples = [
        Sample(batch["input_ids"][row, :n], batch["labels"][row, :n],
               batch["pixel_values"][first_tile[row] : first_tile[row] + tiles[row]] if tiles[row] else None)
        for row, n in enumerate(lengths)
    ]
    micro, start = [], 0
    for row in PACKED_LENGTHS:
        packed = collate(samples[start : start + len(row)], pack=True)
        micro.append({k: packed[k] for k in MODEL_KEYS if packed.get(k) is not None})
        start += len(row)
    return micro


def packed_reference_run(cfg: VLMConfig, steps: int = STEPS):
    """`reference_run` on the packed micro-batches: one process, token-weighted over both rows of a step."""
    model = build(cfg)
    opt = make_optimizer(model.parameters())
    losses, norms = [], []
    for step in range(steps):
        micro = make_packed_microbatches(cfg, step)
        total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        loss = 0.0
        for mb in micro:
            out = model(**mb, num_label_tokens=total, return_logits=False)
            out.loss.backward()
            loss += out.loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, state, norms
