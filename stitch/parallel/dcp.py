"""Training-state checkpoints with torch DCP: saved under one layout, resumed under another.

Every rank writes only its shards, keyed by the unsplit model's parameter names (the `ParallelModel.model`
keeps them whatever the layout) with each shard's place in the global tensor; on load DCP reads, for each
rank's new shards, whatever pieces of the saved ones overlap them. So dp2 -> tp2, pp2 -> pp1, ... just work for
model weights and optimizer state alike.

One thing DCP does not reshard by itself: the ViT's zero-padded heads change the *global* shape of its
attention tensors (25 heads -> 26 at vision_tp 2, 28 at 4, 32 at 8). Those tensors (weights and their optimizer
moments) are read whole, re-padded and re-split here. That costs a full copy of each on every rank while
loading; `parallel.vision_padded_heads` (e.g. 32) set in both runs avoids it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from stitch.config import VLMConfig
from stitch.errors import CheckpointError
from stitch.layout import pad_heads, shard_rule, unpad_heads
from stitch.parallel.runtime import ParallelModel

__all__ = ["save_dcp", "load_dcp", "load_repadded"]

# The parameter a state entry belongs to: model entries are `model.<fqn>`, optimizer moments `optim.state.<fqn>.
# exp_avg` (nested) or `optimizer.state.<fqn>.exp_avg` (the trainer's flattened state): the name runs up to its
# first `.weight`/`.bias`.
_PARAM = re.compile(r"(?:^|\.)((?:vision|projector|llm)\..*?\.(?:weight|bias))(?:\.|$)")


def save_dcp(pm: ParallelModel, optimizer: torch.optim.Optimizer | None, path: str | Path,
             extra: dict[str, Any] | None = None) -> None:
    """Collective: every rank calls it. `extra` holds more stateful entries (tensors, or objects with
    `state_dict`/`load_state_dict`, e.g. an LR scheduler) saved alongside."""
    model_sd, optim_sd = get_state_dict(pm.model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    state.update(extra or {})
    dcp.save(state, checkpoint_id=str(path))


def _tensors(obj: Any, path: tuple = ()):
    """(path, container, key, tensor) for every tensor in a nested dict/list state."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor):
            yield (*path, key), obj, key, value
        elif isinstance(value, (dict, list)):
            yield from _tensors(value, (*path, key))


def _stage_padding_fixes(state: dict[str, Any], path: Path, cfg: VLMConfig) -> list[tuple]:
    """Swap tensors saved with another ViT head padding for full placeholders of the saved shape.

    Returns what `_apply_padding_fixes` needs to put them, re-padded, into the live tensors after loading.
    Any other shape difference is an error naming the tensor.
    """
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    fixes = []
    for obj_path, container, key, value in _tensors(state):
        flat = ".".join(map(str, obj_path))
        stored = metadata.get(flat)
        if stored is None:
            if obj_path[0] == "model":
                raise CheckpointError(f"{path}: no tensor '{flat}' in the checkpoint")
            continue
        if not hasattr(stored, "size") or tuple(stored.size) == tuple(value.shape):
            continue
        param = _PARAM.search(flat)
        rule = shard_rule(param.group(1), cfg) if param else None
        if rule is None or not rule.heads:
            raise CheckpointError(
                f"{path}: '{flat}' was saved with shape {tuple(stored.size)}, the model has {tuple(value.shape)}"
            )
        placeholder = torch.zeros(tuple(stored.size), dtype=stored.properties.dtype, device=value.device)
        container[key] = placeholder
        fixes.append((container, key, value, placeholder, rule.dim, stored.size[rule.dim] // cfg.vision.head_dim))
    return fixes


@torch.no_grad()
def _apply_padding_fixes(fixes: list[tuple], cfg: VLMConfig) -> None:
    """Re-pad each loaded tensor from the saved head count to the live one (read off the live global shape)."""
    heads, head_dim = cfg.vision.num_heads, cfg.vision.head_dim
    for container, key, live, loaded, dim, saved_padded in fixes:
        live_padded = live.shape[dim] // head_dim
        full = pad_heads(unpad_heads(loaded, dim, heads, saved_padded, str(key)), dim, heads, live_padded)
        if isinstance(live, DTensor):
            live.to_local().copy_(distribute_tensor(full, live.device_mesh, live.placements).to_local())
        else:
            live.copy_(full)
        container[key] = live


def load_repadded(state: dict[str, Any], path: str | Path, cfg: VLMConfig) -> None:
    """`dcp.load(state, path)` in place, plus the ViT head re-padding DCP cannot do (see the module docstring).

    The one DCP read path: `load_dcp` here and the trainer's optimizer state (`stitch.train.state`) both use it,
    so a checkpoint saved under one ViT tensor-parallel degree (or padding) resumes under another, in one
    process too. Collective under a layout."""
    path = Path(path)
    fixes = _stage_padding_fixes(state, path, cfg)
    dcp.load(state, checkpoint_id=str(path))
    _apply_padding_fixes(fixes, cfg)


def load_dcp(pm: ParallelModel, optimizer: torch.optim.Optimizer | None, path: str | Path,
             extra: dict[str, Any] | None = None) -> None:
    """Collective: restore weights (and optimizer state, and `extra`) saved by `save_dcp` under any layout."""
    model_sd, optim_sd = get_state_dict(pm.model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    state.update(extra or {})
    load_repadded(state, path, pm.config)
    set_state_dict(pm.model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
