"""One optimizer step, for every layout: `train_step` and what a parallel launcher plugs into it (`Distributed`).

`train_step(model, optimizer, micro_batches, ...)` is one optimizer step over a list of micro-batches: it counts
the label tokens of the whole global batch first (summed over data-parallel ranks through the `all_reduce` hook),
passes that count to every micro-batch forward so each loss is `sum / N_global`, and the summed gradients are
exactly the gradient of the per-token mean over the global batch, however unequal the micro-batches
(token-weighted, not batch-averaged). Then clipping, the non-finite check and the update. `stitch.parallel` reuses
the numerics (`stitch.parallel.step.parallel_train_step` mirrors it under a pipeline schedule); the bookkeeping
around the step is `stitch.train.loop.Trainer`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stitch.train.config import TrainConfig

__all__ = ["train_step", "StepResult", "Distributed", "count_label_tokens", "mask_is_redundant", "MODEL_INPUTS"]

# Batch keys the model takes; the rest (num_tiles, sample_keys, the micro-batch's own num_label_tokens) stay out.
MODEL_INPUTS = ("input_ids", "pixel_values", "labels", "attention_mask", "position_ids", "cu_seqlens", "max_seqlen")

# ------------------------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch (all micro-batches, all ranks)
    grad_norm: float  # total L2 norm of the trainable gradients before clipping
    label_tokens: int  # labels of the global batch
    skipped: bool  # non-finite loss or gradient: no update was made


def count_label_tokens(micro_batches: Sequence[dict]) -> int:
    """Positions that carry a loss in these micro-batches (labels are unshifted: position 0 never does)."""
    return sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)


def mask_is_redundant(batch: dict) -> bool:
    """True when dropping `attention_mask` changes no labelled position, so attention can take the fused
    causal (or varlen) kernel instead of a dense mask: packed rows (collate makes padding its own segment) and
    right-padded rows (causal attention never lets a real token see the padding after it; the padding rows
    themselves carry no labels). Checked on the host copy only, to add no device sync."""
    mask = batch.get("attention_mask")
    if mask is None or batch.get("cu_seqlens") is not None:
        return True
    if mask.device.type != "cpu" or mask.dim() != 2:
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k in MODEL_INPUTS:
        v = batch.get(k)
        if v is not None:
            out[k] = v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    if device.type == "cuda" and "attention_mask" in out and mask_is_redundant(batch):
        # On CUDA this buys the fused causal / varlen kernels; on CPU the masked path measured faster for short
        # bf16 rows (quickstart stage 1: 0.59 s/step with the mask, 0.89 without), so CPU keeps it.
        del out["attention_mask"]
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_sync: Callable[[bool], None] | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    Hooks for a parallel wrapper (all optional; defaults are single-process):
    - `all_reduce(t)`: sum `t` over data-parallel ranks in place and return it (the label count and the loss);
    - `grad_sync(on)`: called before each backward with True only for the last micro-batch (DDP `no_sync` /
      FSDP2 `set_requires_gradient_sync`), so gradients are reduced once per step;
    - `params`: the trainable parameters to clip (default: those of `model` with requires_grad).
    A non-finite loss or gradient norm skips the update (gradients are dropped) and returns skipped=True;
    the caller counts it. The model is assumed in train mode; gradients are left cleared.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    n_local = torch.tensor(float(count_label_tokens(micro_batches)), device=device)
    n_global = all_reduce(n_local.clone()) if all_reduce is not None else n_local
    # An all-masked global batch has no loss; dividing by 1 keeps it 0 rather than NaN.
    denom = torch.clamp(n_global, min=1.0)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    for i, mb in enumerate(micro_batches):
        inputs = _to_device(mb, device)
        if grad_sync is not None:
            grad_sync(i == len(micro_batches) - 1)
        with autocast:
            out = model(**inputs, num_label_tokens=denom, return_logits=False)
        out.loss.backward()
        loss_sum += out.loss.detach().float()
    if all_reduce is not None:
        loss_sum = all_reduce(loss_sum)
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=device.type == "cuda" or None)
    loss, norm = (float(x) for x in torch.stack([loss_sum, grad_norm.float().to(device)]).tolist())
    if not (math.isfinite(loss) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm, int(n_global.item()), skipped=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, norm, int(n_global.item()), skipped=False)


# ------------------------------------------------------------------------------------------- the launcher's hooks
@dataclass
class Distributed:
    """What a parallel launcher supplies; the defaults describe one process on one device.

    - `rank`: the global rank (rank 0 logs, prints and writes the run's files); `dp_rank`/`dp_size`: this
      rank's place among data-parallel replicas (the data stream is split by these, the global batch too);
    - `parallelize(model, cfg)`: the module to train (e.g. `stitch.parallel.parallelize`'s handle); the
      optimizer is built afterwards from `model.parts()`, so it sees the sharded/pruned parameters;
    - `all_reduce`, `grad_sync`: passed to `train_step` (see there);
    - `step_fn(module, optimizer, micro_batches, max_grad_norm=, autocast_dtype=)`: replaces `train_step`
      when the layout must drive the micro-batches itself (a pipeline schedule); it returns an object with
      `StepResult`'s fields (`stitch.parallel.step.parallel_train_step` fits);
    - `eval_fn(module, batch) -> (mean loss, label tokens)`, both over all ranks, for validation under such
      a layout (collective: every rank calls it).
    - `barrier()`, `save_weights(module, folder)`: collectives for checkpoints under the layout (every rank
      writes its share of one step folder, `stitch.train.state`); without them such a run cannot save.
    """

    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    parallelize: Callable[[nn.Module, TrainConfig], Any] | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_sync: Callable[[bool], None] | None = None
    step_fn: Callable[..., Any] | None = None
    eval_fn: Callable[[Any, dict], tuple[float, int]] | None = None
    barrier: Callable[[], None] | None = None
    save_weights: Callable[[Any, Path], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective(self) -> bool:
        """A parallel layout whose ranks write checkpoints together."""
        return self.parallelize is not None

