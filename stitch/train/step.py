"""One optimizer step, for every layout: `train_step`, `eval_batch`, and what a launcher passes (`Distributed`).

`train_step(model, optimizer, micro_batches, ...)` is one optimizer step over a list of micro-batches, whatever
runs them (torchtitan's `forward_backward_step` / `train_step`, with the layout a branch inside):
- one process (`model` an `nn.Module`): the label tokens of the whole batch are counted first and passed to
  every micro-batch forward, so each loss is `sum / N` and the summed gradients are exactly the gradient of the
  per-token mean over the batch, however unequal the micro-batches (token-weighted, not batch-averaged);
- a parallel layout (`model` a `stitch.parallel.ParallelModel`): the layout's `forward_backward` does the same
  with `N` counted over every data-parallel rank, running the micro-batches itself (a pipeline schedule cannot
  be driven one micro-batch at a time), and clipping counts every shard and stage once.
Then, for both: the non-finite check, the update, one `StepResult`. The bookkeeping around the step is
`stitch.train.loop.Trainer`'s.

`objective`: a loss other than the next-token one, for the same step (the preference stages'
`stitch.train.preference.PairObjective`): it gives each micro-batch a `loss_fn` (`VLM.forward`) whose loss is
already that micro-batch's share of the global batch's loss, and the step's metrics afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from stitch.parallel.runtime import ParallelModel
from stitch.parallel.step import parallel_eval
from stitch.train.config import TrainConfig

__all__ = ["train_step", "eval_batch", "StepResult", "Objective", "Distributed", "count_label_tokens",
           "mask_is_redundant", "MODEL_INPUTS"]

# Batch keys the model takes; the rest (num_tiles, sample_keys, the micro-batch's own num_label_tokens) stay out.
MODEL_INPUTS = ("input_ids", "pixel_values", "labels", "attention_mask", "position_ids", "cu_seqlens", "max_seqlen")


# ------------------------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch (all micro-batches, all ranks)
    grad_norm: float  # total L2 norm of the trainable gradients before clipping
    label_tokens: int  # labels of the global batch
    skipped: bool  # non-finite loss or gradient: no update was made
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (preference stages), global


class Objective(Protocol):
    """A loss other than the token-mean next-token loss, run by `train_step` (see the module docstring)."""

    def loss_fns(self, model: Any, micro_batches: Sequence[dict], device: torch.device,
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[Callable]:
        """One `loss_fn(hidden, labels, lm_head) -> (loss, labelled tokens)` per micro-batch, each loss its share
        of the global batch's; `reduce` sums a tensor over the data-parallel ranks (identity in one process)."""
        ...

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The step's metrics; `reduce` sums over data ranks and pipeline stages."""
        ...


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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(
    model: nn.Module | ParallelModel,
    optimizer: torch.optim.Optimizer | None,
    micro_batches: Sequence[dict],
    *,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    objective: Objective | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of the global batch); see the module docstring.

    `params`: the trainable parameters to clip in one process (default: those of `model` with requires_grad).
    Under a layout every rank calls it (collective) and `optimizer` may be None on a rank with nothing to train
    (a middle pipeline stage while only the projector trains). A non-finite loss or gradient norm skips the
    update (gradients are dropped) and returns skipped=True; the caller counts it. The model is assumed in
    train mode; gradients are left cleared.
    """
    parallel = isinstance(model, ParallelModel)
    if parallel:
        device = model.device
        count_reduce, metric_reduce = model.pmesh.all_reduce_dp, model.all_reduce_metrics
    else:
        device = device if device is not None else next(model.parameters()).device
        count_reduce = metric_reduce = _identity
    loss_fns = objective.loss_fns(model, micro_batches, device, count_reduce) if objective is not None else None
    if parallel:
        mbs = list(micro_batches)
        if loss_fns is not None:
            mbs = [{**mb, "loss_fn": fn} for mb, fn in zip(mbs, loss_fns)]
        with _autocast(model.device, autocast_dtype):
            out = model.forward_backward(mbs, normalized=loss_fns is not None)
        grad_norm = model.clip_grad_norm_(max_grad_norm)
        loss_t, n_global = out.loss, out.num_tokens
    else:
        loss_t, n_global, grad_norm = _forward_backward(model, micro_batches, device, autocast_dtype, max_grad_norm,
                                                        params, loss_fns)
    metrics = objective.metrics(metric_reduce) if objective is not None else {}
    # One host sync for both; on a layout both are global, so every rank takes the same branch below.
    loss, norm = (float(x) for x in torch.stack([loss_t.float(), grad_norm.float().to(device)]).tolist())
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if optimizer is not None:
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None
    return StepResult(loss, norm, n_global, skipped=skipped, metrics=metrics)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _forward_backward(
    model: nn.Module,
    micro_batches: Sequence[dict],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None,
    params: Sequence[torch.Tensor] | None,
    loss_fns: Sequence[Callable] | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One process: (summed token-weighted loss, label tokens, gradient norm before clipping)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    n_global = count_label_tokens(micro_batches)
    # An all-masked batch has no loss; dividing by 1 keeps it 0 rather than NaN. A tensor, not a number, so a
    # compiled model does not specialise on each step's count.
    denom = torch.tensor(float(max(n_global, 1)), device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    autocast = _autocast(device, autocast_dtype)
    for i, mb in enumerate(micro_batches):
        inputs = _to_device(mb, device)
        if loss_fns is not None:
            inputs["loss_fn"] = loss_fns[i]
        with autocast:
            out = model(**inputs, num_label_tokens=denom, return_logits=False)
        out.loss.backward()
        loss_sum += out.loss.detach().float()
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=device.type == "cuda" or None)
    return loss_sum, n_global, grad_norm


@torch.no_grad()
def eval_batch(
    model: nn.Module | ParallelModel, batch: dict, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> tuple[float, int]:
    """(mean next-token loss, labelled tokens) of one validation batch; under a layout over all data ranks
    (collective), in one process of this batch."""
    with _autocast(device, autocast_dtype):
        if isinstance(model, ParallelModel):
            return parallel_eval(model, batch)
        out = model(**_to_device(batch, device), return_logits=False)
    return float(out.loss), int(out.num_label_tokens)


# ------------------------------------------------------------------------------------------- the launcher's hooks
@dataclass
class Distributed:
    """What a parallel launcher supplies (`stitch.parallel.step.trainer_hooks`); the defaults are one process.

    - `rank`: the global rank (rank 0 logs, prints and writes the run's files); `dp_rank`/`dp_size`: this
      rank's place among data-parallel replicas (the data stream is split by these, the global batch too);
    - `parallelize(model, cfg)`: the module to train, a `stitch.parallel.ParallelModel`; the optimizer is
      built afterwards from `model.parts()`, so it sees the sharded/pruned parameters. The step, evaluation and
      the collective checkpoint writer all follow from that handle (`train_step`, `eval_batch`,
      `stitch.parallel.step.save_weights`).
    """

    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    parallelize: Callable[[nn.Module, TrainConfig], Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective(self) -> bool:
        """A parallel layout whose ranks write checkpoints together."""
        return self.parallelize is not None
