"""Stitch checkpoint folders: `config.json` + `model.safetensors` (or shards + index) + tokenizer files.

Models are built on the meta device and weights are assigned straight from the files, so opening a 72B
checkpoint never allocates a random-initialised copy first.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from stitch.checkpoint.io import LORA_FILE, TensorSource, atomic_dir, read_json, save_tensors
from stitch.config import VLMConfig, validate
from stitch.errors import CheckpointError
from stitch.models.layers import RotaryEmbedding
from stitch.models.vlm import VLM


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


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage, and HF omits them too)."""
    state = model.state_dict()
    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.llm.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    return state


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


def save(model: VLM, out: str | Path, tokenizer=None, overwrite: bool = True) -> Path:
    """Write a checkpoint folder atomically (a failure leaves `out` as it was)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def load_config(path: Path) -> VLMConfig:
    return validate(VLMConfig, read_json(path / "config.json"), source=str(path / "config.json"))


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> VLM:
    """A Stitch checkpoint folder, a LoRA checkpoint folder (`stitch.train.lora`), or a whole HF VLM folder
    (InternVL / LLaVA), as a VLM."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if (path / LORA_FILE).is_file():  # LoRA adapters + a pointer to their base: base + adapters, unmerged
        from stitch.train.lora import load_lora_model  # noqa: PLC0415

        return load_lora_model(path, device=device, dtype=dtype)
    if is_stitch_checkpoint(path):
        from stitch.checkpoint.reshard import LAYOUT_FILE, open_weights

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
        from stitch.checkpoint.hf import vlm_config_from_hf, vlm_state_from_hf

        cfg = vlm_config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
        source = TensorSource(path)
        state = vlm_state_from_hf(source, cfg)
    model = build_model(cfg, device="meta")
    return load_weights(model, state, str(path), device=device, dtype=dtype)


def load(path: str | Path, device="cpu", dtype: torch.dtype | None = None, merge_lora: bool = False):
    """`stitch.load`: (model in eval mode, processor). `merge_lora` folds a LoRA checkpoint's adapters into
    the base weights (plain linear layers, as fast as the base); otherwise they stay separate layers."""
    from stitch.data.processor import Processor

    path = Path(path)
    model = load_model(path, device=device, dtype=dtype)
    if merge_lora:
        from stitch.train.lora import merge_lora as _merge  # noqa: PLC0415

        model = _merge(model)
    if is_stitch_checkpoint(path) or (path / LORA_FILE).is_file():
        processor = Processor.from_pretrained(path)
    else:  # an HF InternVL / LLaVA folder: its tokenizer, and the config its weights were read with
        from stitch.checkpoint.commands import load_tokenizer  # noqa: PLC0415

        tokenizer = load_tokenizer(path)
        model.config.image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        processor = Processor(tokenizer, model.config)
    return model.eval(), processor
