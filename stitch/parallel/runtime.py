"""`parallelize(model, parallel_cfg)`: apply a data x tensor x pipeline layout to a built VLM, and run it.

The order is torchtitan's: cut the model to this rank's pipeline stages, apply tensor parallelism (LLM and,
with its own degree, the ViT), wrap the stages, then shard them with FSDP2. The returned `ParallelModel` is the
training-side handle: `forward_backward` (one optimizer step's micro-batches, token-weighted over the whole
data-parallel batch), `clip_grad_norm_`, `logits`, and `model` (the rank's part of the VLM under the unsplit
model's parameter names, for the optimizer and for DCP checkpoints).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from stitch.checkpoint.reshard import open_weights
from stitch.checkpoint.store import materialize_buffers
from stitch.errors import StitchConfigError
from stitch.layout import Layout, to_live_shape
from stitch.models.layers import RotaryEmbedding
from stitch.models.vlm import VLM
from stitch.parallel.fsdp import apply_fsdp, mixed_precision
from stitch.parallel.mesh import ParallelMesh, build_mesh, init_distributed
from stitch.parallel.pipeline import PipelineRunner, StageModule, microbatch_side
from stitch.parallel.tensor import apply_llm_tp, apply_vision_tp

__all__ = ["parallelize", "ParallelModel", "StepOutput", "split_batch"]


@dataclass
class StepOutput:
    loss: torch.Tensor  # global token-mean loss of the step (same value on every rank)
    num_tokens: int  # labelled tokens in the global batch


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _label_count(batch: dict[str, Any]) -> int:
    """Positions that carry a next-token target (the model shifts labels by one, as token_loss does)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _pad_to(x: torch.Tensor | None, rows: int, seq: int, value: int) -> torch.Tensor | None:
    """Right-pad a [B, T] tensor to [rows, seq] with `value`."""
    if x is None or tuple(x.shape) == (rows, seq):
        return x
    return torch.nn.functional.pad(x, (0, seq - x.shape[1], 0, rows - x.shape[0]), value=value)


def _extend_segments(cu_seqlens: torch.Tensor, seq: int) -> torch.Tensor:
    """Boundaries [n+1] of a packed row right-padded to `seq` tokens: the padding is one more segment."""
    return torch.cat([cu_seqlens, cu_seqlens.new_tensor([seq])])


def split_batch(batch: dict[str, Any], parts: int, tokens_per_tile: int, image_token_id: int) -> list[dict]:
    """Split a padded batch by rows into `parts` equal batches, giving each its own tiles of `pixel_values`.

    For data parallelism and micro-batches fed from one global batch (tests, simple loaders). Tiles are in order
    of appearance, so a row's tiles are the next (image tokens in the row / tokens_per_tile) of them.
    """
    rows = batch["input_ids"].shape[0]
    if rows % parts:
        raise StitchConfigError(f"a batch of {rows} rows cannot be split into {parts} equal parts")
    if batch.get("cu_seqlens") is not None:
        raise StitchConfigError("packed batches (cu_seqlens) cannot be split by rows; pack per rank instead")
    per = rows // parts
    tiles = (batch["input_ids"] == image_token_id).sum(1) // tokens_per_tile  # [rows]
    starts = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
    out = []
    for i in range(parts):
        lo, hi = i * per, (i + 1) * per
        part = {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                for k, v in batch.items() if k != "pixel_values"}
        pv = batch.get("pixel_values")
        if pv is not None:
            part["pixel_values"] = pv[int(starts[lo]) : int(starts[hi])]
        out.append(part)
    return out


def _prune(model: VLM, layout: Layout, stage_ids: list[int]) -> None:
    """Keep only what this rank's stages hold, under the unsplit model's names (layers keyed by global index)."""
    llm = model.llm
    local = [i for s in stage_ids for i in layout.ranges[s]]
    llm.layers = nn.ModuleDict({str(i): llm.layers[i] for i in local})
    has_first, has_last = 0 in stage_ids, layout.num_stages - 1 in stage_ids
    if model.config.llm.tie_word_embeddings and has_last and not has_first:
        # The last stage needs the embedding matrix as its output layer: a copy, kept equal by summing the two
        # copies' gradients after every backward (Megatron's embedding group).
        llm.lm_head.weight = nn.Parameter(llm.embed_tokens.weight.detach().clone(),
                                          requires_grad=llm.embed_tokens.weight.requires_grad)
    if not has_first:
        model.vision = nn.Module()
        model.projector = nn.Module()
        llm.embed_tokens = None
    if not has_last:
        llm.norm = None
        llm.lm_head = None


