"""Shared by test_preference_layouts.py and its torchrun worker: image pairs for the tiny VLM of common.py and
one preference (MPO) run through `train_step`, in one process or under a layout.

A step's global batch is 4 pairs of unequal lengths (pair 0 with one tile, pair 1 with two, pair 2 with one,
pair 3 text only). One process takes them as one micro-batch; a data rank of a layout takes its share as one
micro-batch per pair, so accumulation, the global pair/token denominators and the text-only rank (whose idle
ViT must still join FSDP's collectives) are all exercised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from stitch.data.collate import Sample
from stitch.data.preference import collate_pairs
from stitch.models.lora import apply_lora
from stitch.models.vlm import VLM
from stitch.train.config import LoRAConfig, PreferenceConfig
from stitch.train.preference import PairObjective, build_reference, evaluate_pairs, loss_terms, sequence_logps
from stitch.train.step import train_step
from tests.parallel.common import IMAGE_TOKEN, build, tiny_config

PAIRS = 4
STEPS = 2
LR = 0.5
MAX_GRAD_NORM = 1.0
TILES = (1, 2, 1, 0)  # per pair
LENGTHS = ((6, 5, 3), (4, 2, 6), (7, 4, 4), (5, 6, 1))  # (prompt text, chosen, rejected) tokens per pair
PAD = 0


def make_pairs(cfg, step: int) -> list[tuple[Sample, Sample]]:
    """The 4 (chosen, rejected) samples of step `step`: a shared prompt (image tokens, then text), two answers."""
    g = torch.Generator().manual_seed(500 + step)
    tpt, size = cfg.tokens_per_tile, cfg.vision.image_size
    pairs = []
    for tiles, (n_prompt, n_c, n_r) in zip(TILES, LENGTHS):
        prompt = torch.cat([torch.full((tiles * tpt,), IMAGE_TOKEN), torch.randint(6, cfg.llm.vocab_size, (n_prompt,),
                                                                                   generator=g)])
        pixels = torch.randn(tiles, 3, size, size, generator=g) if tiles else None
        rows = []
        for n in (n_c, n_r):
            answer = torch.randint(6, cfg.llm.vocab_size, (n,), generator=g)
            ids = torch.cat([prompt, answer])
            labels = torch.cat([torch.full_like(prompt, -100), answer])
            rows.append(Sample(ids, labels, pixels))
        pairs.append((rows[0], rows[1]))
    return pairs


def micro_batches(cfg, step: int, dp_rank: int = 0, dp_size: int = 1, one_batch: bool = False) -> list[dict]:
    """This data rank's micro-batches of step `step` (one pair each), or all 4 pairs as one (`one_batch`)."""
    pairs = make_pairs(cfg, step)
    if one_batch:
        return [collate_pairs(pairs, PAD)]
    per = PAIRS // dp_size
    return [collate_pairs([p], PAD) for p in pairs[dp_rank * per : (dp_rank + 1) * per]]


def setup(kind: str, device: torch.device) -> tuple[VLM, PairObjective]:
    """The policy (fp32, the ViT frozen) and its MPO objective. kind "copy": full fine-tuning with a frozen copy
    as the reference; "bf16": the same with the copy's Linear weights in bf16; "lora": LoRA adapters on the LLM
    only, the reference is the policy with adapters off."""
    cfg = tiny_config()
    model = build(cfg).to(device).train()
    for p in model.vision.parameters():
        p.requires_grad_(False)
    if kind == "lora":
        torch.manual_seed(1)
        apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0, trainable=[]))
        with torch.no_grad():  # B = 0 would make step 1's reference forward equal the policy's trivially
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.02)
    pref = PreferenceConfig(beta=0.5, reference="adapters" if kind == "lora" else "copy",
                            reference_dtype="bf16" if kind == "bf16" else "fp32")
    terms = loss_terms(pref, "mpo")
    ref = build_reference(model, pref, device, contextlib.nullcontext, terms)
    if kind in ("copy", "bf16"):
        # The policy moved off its reference before step 1: with rewards exactly 0 every pair would be a tie,
        # and `rewards/accuracies` (chosen > rejected) would read rounding noise.
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.llm.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device))
    return model, PairObjective(ref, pref)


def run(model, objective: PairObjective, batches: Callable[[int], list[dict]], params,
        device: torch.device) -> list[dict]:
    """`STEPS` SGD steps through `train_step`; per step the loss, gradient norm and the objective's metrics.
    Then the held-out evaluation (`evaluate_pairs`) of the trained model on the pairs of step `STEPS`, and
    `sequence_logps` of its first pair."""
    opt = torch.optim.SGD(params, lr=LR)
    records = []
    for step in range(STEPS):
        res = train_step(model, opt, batches(step), max_grad_norm=MAX_GRAD_NORM, objective=objective)
        records.append({"loss": res.loss, "grad_norm": res.grad_norm, "label_tokens": res.label_tokens,
                        **res.metrics})
    model.eval()
    records.append(evaluate_pairs(model, objective, batches(STEPS), device))
    # the rows' log-probs on every rank (under PP from the last stage: what the precomputed pass writes)
    pair = micro_batches(tiny_config(), STEPS, 0, PAIRS)[0]
    records[-1]["sequence_logps"] = sequence_logps(model, pair)[0].tolist()
    model.train()
    return records
