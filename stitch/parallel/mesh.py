"""Process groups for a layout: one device mesh with named dimensions ("pp", "dp_replicate", "dp_shard", "tp").

TP is the innermost dimension so that, with ranks numbered node by node (torchrun's default), a TP group stays
inside one node where the all-reduces of every layer are cheapest; PP is the outermost (one point-to-point
transfer per micro-batch). When the ViT has its own TP degree `vision_tp` < `tp`, a second mesh over the same
ranks splits "tp" into ("tp_outer", "vision_tp"): the ViT is sharded over the inner part and replicated over the
outer part, so no extra communication is needed to hand its output to the (replicated-input) projector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from stitch.layout import Layout

__all__ = ["ParallelMesh", "build_mesh", "init_distributed", "default_device"]


def default_device() -> torch.device:
    """This process's device: the GPU given by LOCAL_RANK under torchrun, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment (NCCL on GPU, gloo on CPU)."""
    device = device or default_device()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    return device


@dataclass
class ParallelMesh:
    """The meshes of one layout plus this rank's coordinates in them."""

    layout: Layout
    mesh: DeviceMesh
    vision_mesh: DeviceMesh  # == mesh unless 1 < vision_tp < tp
    device: torch.device

    @property
    def device_type(self) -> str:
        return self.device.type

    def coord(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard: ranks with equal dp_rank must be fed the same batch."""
        return self.coord("dp_replicate") * self.layout.dp_shard + self.coord("dp_shard")

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def dp_mesh(self, vision: bool = False) -> DeviceMesh | None:
        """The mesh FSDP shards over: 2-D (replicate, shard) for HSDP, 1-D otherwise; None without dp."""
        if self.layout.dp == 1:
            return None
        mesh = self.vision_mesh if vision else self.mesh
        if self.layout.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard"]
        return mesh["dp_shard"]

    def tp_mesh(self, vision: bool = False) -> DeviceMesh | None:
        if vision:
            if self.layout.vision_tp == 1:
                return None
            return self.vision_mesh["vision_tp"] if self.vision_mesh is not self.mesh else self.mesh["tp"]
        return self.mesh["tp"] if self.layout.tp > 1 else None

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all data-parallel ranks (both HSDP dimensions), in place."""
        for dim in ("dp_replicate", "dp_shard"):
            if self.mesh.size(self.mesh.mesh_dim_names.index(dim)) > 1:
                dist.all_reduce(tensor, group=self.group(dim))
        return tensor


def build_mesh(layout: Layout, device: torch.device | None = None) -> ParallelMesh:
    """Meshes for `layout` over the initialised default group (call `init_distributed` first)."""
    device = device or default_device()
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"layout {layout.describe()} needs {layout.world_size} ranks, world size is {world}")
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
    vision_mesh = mesh
    if 1 < layout.vision_tp < layout.tp:
        ranks = mesh.mesh.reshape(*shape[:3], layout.tp // layout.vision_tp, layout.vision_tp)
        vision_mesh = DeviceMesh(
            device.type, ranks, mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp_outer", "vision_tp")
        )
    return ParallelMesh(layout, mesh, vision_mesh, device)
