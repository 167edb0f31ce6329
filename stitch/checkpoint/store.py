"""Stitch checkpoint folders: `config.json` + `model.safetensors` (or shards + index) + tokenizer files.

`load_model` opens any folder Stitch reads (a plain or resharded Stitch checkpoint, a LoRA checkpoint, a whole
HF VLM) as a model; `save` writes one atomically. The building blocks (meta-device build, checked weight
assignment, `model_state`) live in `stitch.checkpoint.weights` and are re-exported here, where callers have
always found them. `stitch.load` (`stitch.api`) pairs the model with its processor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stitch.checkpoint.hf import vlm_config_from_hf, vlm_state_from_hf
from stitch.checkpoint.io import LORA_FILE, TensorSource, atomic_dir, read_json, save_tensors
from stitch.checkpoint.lora import load_lora_model
from stitch.checkpoint.reshard import LAYOUT_FILE, open_weights
from stitch.checkpoint.weights import (
    build_model,
    is_stitch_checkpoint,
    load_config,
    load_weights,
    materialize_buffers,
    model_state,
)
from stitch.errors import CheckpointError
from stitch.models.vlm import VLM

__all__ = ["is_stitch_checkpoint", "build_model", "model_state", "load_weights", "materialize_buffers",
           "load_config", "save", "load_model"]


def save(model: VLM, out: str | Path, tokenizer=None, overwrite: bool = True) -> Path:
    """Write a checkpoint folder atomically (a failure leaves `out` as it was)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> VLM:
    """A Stitch checkpoint folder, a LoRA checkpoint folder (`stitch.checkpoint.lora`), or a whole HF VLM folder
    (InternVL / LLaVA), as a VLM."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if (path / LORA_FILE).is_file():  # LoRA adapters + a pointer to their base: base + adapters, unmerged
        return load_lora_model(path, device=device, dtype=dtype)
    if is_stitch_checkpoint(path):
        cfg = load_config(path)
        if (path / LAYOUT_FILE).exists():  # per-rank tp{t}_pp{p}/ folders from `stitch reshard`: merge on read
            source = open_weights(path)
            expected = model_state(build_model(cfg, device="meta"))
            extra = [name for name in source if name not in expected]
            if extra:
                raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}'")
            state = {name: source[name] for name in expected}
        else:
            source = TensorSource(path)
            state = {name: source[name] for name in source}
    else:
        cfg = vlm_config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
        source = TensorSource(path)
        state = vlm_state_from_hf(source, cfg)
    model = build_model(cfg, device="meta")
    return load_weights(model, state, str(path), device=device, dtype=dtype)
