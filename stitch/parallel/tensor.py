"""Tensor parallelism applied to a built model from outside, with DTensor's column/row-parallel styles.

The plan (which module is split which way) is `stitch.layout`'s, the one `stitch reshard` and DCP resharding read;
this module only turns it into DTensor styles. Per LLM decoder layer (Megatron's split): q/k/v and gate/up are
column-parallel (each rank computes a slice of the heads / of the FFN), o_proj and down_proj row-parallel (partial
sums all-reduced once per block). The attention reshapes with `view(b, t, -1, head_dim)`, so a rank's slice of heads
works without model changes. The embedding is vocabulary-parallel (each rank looks up its rows, partial results are
summed) and so is the output layer: logits stay sharded on the vocabulary and `vocab_parallel_loss_sum` computes the
cross-entropy under `loss_parallel`, so full logits are never gathered.

The ViT gets its own degree (`vision_tp`, 1 = replicated). Its heads are zero-padded to a multiple of it (see
`stitch.layout`), and InternViT-6B's QK-norm, which normalises over the full width, is replaced by `ShardedQKNorm`:
it sums squares over the rank's slice, all-reduces the sum and divides by the real width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from stitch.layout import LLM_LAYER_PLAN, PROJECTOR_PLAN, VISION_LAYER_PLAN, pad_heads, projector_is_split
from stitch.models.llm import chunked_cross_entropy_sum, labelled_positions
from stitch.models.vision import VisionAttention, VisionEncoder
from stitch.models.vlm import VLM

__all__ = ["apply_llm_tp", "apply_vision_tp", "pad_vision_heads", "ShardedQKNorm", "vocab_parallel_loss_sum"]


_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def _dtensor_plan(plan: dict[str, str]) -> dict[str, ColwiseParallel | RowwiseParallel]:
    """DTensor styles for one of `stitch.layout`'s module plans (the plan `stitch reshard` splits files by)."""
    return {module: _STYLES[style]() for module, style in plan.items()}


def _keep_requires_grad(module: nn.Module):
    """parallelize_module re-creates parameters with requires_grad=True; remember the frozen ones by name."""
    return {name: p.requires_grad for name, p in module.named_parameters()}


def _restore_requires_grad(module: nn.Module, flags: dict[str, bool]) -> None:
    for name, p in module.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def apply_llm_tp(model: VLM, tp_mesh: DeviceMesh) -> None:
    """Shard the LLM pieces (and the projector) that this rank holds; absent pieces are skipped.

    `model` may be pruned to one pipeline stage: `llm.layers` is then a ModuleDict of the local layers.
    """
    flags = _keep_requires_grad(model)
    llm = model.llm
    layers = llm.layers.values() if isinstance(llm.layers, nn.ModuleDict) else llm.layers
    for layer in layers:
        parallelize_module(layer, tp_mesh, _dtensor_plan(LLM_LAYER_PLAN))
    embed = getattr(llm, "embed_tokens", None)
    head = getattr(llm, "lm_head", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if embed is not None:
        parallelize_module(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if head is not None:
        # Logits stay sharded on the vocabulary (a DTensor) for the loss-parallel cross-entropy.
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
        if tied:  # both are Shard(0) over the vocabulary: one parameter serves both again
            head.weight = embed.weight
    projector = getattr(model, "projector", None)
    if projector is not None and projector_is_split(model.config):
        parallelize_module(projector, tp_mesh, _dtensor_plan(PROJECTOR_PLAN))
    _restore_requires_grad(model, flags)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce: each rank's consumers of the sum are its own heads,
    so each rank's gradient of the sum is partial and the true gradient is their total."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedQKNorm(nn.Module):
    """InternViT's full-width RMSNorm on q or k when q/k are split over ranks and/or padded with zero heads.

    The mean square is over the real width (`width`), not the padded one: zero-padded channels add nothing to
    the sum of squares, so padding leaves the result unchanged. Numerics follow the unsharded norm (fp32, cast
    back before the weight).
    """

    def __init__(self, weight: nn.Parameter, width: int, eps: float, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = weight
        self.width = width
        self.eps = eps
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        sum_sq = x32.pow(2).sum(-1, keepdim=True)
        if self.group is not None:
            sum_sq = _SumOverRanks.apply(sum_sq, self.group)
        x32 = x32 * torch.rsqrt(sum_sq / self.width + self.eps)
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return weight * x32.to(dtype)


def _replace_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


@torch.no_grad()
def pad_vision_heads(attn: VisionAttention, heads: int, padded: int) -> None:
    """Zero-pad one attention block from `heads` to `padded` heads (q/k/v rows, o_proj columns, QK-norm)."""
    if padded == heads:
        return
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _replace_param(proj, "weight", pad_heads(proj.weight.data, 0, heads, padded))
        if proj.bias is not None:
            _replace_param(proj, "bias", pad_heads(proj.bias.data, 0, heads, padded))
        proj.out_features = proj.weight.shape[0]
    _replace_param(attn.o_proj, "weight", pad_heads(attn.o_proj.weight.data, 1, heads, padded))
    attn.o_proj.in_features = attn.o_proj.weight.shape[1]
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            _replace_param(norm, "weight", pad_heads(norm.weight.data, 0, heads, padded))
    attn.num_heads = padded


def apply_vision_tp(vision: VisionEncoder, tp_mesh: DeviceMesh | None, padded_heads: int) -> None:
    """Pad heads to `padded_heads`, then (with a mesh) split attention by heads and the MLP by columns/rows."""
    cfg = vision.config
    degree = tp_mesh.size() if tp_mesh is not None else 1
    flags = _keep_requires_grad(vision)
    for layer in vision.layers:
        attn = layer.attn
        pad_vision_heads(attn, cfg.num_heads, padded_heads)
        if tp_mesh is not None:
            parallelize_module(layer, tp_mesh, _dtensor_plan(VISION_LAYER_PLAN))
            # VisionAttention reshapes with its `num_heads` attribute: make it the local count.
            attn.num_heads = padded_heads // degree
        if attn.q_norm is not None and (tp_mesh is not None or padded_heads != cfg.num_heads):
            group = tp_mesh.get_group() if tp_mesh is not None else None
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name)
                weight = norm.weight
                if tp_mesh is not None:
                    weight = nn.Parameter(
                        distribute_tensor(weight.data, tp_mesh, [Shard(0)]), requires_grad=weight.requires_grad
                    )
                setattr(attn, name, ShardedQKNorm(weight, cfg.hidden_size, norm.eps, group))
    _restore_requires_grad(vision, flags)


def vocab_parallel_loss_sum(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy with vocabulary-sharded logits; returns (sum, n_tokens).

    Must run (forward *and* backward) inside `torch.distributed.tensor.parallel.loss_parallel()`. As in
    `stitch.models.llm.token_loss`, logits exist only for labelled positions, a chunk at a time, recomputed in
    backward; each rank only ever holds its vocabulary slice of them (`lm_head` returns a Shard(-1) DTensor).
    """
    h, y = labelled_positions(hidden, labels)
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    return chunked_cross_entropy_sum(h, y, lm_head, chunk_size), n
