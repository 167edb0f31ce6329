"""One optimizer step on a `ParallelModel`, with the single-process trainer's semantics, and weight export.

`parallel_train_step` mirrors `stitch.train.trainer.train_step` (token-weighted loss over the whole global
batch, clipping, a non-finite loss or gradient norm skips the update) but lets the layout run the micro-batches
(a pipeline schedule cannot be driven one micro-batch at a time) and clips with a norm that counts every shard
and stage once. `save_weights` writes the trained weights as a Stitch checkpoint from all ranks at once.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from stitch.checkpoint.io import save_tensors
from stitch.checkpoint.reshard import DiskLayout, rank_dir
from stitch.layout import from_live_shape, local_name, stage_of
from stitch.parallel.runtime import ParallelModel, parallelize

__all__ = ["ParallelStepResult", "parallel_train_step", "parallel_eval", "trainer_hooks", "save_weights"]


@dataclass
class ParallelStepResult:
    """Same fields as `stitch.train.trainer.StepResult`."""

    loss: float
    grad_norm: float
    label_tokens: int
    skipped: bool


def parallel_train_step(
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer | None,
    micro_batches: Sequence[dict],
    *,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ParallelStepResult:
    """Forward/backward over this rank's micro-batches, clip, update (collective: every rank calls it).

    `optimizer` may be None on a rank with nothing to train (e.g. a middle pipeline stage while only the
    projector trains); it still takes part in the collectives.
    """
    autocast = (
        torch.autocast(device_type=pm.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        out = pm.forward_backward(list(micro_batches))
    norm = float(pm.clip_grad_norm_(max_grad_norm))
    loss = float(out.loss)
    skipped = not (math.isfinite(loss) and math.isfinite(norm))  # identical on every rank: both are global
    if optimizer is not None:
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in pm.parameters():
            p.grad = None
    return ParallelStepResult(loss, norm, out.num_tokens, skipped)


@torch.no_grad()
def parallel_eval(pm: ParallelModel, batch: dict) -> tuple[float, int]:
    """(mean next-token loss, labelled tokens) of `batch` summed over all data ranks (collective)."""
    loss_sum, n = pm.eval_loss(batch)
    totals = pm.pmesh.all_reduce_dp(torch.tensor([loss_sum, float(n)], device=pm.device, dtype=torch.float64))
    return float(totals[0] / max(float(totals[1]), 1.0)), int(totals[1])


def trainer_hooks(parallel_cfg: Any) -> dict[str, Any]:
    """Keyword arguments for `stitch.train.trainer.Distributed` in a torchrun process, before any model exists.

    `Distributed(**trainer_hooks(cfg.parallel))`: global rank, this rank's data-parallel coordinate (from the
    mesh order (pp, dp_replicate, dp_shard, tp), so TP and PP ranks of one data rank read the same data),
    `parallelize`, and the step and evaluation functions that let the layout drive the micro-batches.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    def get(key: str, default: int) -> int:
        value = parallel_cfg.get(key) if isinstance(parallel_cfg, dict) else getattr(parallel_cfg, key, None)
        return default if value in (None, -1) else int(value)

    tp, pp = get("tp", 1), get("pp", 1)
    dp = get("dp", world // (tp * pp))
    return {
        "rank": rank,
        "dp_rank": (rank // tp) % dp,
        "dp_size": dp,
        "parallelize": lambda model, cfg: parallelize(model, cfg.parallel),
        "step_fn": parallel_train_step,
        "eval_fn": parallel_eval,
        "barrier": dist.barrier,
        "save_weights": save_weights,
    }


def save_weights(pm: ParallelModel, out: str | Path) -> None:
    """Write the full weights as a Stitch checkpoint folder (collective). Rank 0 writes config.json.

    With one stage the folder holds `model.safetensors`; under pipeline parallelism it holds one folder per
    (virtual) stage, `tp0_pp{s}/`, and a `layout.json` (the `stitch reshard` format, tp 1), written by each
    stage's first rank with no rank ever holding more than its stage: `stitch reshard OUT --out MERGED` merges
    them, and `stitch.parallel` / `stitch reshard` read the folder as is. The folder is not written
    atomically; write to a fresh path and rename after the final barrier.
    """
    out = Path(out)
    cfg = pm.config
    layout = pm.layout
    padded = layout.padded_heads(cfg)
    state = get_model_state_dict(pm.model, options=StateDictOptions(full_state_dict=True))
    state = {k: from_live_shape(k, v, cfg, padded).cpu() for k, v in state.items()}
    if cfg.llm.tie_word_embeddings and "llm.embed_tokens.weight" in state and layout.num_stages == 1:
        state.pop("llm.lm_head.weight", None)
    writer = pm.dp_rank == 0 and pm.pmesh.tp_rank == 0
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    dist.barrier()
    if layout.num_stages == 1:
        if writer:
            save_tensors(state, out)
    else:
        ranges = layout.ranges
        for stage in pm.stages:
            s = stage.index
            names = [n for n in state if _in_stage(n, s, ranges)]
            if writer:
                folder = out / rank_dir(0, s)
                folder.mkdir(parents=True, exist_ok=True)
                save_tensors({local_name(n, ranges): state[n] for n in names}, folder)
        if dist.get_rank() == 0:
            DiskLayout(tp=1, pp=layout.num_stages, vision_tp=1, layers_per_stage=list(layout.layers_per_stage),
                       vision_num_heads=cfg.vision.num_heads, vision_padded_heads=cfg.vision.num_heads,
                       tie_word_embeddings=cfg.llm.tie_word_embeddings).save(out)
    dist.barrier()


def _in_stage(name: str, stage: int, ranges: list[range]) -> bool:
    if name == "llm.lm_head.weight":
        return stage == len(ranges) - 1
    return stage_of(name, ranges) == stage
