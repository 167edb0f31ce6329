"""Data parallelism with FSDP2 (`fully_shard`): per-layer units plus one root unit per pipeline stage.

Each transformer layer (ViT and LLM) is its own unit, so only one layer's full weights exist at a time; the
stage module is the root unit and gathers the rest (embeddings, projector, final norm, output layer). With a
2-D (replicate, shard) mesh this is HSDP; with a shard dimension of 1 it is plain replication (DDP-like).
Under pipeline parallelism the weights are kept gathered between a stage's micro-batches
(`reshard_after_forward=False`): otherwise every micro-batch would all-gather them again.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from stitch.parallel.mesh import ParallelMesh
from stitch.parallel.pipeline import StageModule

__all__ = ["apply_fsdp", "mixed_precision"]


def mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (e.g. bf16) with fp32 master weights, reduce gradients in `reduce_dtype`."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(stages: list[StageModule], pmesh: ParallelMesh, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """Shard every stage over the data-parallel mesh (no-op when dp = 1)."""
    dp_mesh = pmesh.dp_mesh()
    if dp_mesh is None:
        return
    vision_dp_mesh = pmesh.dp_mesh(vision=True)
    reshard = pmesh.layout.pp == 1
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for stage in stages:
        if stage.is_first:
            for layer in stage.vision.layers:
                fully_shard(layer, mesh=vision_dp_mesh, reshard_after_forward=reshard, **kwargs)
        for layer in stage.llm.layers.values():
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard, **kwargs)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard, **kwargs)
