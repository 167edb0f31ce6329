"""What the trainer needs around a `ParallelModel` besides the step: evaluation over data ranks, the launcher's
`Distributed` fields, and weight export.

The training step itself is `stitch.train.step.train_step`, one function for every layout (it calls
`ParallelModel.forward_backward` and `clip_grad_norm_` for a layout). `save_weights` writes the trained weights
as a Stitch checkpoint from all ranks at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from stitch.checkpoint.io import save_tensors
from stitch.checkpoint.reshard import DiskLayout, rank_dir
from stitch.layout import from_live_shape, local_name, stage_of
from stitch.parallel.runtime import ParallelModel, parallelize

__all__ = ["parallel_eval", "trainer_hooks", "save_weights"]


@torch.no_grad()
def parallel_eval(pm: ParallelModel, batch: dict) -> tuple[float, int]:
    """(mean next-token loss, labelled tokens) of `batch` summed over all data ranks (collective)."""
    loss_sum, n = pm.eval_loss(batch)
    totals = pm.pmesh.all_reduce_dp(torch.tensor([loss_sum, float(n)], device=pm.device, dtype=torch.float64))
    return float(totals[0] / max(float(totals[1]), 1.0)), int(totals[1])


def trainer_hooks(parallel_cfg: Any) -> dict[str, Any]:
    """Keyword arguments for `stitch.train.step.Distributed` in a torchrun process, before any model exists.

    `Distributed(**trainer_hooks(cfg.parallel))`: global rank, this rank's data-parallel coordinate (from the
    mesh order (pp, dp_replicate, dp_shard, tp), so TP and PP ranks of one data rank read the same data), and
    `parallelize`. Everything else (step, evaluation, collective checkpoints) follows from the `ParallelModel`.
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