class ParallelModel:
    """This rank's share of a parallelised VLM and the operations a trainer needs on it."""

    def __init__(self, model: VLM, stages: list[StageModule], pmesh: ParallelMesh,
                 runner: PipelineRunner | None, tied_group: dist.ProcessGroup | None):
        self.model = model
        self.stages = stages
        self.pmesh = pmesh
        self.layout = pmesh.layout
        self.runner = runner
        self._tied_group = tied_group

    # ---------------------------------------------------------------------------------------------- info
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.pmesh.device

    @property
    def dp_rank(self) -> int:
        """Feed every rank with the same dp_rank the same data (TP and PP ranks share a batch)."""
        return self.pmesh.dp_rank

    @property
    def dp_size(self) -> int:
        return self.pmesh.dp_size

    @property
    def is_first_stage(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def is_last_stage(self) -> bool:
        return any(s.is_last for s in self.stages)

    def parameters(self):
        """Local parameters (DTensors where sharded), each once: what the optimizer gets."""
        return self.model.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> ParallelModel:
        self.model.train(mode)
        for stage in self.stages:
            stage.train(mode)
        return self

    def eval(self) -> ParallelModel:
        return self.train(False)

    # ---------------------------------------------------------------------------------------------- steps
    def _loss_context(self):
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    def forward_backward(
        self, microbatches: list[dict[str, Any]] | dict[str, Any], num_label_tokens: int | None = None,
        normalized: bool = False,
    ) -> StepOutput:
        """Forward and backward over this rank's micro-batches of one optimizer step; gradients accumulate.

        The loss is token-weighted over the whole step: sum over labelled tokens / `num_label_tokens`, the
        global count over all data-parallel ranks and micro-batches (all-reduced here when not given), so the
        gradients equal those of one process on the whole batch. Under pipeline parallelism the micro-batches
        are the schedule's; they are right-padded to one shape (exact: causal attention never looks right, and
        pads carry no label).

        `normalized`: each micro-batch carries its own `loss_fn` (`VLM.forward`) whose loss is already its share
        of the global batch's loss (the preference losses divide by the global pair count); it is summed as is.
        """
        if isinstance(microbatches, dict):
            n = self.layout.microbatches or 1
            cfg = self.config
            microbatches = split_batch(microbatches, n, cfg.tokens_per_tile, cfg.image_token_id) if n > 1 else [
                microbatches]
        self._check_microbatches(len(microbatches))
        mbs = [_to(mb, self.device) for mb in microbatches]
        local = sum(_label_count(mb) for mb in mbs)
        if num_label_tokens is None:
            count = torch.tensor(float(local), device=self.device)
            num_label_tokens = int(self.pmesh.all_reduce_dp(count).item())
        total = 1 if normalized else max(num_label_tokens, 1)
        # FSDP averages gradients over the dp ranks; our loss is already a global mean, so undo the average.
        scale = self.dp_size / total
        with self._loss_context():
            if self.runner is None:
                sums = self._run_single_stage(mbs, scale)
            else:
                ids, sides = self._pipeline_inputs(mbs, scale)
                sums = self.runner.step(ids, sides)
        self._sync_tied_grads()
        loss = torch.stack(sums).sum() / total if sums else torch.zeros((), device=self.device)
        loss = self.pmesh.all_reduce_dp(loss.detach().float().clone())
        if self.layout.pp > 1:
            dist.all_reduce(loss, group=self.pmesh.group("pp"))  # only the last stage contributes
        return StepOutput(loss=loss, num_tokens=num_label_tokens)

    def _check_microbatches(self, n: int) -> None:
        pp, schedule = self.layout.pp, self.layout.pp_schedule
        if pp == 1:
            return
        if schedule != "gpipe" and n < pp:
            raise StitchConfigError(
                f"pipeline parallelism {pp} needs at least {pp} micro-batches per step, got {n} "
                "(raise parallel.pp_microbatches or the accumulation count)"
            )
        if schedule == "interleaved_1f1b" and n % pp:
            raise StitchConfigError(f"interleaved 1F1B needs a multiple of pp = {pp} micro-batches, got {n}")

    def _run_single_stage(self, mbs: list[dict[str, Any]], scale: float) -> list[torch.Tensor]:
        stage = self.stages[0]
        stage.push_side([])
        for i, mb in enumerate(mbs):
            if isinstance(stage, FSDPModule):  # reduce gradients once, after the last micro-batch
                stage.set_requires_gradient_sync(i == len(mbs) - 1)
            out = stage(mb["input_ids"], **microbatch_side(mb), loss_scale=scale)
            out.sum().backward()
        return stage.loss_sums

    def _pipeline_inputs(self, mbs: list[dict[str, Any]], scale: float):
        """Right-pad micro-batches to one (rows, seq) shape, as static pipeline stages need."""
        rows = max(mb["input_ids"].shape[0] for mb in mbs)
        seq = max(mb["input_ids"].shape[1] for mb in mbs)
        cfg = self.config
        pad_id = cfg.llm.pad_token_id if cfg.llm.pad_token_id is not None else 0
        if pad_id == cfg.image_token_id:
            pad_id = (pad_id + 1) % cfg.llm.vocab_size
        ids, sides = [], []
        for mb in mbs:
            if mb.get("cu_seqlens") is not None and mb["input_ids"].shape[0] != rows:
                raise StitchConfigError("packed micro-batches (cu_seqlens) must all have the same number of rows")
            ids.append(_pad_to(mb["input_ids"], rows, seq, pad_id))
            side = microbatch_side(mb)
            side["labels"] = _pad_to(side["labels"], rows, seq, -100)
            side["attention_mask"] = _pad_to(side["attention_mask"], rows, seq, 0)
            side["position_ids"] = _pad_to(side["position_ids"], rows, seq, 0)
            if side["cu_seqlens"] is not None and mb["input_ids"].shape[1] != seq:
                # the padding becomes a last segment of its own, as collate pads a packed row
                side["cu_seqlens"] = _extend_segments(side["cu_seqlens"], seq)
                side["max_seqlen"] = None
            side["loss_scale"] = scale
            sides.append(side)
        return ids, sides

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of the two copies of a tied embedding (first and last pipeline stage)."""
        if self._tied_group is None:
            return
        llm = self.model.llm
        param = llm.embed_tokens.weight if self.is_first_stage else llm.lm_head.weight
        if not param.requires_grad:
            return
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        dist.all_reduce(grad, group=self._tied_group)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Global L2 norm of all gradients (every shard and stage counted once); scale them to `max_norm`."""
        sums: dict[Any, list] = {}
        grads = []
        tied_copy = None
        if self._tied_group is not None and not self.is_first_stage:
            tied_copy = self.model.llm.lm_head.weight
        for p in self.model.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if p is tied_copy:
                continue  # the embedding on stage 0 already counts it
            g = p.grad
            if isinstance(g, DTensor):
                mesh = g.device_mesh
                # Sum squares over every sharded mesh dim (Shard, or FSDP+TP's _StridedShard: "not replicated").
                dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
                key, local = (id(mesh), dims), g.to_local()
                sums.setdefault(key, [mesh, dims, []])[2].append(local)
            else:
                sums.setdefault(None, [None, (), []])[2].append(g)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for mesh, dims, tensors in sums.values():
            s = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in tensors]).sum()
            for d in dims:
                dist.all_reduce(s, group=mesh.get_group(d))
            total = total + s
        if self.layout.pp > 1:
            dist.all_reduce(total, group=self.pmesh.group("pp"))
        norm = total.sqrt()
        if max_norm is not None:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
        return norm

    @torch.no_grad()
    def _forward_only(self, batch: dict[str, Any], mode: str) -> torch.Tensor | None:
        batch = _to(batch, self.device)
        side = {**microbatch_side(batch), "loss_scale": 1.0}
        try:
            with self._loss_context():
                if self.runner is not None:
                    return self.runner.forward_only(batch["input_ids"], side, mode)
                stage = self.stages[0]
                stage.mode = mode
                try:
                    return stage(batch["input_ids"], **side)
                finally:
                    stage.mode = "loss"
        finally:
            # No backward follows to free the gathered weights (kept gathered between micro-batches under PP).
            for stage in self.stages:
                if isinstance(stage, FSDPModule):
                    stage.reshard()

    def forward_output(self, batch: dict[str, Any], loss_fn) -> torch.Tensor | None:
        """`loss_fn(hidden, labels, lm_head)`'s first output for one batch, no gradients (collective over the
        layout), on the last stage's ranks (None on the others): e.g. a reference model's per-row log-probs."""
        return self._forward_only({**batch, "loss_fn": loss_fn}, "output")

    def from_last_stage(self, value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """`value` (known on the last pipeline stage's ranks) on every rank; `like` gives its shape elsewhere."""
        if self.layout.pp == 1:
            return value
        out = value.float().clone() if value is not None else torch.zeros_like(like, dtype=torch.float32)
        dist.all_reduce(out, group=self.pmesh.group("pp"))  # zeros from the other stages
        return out

    def all_reduce_metrics(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-step statistics over data ranks and pipeline stages (only the last stage computes them)."""
        self.pmesh.all_reduce_dp(values)
        if self.layout.pp > 1:
            dist.all_reduce(values, group=self.pmesh.group("pp"))
        return values

    def logits(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Full logits [B, T, V] of one batch on the last stage's ranks (None on the others); for evaluation."""
        return self._forward_only(batch, "logits")

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Any]) -> tuple[float, int]:
        """(summed next-token loss, labelled tokens) of this data rank's batch, known on every rank of it.

        Logits are never gathered (vocabulary-parallel under TP); sum over data ranks and divide for a mean.
        """
        loss_sum = self._forward_only(batch, "loss")
        total = loss_sum.reshape(()).float() if loss_sum is not None else torch.zeros((), device=self.device)
        if self.layout.pp > 1:
            dist.all_reduce(total, group=self.pmesh.group("pp"))  # only the last stage contributes
        return float(total), _label_count(batch)

    # ---------------------------------------------------------------------------------------------- weights
    def load_weights(self, source: str | Any) -> None:
        """Load unsplit weights (a checkpoint folder: plain or `stitch reshard` per-rank, or a name -> tensor
        mapping of canonical tensors) into this rank's shards. Each rank reads only the tensors it holds."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        tensors = open_weights(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else source
        padded = self.layout.padded_heads(self.config)
        state = {}
        for name, live in self.model.state_dict().items():
            if name not in tensors:
                raise StitchConfigError(f"weights: missing tensor '{name}'")
            tensor = to_live_shape(name, tensors[name], self.config, padded)
            state[name] = tensor.to(device=self.device, dtype=live.dtype)
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def _materialize(model: VLM, stages: list[StageModule], device: torch.device) -> None:
    """Allocate a meta-built model's local shards (uninitialised) and recompute its non-persistent buffers."""
    for stage in stages:  # through the FSDP roots, so FSDP re-points its sharded storage
        stage.to_empty(device=device)
    # to_empty left the RoPE tables allocated but garbage: make them meta again so they are recomputed.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = torch.empty_like(module.inv_freq, device="meta")
    materialize_buffers(model, device)


