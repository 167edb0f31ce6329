"""Pipeline parallelism: the model cut into stages that run its own forward, driven by torch's schedules.

A `StageModule` is a `VLM` pruned the torchtitan way (`stitch.models.vlm`): it shares one stage's share of a
built VLM's modules under the model's own attribute names (`vision.*`, `projector.*`, `llm.embed_tokens`,
`llm.layers.<global index>`, `llm.norm`, `llm.lm_head`), the others `None`, so `VLM.forward` runs on the slice
(RoPE, masks, the varlen kernel for packed rows, activation checkpointing: all the model's), and state dicts,
optimizer states and DCP checkpoints keep the unsplit model's names whatever the layout. The last stage returns
the scaled summed loss itself, so the schedule's loss function only checks it and the output layer never leaves
the module (FSDP gathers its weight only inside a module's forward).

Only the hidden state travels between stages. Everything else a stage needs per micro-batch (labels, masks,
position ids, pixel values, packed-sequence boundaries) is handed to each stage before the step as a list, one
entry per micro-batch, and consumed in order: every torch schedule (GPipe, 1F1B, interleaved 1F1B) runs a
stage's forwards in micro-batch order, and the last stage checks the index it receives from the schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from stitch.models.llm import LLM
from stitch.models.vlm import VLM
from stitch.parallel.tensor import vocab_parallel_loss_sum

__all__ = ["StageModule", "PipelineRunner", "microbatch_side"]

# `loss_fn`: a micro-batch's own loss in place of the next-token loss (`VLM.forward`; the preference stages).
SIDE_KEYS = ("pixel_values", "attention_mask", "position_ids", "cu_seqlens", "max_seqlen", "labels", "loss_fn")


def microbatch_side(batch: dict[str, Any]) -> dict[str, Any]:
    """The per-micro-batch inputs other than `input_ids` that stages read."""
    return {k: batch.get(k) for k in SIDE_KEYS}


def _llm_slice(llm: LLM, layers: range, first: bool, last: bool) -> LLM:
    """An `LLM` sharing `llm`'s modules for one stage: its `layers` (by global index), the embedding on the
    first stage, the final norm and output layer on the last, `None` for the rest (what `LLM.forward` skips)."""
    part = LLM.__new__(LLM)
    nn.Module.__init__(part)
    # plain attributes (config, flags such as gradient_checkpointing) as the model has them; modules below
    part.__dict__.update({k: v for k, v in vars(llm).items() if not k.startswith("_")})
    part.embed_tokens = llm.embed_tokens if first else None
    part.layers = nn.ModuleDict({str(i): llm.layers[str(i)] for i in layers})
    part.norm = llm.norm if last else None
    part.lm_head = llm.lm_head if last else None
    part.rotary = llm.rotary
    return part


class StageModule(VLM):
    """One pipeline stage (or the whole model when pp = 1): the VLM pruned to this stage's pieces.

    forward(x, **side): x is `input_ids` [B, T] on the first stage, the hidden state [B, T, D] elsewhere.
    Returns the hidden state (not last), the scaled loss sum [1] (last, mode "loss"), logits (last, "logits"), or
    the side's `loss_fn` output as it is (last, "output": e.g. per-row log-probs for a reference forward).
    `side` comes either as keyword arguments (pp = 1) or from `push_side` (pipeline schedules).
    Set gradient checkpointing on the model before building stages (the flag is copied).
    """

    def __init__(self, model: VLM, index: int, num_stages: int, layers: range, tp_loss: bool):
        nn.Module.__init__(self)
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.config = model.config
        self.tp_loss = tp_loss
        self.vision = model.vision if self.is_first else None
        self.projector = model.projector if self.is_first else None
        self.llm = _llm_slice(model.llm, layers, self.is_first, self.is_last)
        self.comm_dtype = next(model.parameters()).dtype
        self.mode = "loss"
        self.run_vision_always = False  # set under data parallelism (see _idle_vision)
        self._side: list[dict[str, Any]] = []
        self._cursor = 0
        self.loss_sums: list[torch.Tensor] = []
        self.consumed: list[int] = []

    def push_side(self, side: list[dict[str, Any]]) -> None:
        self._side, self._cursor = side, 0
        self.loss_sums, self.consumed = [], []

    def _next_side(self) -> dict[str, Any]:
        if self._cursor >= len(self._side):
            raise RuntimeError(f"pipeline stage {self.index}: more forwards than micro-batches were given")
        side = self._side[self._cursor]
        self.consumed.append(self._cursor)
        self._cursor += 1
        return side

    def label_loss(self, hidden, labels, num_label_tokens=None):
        """Under tensor parallelism the logits stay split on the vocabulary (`vocab_parallel_loss_sum`)."""
        if not self.tp_loss:
            return super().label_loss(hidden, labels, num_label_tokens)
        loss_sum, n = vocab_parallel_loss_sum(hidden, self.llm.lm_head, labels)
        return loss_sum / (num_label_tokens if num_label_tokens is not None else max(n, 1)), n

    def forward(self, x: torch.Tensor, **side: Any) -> torch.Tensor:
        if not side:
            side = self._next_side()
        wants_loss = self.is_last and self.mode in ("loss", "output")
        out = super().forward(
            x,
            pixel_values=side.get("pixel_values"),
            labels=side["labels"] if wants_loss else None,
            attention_mask=side.get("attention_mask"),
            position_ids=side.get("position_ids"),
            cu_seqlens=side.get("cu_seqlens"),
            max_seqlen=side.get("max_seqlen"),
            num_label_tokens=1,  # a sum: the caller's loss_scale makes it the step's token-weighted mean
            return_logits=self.is_last and self.mode == "logits",
            loss_fn=side.get("loss_fn"),
        )
        if not self.is_last:
            result = out.hidden_states.to(self.comm_dtype)
        elif self.mode == "logits":
            logits = out.logits
            result = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        elif self.mode == "output":
            result = out.loss
        else:
            self.loss_sums.append(out.loss.detach())
            result = (out.loss * side["loss_scale"]).reshape(1).clone()  # not a view: FSDP hooks its outputs
        return result

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """`VLM.embed`, plus 0 x (the ViT and projector on one blank tile) for a text-only micro-batch under FSDP.

        Every data-parallel rank must run the same sharded modules in the same order (their all-gathers and
        gradient reductions are collectives); a rank whose micro-batch has no image would otherwise skip the
        ViT and hang the others. The blank tile contributes exactly zero to the output and to the gradients.
        """
        h = super().embed(input_ids, pixel_values)  # [B, T, D]
        if self.run_vision_always and (pixel_values is None or pixel_values.numel() == 0):
            size = self.config.vision.image_size
            blank = torch.zeros(1, self.config.vision.num_channels, size, size, device=h.device)
            h = h + self.image_embeddings(blank).sum().to(h.dtype) * 0.0
        return h


def _schedule_class(name: str):
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}[name]


def _supports(fn: Callable, arg: str) -> bool:
    return arg in inspect.signature(fn).parameters


class PipelineRunner:
    """Builds torch `PipelineStage`s and a schedule for each micro-batch shape, and runs training steps.

    Shapes are given to `PipelineStage` up front (static mode, no shape-inference forward), which is why a new
    stage/schedule pair is built (and cached) per distinct (micro-batch rows, sequence length).
    """

    def __init__(
        self,
        stages: list[StageModule],
        schedule: str,
        group: dist.ProcessGroup,
        device: torch.device,
        hidden_size: int,
    ):
        self.stages = stages
        self.schedule_name = schedule
        self.group = group
        self.device = device
        self.hidden_size = hidden_size
        self._cache: dict[tuple, Any] = {}

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def _schedule(self, rows: int, seq: int, n_mb: int):
        key = (rows, seq, n_mb)
        if key in self._cache:
            return self._cache[key]
        pipe_stages = []
        for stage in self.stages:
            # Example tensors give the static shapes; requires_grad marks them as carrying gradients back.
            hidden = torch.empty(rows, seq, self.hidden_size, dtype=stage.comm_dtype, device=self.device,
                                 requires_grad=True)
            inputs = torch.empty(rows, seq, dtype=torch.long, device=self.device) if stage.is_first else hidden
            loss = torch.empty(1, dtype=torch.float32, device=self.device, requires_grad=True)
            outputs = loss if stage.is_last else hidden
            pipe_stages.append(
                PipelineStage(
                    stage, stage.index, stage.num_stages, self.device,
                    input_args=(inputs,), output_args=(outputs,), group=self.group,
                )
            )
        cls = _schedule_class(self.schedule_name)
        kwargs: dict[str, Any] = {"loss_fn": self._loss_fn}
        if _supports(cls.__init__, "scale_grads"):
            kwargs["scale_grads"] = False  # the loss is already token-weighted over the whole batch
        target = pipe_stages if self.schedule_name == "interleaved_1f1b" else pipe_stages[0]
        schedule = cls(target, n_mb, **kwargs)
        self._cache[key] = schedule
        return schedule

    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage already returns the scaled loss; `target` carries the micro-batch index as a check."""
        last = next(s for s in self.stages if s.is_last)
        expected = last.consumed[len(last.loss_sums) - 1] if last.loss_sums else -1
        if int(target.reshape(-1)[0]) != expected:
            raise RuntimeError(
                f"pipeline schedule ran micro-batch {int(target.reshape(-1)[0])} but the last stage consumed side "
                f"inputs for micro-batch {expected}"
            )
        return output.sum()

    def step(self, input_ids: list[torch.Tensor], sides: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Forward and backward over the micro-batches (all [rows, seq]); returns the last stage's loss sums."""
        n_mb = len(input_ids)
        rows, seq = input_ids[0].shape
        schedule = self._schedule(rows, seq, n_mb)
        for stage in self.stages:
            stage.push_side(sides)
        args = (torch.cat(input_ids, 0),) if self.has_first else ()
        kwargs: dict[str, Any] = {}
        if self.has_last:
            kwargs["target"] = torch.arange(n_mb, device=self.device)
        if _supports(schedule.step, "return_outputs"):
            kwargs["return_outputs"] = False
        schedule.step(*args, **kwargs)
        for stage in self.stages:
            if stage.consumed != list(range(n_mb)):
                raise RuntimeError(f"pipeline stage {stage.index} consumed micro-batches {stage.consumed}")
        last = [s for s in self.stages if s.is_last]
        return last[0].loss_sums if last else []

    @torch.no_grad()
    def forward_only(self, input_ids: torch.Tensor, side: dict[str, Any], mode: str) -> torch.Tensor | None:
        """One batch through the stages with plain send/recv, no schedule (evaluation).

        Returns, on the last stage's ranks, the logits (mode "logits") or the scaled loss sum (mode "loss",
        `side` then carries labels and loss_scale); None on the other ranks.
        """
        rows, seq = input_ids.shape
        h: torch.Tensor | None = None
        by_index = {s.index: s for s in self.stages}
        num_stages = self.stages[0].num_stages
        pp_size = dist.get_world_size(self.group)
        pp_rank = dist.get_rank(self.group)
        out = None
        for index in range(pp_rank, num_stages, pp_size):  # this rank's stages, in order
            stage = by_index[index]
            if not stage.is_first:  # consecutive stages always sit on different ranks when pp > 1
                h = torch.empty(rows, seq, self.hidden_size, dtype=stage.comm_dtype, device=self.device)
                dist.recv(h, group=self.group, group_src=(index - 1) % pp_size)
            stage.mode = mode
            try:
                result = stage(input_ids if stage.is_first else h, **side)
            finally:
                stage.mode = "loss"
            if stage.is_last:
                out = result
            else:
                h = result
                dist.send(h.contiguous(), group=self.group, group_dst=(index + 1) % pp_size)
        return out
