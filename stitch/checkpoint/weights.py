"""Weights in and out of a model: the pieces every checkpoint reader shares.

A model is built on the meta device and its weights are assigned straight from the files (`load_weights`), so
opening a 72B checkpoint never allocates a random-initialised copy first. These functions sit below the
readers that dispatch on a folder's kind (`stitch.checkpoint.store.load_model`) and the ones it dispatches to
(`stitch.checkpoint.reshard`, `stitch.checkpoint.lora`), so none of those has to import another to get them.
`stitch.checkpoint.store` re-exports every name here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from stitch.checkpoint.io import read_json
from stitch.config import VLMConfig, validate
from stitch.errors import CheckpointError
from stitch.models.layers import RotaryEmbedding
from stitch.models.vlm import VLM, model_state

__all__ = ["is_stitch_checkpoint", "build_model", "model_state", "load_weights", "materialize_buffers",
           "load_config"]


def is_stitch_checkpoint(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    data = read_json(cfg)
    return "vision" in data and "llm" in data


def build_model(cfg: VLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VLM:
    """A randomly initialised model (use device='meta' to build without memory)."""
    with torch.device(device):
        model = VLM(cfg)
    return model.to(dtype) if dtype is not None and str(device) != "meta" else model


def load_weights(model: VLM, state: dict[str, torch.Tensor], source: str, device="cpu", dtype=None) -> VLM:
    """Assign `state` into a (meta-built) model, checking names and shapes first; re-tie and fill buffers."""
    expected = model_state(model)
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor '{name}'")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
            )
    extra = [n for n in state if n not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}'")
    odd = [n for n in expected if not state[n].is_floating_point()]
    if odd:
        raise CheckpointError(f"{source}: tensor '{odd[0]}' is {state[odd[0]].dtype}; weights must be floating point")
    if dtype is None:  # one dtype for the whole model: the one most of its weights have (a stray fp16 tensor
        # among fp32 ones would otherwise fail the first matmul, naming nothing)
        counts = Counter(t.dtype for t in state.values())
        dtype = counts.most_common(1)[0][0] if len(counts) > 1 else None
    converted = {}
    for name, tensor in state.items():
        want = dtype if dtype is not None else tensor.dtype
        converted[name] = tensor.to(device=device, dtype=want)
    model.load_state_dict(converted, strict=False, assign=True)
    if model.config.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    materialize_buffers(model, device)
    return model


def materialize_buffers(model: nn.Module, device) -> None:
    """Recreate non-persistent buffers (RoPE tables, ...) that a meta-device build left empty."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.inv_freq.is_meta:
            cfg = model.config.llm
            module.__init__(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            module.to(device)
        elif hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            module.reset_buffers(device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"buffers left uninitialised after loading: {left[:3]}")


def load_config(path: Path) -> VLMConfig:
    return validate(VLMConfig, read_json(path / "config.json"), source=str(path / "config.json"))