def _tied_group(pmesh: ParallelMesh) -> dist.ProcessGroup | None:
    """Groups {first stage, last stage} per (dp, tp) coordinate; every rank creates all of them, in one order."""
    ranks = pmesh.mesh.mesh  # [pp, dp_replicate, dp_shard, tp]
    first, last = ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()
    mine = None
    me = dist.get_rank()
    for a, b in zip(first, last):
        group = dist.new_group([a, b])
        if me in (a, b):
            mine = group
    return mine


def parallelize(
    model: VLM,
    parallel_cfg: Any,
    *,
    device: torch.device | None = None,
    mesh: ParallelMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Apply the layout in `parallel_cfg` (a `Layout`, the training config's `parallel:` section, or a dict) to
    `model` in place and return the rank's `ParallelModel`. Initialises torch.distributed if needed (torchrun).

    Every rank passes the same model (same weights, e.g. same seed or loaded from the same checkpoint). A model
    built on the meta device (`stitch.checkpoint.store.build_model(cfg, device="meta")`) allocates only this
    rank's shards; fill them with `ParallelModel.load_weights`. Freeze parameters and set gradient checkpointing
    before.
    `param_dtype`/`reduce_dtype` set FSDP2 mixed precision (e.g. bf16 compute, fp32 reduction).
    """
    device = init_distributed(device)
    world = dist.get_world_size()
    layout = parallel_cfg if isinstance(parallel_cfg, Layout) else Layout.from_config(parallel_cfg, model.config, world)
    layout.check(model.config, world)
    pmesh = mesh or build_mesh(layout, device)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(device)
    stage_ids = [pmesh.pp_rank + v * layout.pp for v in range(layout.stages_per_rank)]
    _prune(model, layout, stage_ids)
    if 0 in stage_ids:
        apply_vision_tp(model.vision, pmesh.tp_mesh(vision=True), layout.padded_heads(model.config))
    if layout.tp > 1:
        apply_llm_tp(model, pmesh.tp_mesh())
    stages = [StageModule(model, s, layout.num_stages, layout.ranges[s], tp_loss=layout.tp > 1) for s in stage_ids]
    for stage in stages:
        stage.run_vision_always = layout.dp > 1
    mp = mixed_precision(param_dtype, reduce_dtype) if (param_dtype or reduce_dtype) else None
    apply_fsdp(stages, pmesh, mp)
    if on_meta:  # allocate only this rank's shards; the caller fills them with `load_weights`
        _materialize(model, stages, device)
    runner = None
    if layout.pp > 1:
        runner = PipelineRunner(stages, layout.pp_schedule, pmesh.group("pp"), device, model.config.llm.hidden_size)
    tied = _tied_group(pmesh) if (layout.pp > 1 and model.config.llm.tie_word_embeddings) else None
    return ParallelModel(model, stages, pmesh, runner, tied)
