"""`torchrun --nproc_per_node N -m stitch eval ...`: samples sharded over ranks, merged into one predictions file.

Each rank answers a contiguous block of the samples still to do (contiguous, so the questions about one image stay
on one rank and its image-embedding cache catches them) and appends to its own shard file beside the predictions
file (`NAME.rank-R.jsonl`), so ranks never write the same file. At the end rank 0 appends the shards to the
predictions file in sample order, deletes them and scores; the result is the file one process would have
written. A run killed midway leaves its shards; the next run (with any number of ranks) folds them in first and
generates only what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Ranks", "shard_files", "share", "shard_path"]


class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 outside one)."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def default_device(self) -> str | None:
        """The GPU of this rank (LOCAL_RANK) under torchrun when there are GPUs; None otherwise."""
        if not self.distributed:
            return None
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: str) -> None:
        """The default process group (gloo on CPU, NCCL on GPU), for barriers and gathering counts."""
        if not self.distributed:
            return
        import torch

        from stitch.parallel.mesh import init_distributed

        init_distributed(torch.device(device))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def shard_path(pred_path: Path, rank: int) -> Path:
    return pred_path.with_name(f"{pred_path.stem}.rank-{rank}{pred_path.suffix}")


def shard_files(pred_path: Path) -> list[Path]:
    """Shards left beside `pred_path` by this or an earlier (killed) run, in rank order."""
    found = pred_path.parent.glob(f"{pred_path.stem}.rank-*{pred_path.suffix}")
    return sorted(found, key=lambda p: int(p.name[len(pred_path.stem) + 6 : -len(pred_path.suffix) or None]))


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s contiguous block of `items` (sizes differ by at most one)."""
    n = len(items)
    start, end = rank * n // world, (rank + 1) * n // world
    return list(items[start:end])


def fold_in(pred_path: Path, order: Sequence[str], read_ids) -> None:
    """Append every shard's complete rows to `pred_path`, in the order of `order` (sample ids), then delete
    the shards. `read_ids(path)` maps a file to {id: raw line} (torn last lines already cut off)."""
    shards = shard_files(pred_path)
    if not shards:
        return
    rows: dict[str, str] = {}
    for shard in shards:
        rows.update(read_ids(shard))
    position = {sid: i for i, sid in enumerate(order)}
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    with open(pred_path, "a", encoding="utf-8") as f:
        for sid in sorted(rows, key=lambda s: position.get(s, len(position))):
            f.write(rows[sid])
        f.flush()
        os.fsync(f.fileno())
    for shard in shards:
        shard.unlink()
