"""LoRA checkpoints: the adapter files of a LoRA run, the base they point at, and peft's adapter format.

Checkpoints of a LoRA run (`write_adapter_files`) hold only what training changed:

    config.json            the model config (as a full checkpoint has it)
    adapter.safetensors    every lora_A / lora_B tensor, Stitch names
    trainable.safetensors  every other trainable parameter (the projector by default), Stitch names
    lora.json              rank, alpha, dropout, the wrapped modules, and the base checkpoint (path + fingerprint)

`stitch.load(folder)` rebuilds base + adapters (`load_lora_model`); `merge_lora=True`, `stitch export-hf` and
`export_peft` turn them into plain weights or peft's own adapter format. The adapter layers themselves are
`stitch.models.lora`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stitch.checkpoint.hf import VLM_LAYOUTS, vlm_state_from_hf
from stitch.checkpoint.hf_vision import default_vision_layout, vision_name_pairs
from stitch.checkpoint.io import LORA_FILE, TensorSource, atomic_dir, read_json
from stitch.checkpoint.names import PROJECTOR_TABLES, expand, llm_pairs
from stitch.checkpoint.weights import build_model, is_stitch_checkpoint, load_config, load_weights, model_state
from stitch.errors import CheckpointError
from stitch.models.lora import (
    is_adapter_name,
    lora_layers,
    lora_state_dict,
    merge_lora,
    trainable_state_dict,
    wrap_modules,
)
from stitch.models.vlm import VLM

__all__ = [
    "base_fingerprint",
    "base_reference",
    "write_adapter_files",
    "save_lora_checkpoint",
    "is_lora_checkpoint",
    "require_lora_checkpoint",
    "read_lora_meta",
    "load_lora_model",
    "peft_adapter",
    "export_peft",
    "ADAPTER_FILE",
    "TRAINABLE_FILE",
    "LORA_FILE",
]

ADAPTER_FILE = "adapter.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
LORA_FORMAT, LORA_VERSION = "stitch-lora", 1


# ------------------------------------------------------------------------------------------- checkpoints
def _sample_hash(path: Path, h: Any, chunk: int = 1 << 20) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > 2 * chunk:
            f.seek(size - chunk)
            h.update(f.read(chunk))


def base_fingerprint(path: str | Path) -> str:
    """A cheap identity of a checkpoint's weights: names, sizes and the first/last MiB of its safetensors.

    Adapters only make sense on the exact base they were trained on; this catches a base that was replaced
    by another one at the same path (reading a few MiB, not the whole 16 GB of an 8B model)."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files (a LoRA base must be a checkpoint folder)")
    for f in files:
        _sample_hash(f, h)
    return "sha256:" + h.hexdigest()


def base_reference(path: str | Path) -> dict[str, str]:
    """What a LoRA checkpoint stores about its base: the absolute folder path and its fingerprint."""
    path = Path(path).resolve()
    return {"path": str(path), "fingerprint": base_fingerprint(path)}


def write_adapter_files(model: VLM, folder: str | Path, base: Mapping[str, str]) -> None:
    """Write adapter.safetensors, trainable.safetensors and lora.json of `model` into an existing `folder`
    (the caller writes config.json and tokenizer files, e.g. inside an atomic folder)."""
    folder = Path(folder)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    settings = {(m.rank, m.alpha, m.lora_dropout) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers with different rank/alpha/dropout cannot share one lora.json: {settings}")
    rank, alpha, dropout = settings.pop()
    metadata = {"format": "pt"}
    save_file({k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}, str(folder / ADAPTER_FILE),
              metadata=metadata)
    trainable = trainable_state_dict(model)
    save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(folder / TRAINABLE_FILE),
              metadata=metadata)
    meta = {
        "format": LORA_FORMAT,
        "version": LORA_VERSION,
        "base": dict(base),
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": list(layers),
        "trainable": list(trainable),
    }
    (folder / LORA_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def save_lora_checkpoint(model: VLM, out: str | Path, base: Mapping[str, str], tokenizer=None) -> Path:
    """A complete LoRA checkpoint folder, written atomically: config.json, the adapter files, tokenizer."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.config.save(tmp / "config.json")
        write_adapter_files(model, tmp, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / LORA_FILE).is_file()


def require_lora_checkpoint(path: str | Path) -> None:
    """A CheckpointError unless `path` holds LoRA adapters (checked before a peft export writes anything)."""
    if not is_lora_checkpoint(path):
        raise CheckpointError(f"{path}: not a LoRA checkpoint (no {LORA_FILE}); nothing to export as peft")


def read_lora_meta(path: str | Path) -> dict[str, Any]:
    meta = read_json(Path(path) / LORA_FILE)
    if meta.get("format") != LORA_FORMAT or meta.get("version") != LORA_VERSION:
        raise CheckpointError(f"{Path(path) / LORA_FILE}: not a {LORA_FORMAT} v{LORA_VERSION} file")
    return meta


def _base_state(base: Path, cfg) -> dict[str, torch.Tensor]:
    """Plain (Stitch-named) weights of a base folder: a Stitch checkpoint, an HF VLM, or another LoRA
    checkpoint (a run that started from LoRA weights: its adapters are merged first)."""
    if is_lora_checkpoint(base):
        return model_state(merge_lora(load_lora_model(base)))
    source = TensorSource(base)
    if is_stitch_checkpoint(base):
        return {name: source[name] for name in source}
    return vlm_state_from_hf(source, cfg)


def load_lora_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VLM:
    """Base weights (from the folder lora.json points at) + this folder's adapters and trainable tensors:
    the model as training left it, adapters unmerged (`merge_lora` folds them in), with `requires_grad` on
    exactly the adapters and the tensors that trained in full."""
    path = Path(path)
    meta = read_lora_meta(path)
    base_path = Path(meta["base"]["path"])
    if not base_path.is_absolute():
        base_path = (path / base_path).resolve()
    if not base_path.is_dir():
        raise CheckpointError(f"{path}: its base checkpoint {base_path} does not exist (lora.json 'base.path'; "
                              "move the base back or point lora.json at its new place)")
    want = meta["base"].get("fingerprint")
    if want and base_fingerprint(base_path) != want:
        raise CheckpointError(
            f"{path}: the base checkpoint {base_path} is not the one these adapters were trained on "
            "(fingerprint differs); if it holds the same weights re-saved, set lora.json 'base.fingerprint' to null"
        )
    cfg = load_config(path)
    model = load_weights(build_model(cfg, device="meta"), _base_state(base_path, cfg), str(base_path),
                         device=device, dtype=dtype)
    wrap_modules(model, meta["targets"], meta["rank"], meta["alpha"], meta["dropout"], init=False)
    tensors = {**load_file(str(path / ADAPTER_FILE)), **load_file(str(path / TRAINABLE_FILE))}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in params if is_adapter_name(n) and n not in tensors]
    if missing:
        raise CheckpointError(f"{path / ADAPTER_FILE}: missing tensor '{missing[0]}'")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params:
                raise CheckpointError(f"{path}: unexpected tensor '{name}' (no such parameter in the model)")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, expected "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    # As training left it: adapters and the fully trained tensors require grad, the base does not.
    trained = set(meta["trainable"])
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name) or name in trained)
    return model


# ------------------------------------------------------------------------------------------- peft format
def _hf_parameter_names(cfg, fmt: str) -> dict[str, str]:
    """Stitch parameter name -> the parameter's name inside the transformers model `export-hf` writes
    (`InternVLForConditionalGeneration` / `LlavaForConditionalGeneration` in memory, where peft looks)."""
    native = VLM_LAYOUTS["native"]
    llm = cfg.llm
    pairs = llm_pairs(llm.num_layers, llm.attention_bias, llm.tie_word_embeddings, "llm.", native["llm"],
                      native["head"])
    pairs += expand(PROJECTOR_TABLES[cfg.projector.kind], 0, "projector.", native["projector"])
    layout = default_vision_layout(cfg.vision, fmt)
    for ours, theirs in vision_name_pairs(cfg.vision, layout, native["vision"]):
        # a fused qkv slice has no module of its own in HF, so no adapter can name it
        pairs.append((f"vision.{ours}", theirs if isinstance(theirs, str) else None))
    return dict(pairs)


def peft_adapter(model: VLM, fmt: str = "internvl") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_model.safetensors tensors, adapter_config.json dict) in peft's LoRA format for the HF export
    of this model's base in format `fmt`. Fully trained modules become peft `modules_to_save`, which peft stores
    whole: a trainable parameter whose HF module also holds frozen or adapted weights cannot be expressed."""
    names = _hf_parameter_names(model.config, fmt)
    layers = lora_layers(model)
    if not layers:
        raise CheckpointError("the model has no LoRA adapters to export")

    def hf_module(param: str) -> str:
        theirs = names.get(param)
        if theirs is None:
            raise CheckpointError(f"'{param}' has no separate tensor in the {fmt} format, so peft cannot name it")
        return theirs.rsplit(".", 1)[0]

    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for name, layer in layers.items():
        module = hf_module(f"{name}.weight")
        targets.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"base_model.model.{module}.lora_B.weight"] = layer.lora_B.weight.detach()
    trainable = trainable_state_dict(model)
    to_save: dict[str, list[str]] = {}
    for param, tensor in trainable.items():
        theirs = names.get(param)
        if theirs is None:
            raise CheckpointError(f"trainable '{param}' has no tensor in the {fmt} format")
        to_save.setdefault(theirs.rsplit(".", 1)[0], []).append(param)
        tensors[f"base_model.model.{theirs}"] = tensor
    adapted = set(targets)
    for module, params in to_save.items():
        siblings = [ours for ours, theirs in names.items() if theirs and theirs.rsplit(".", 1)[0] == module]
        if module in adapted or set(siblings) - set(params):
            raise CheckpointError(
                f"peft saves whole modules: {module} holds trainable {params[0]} but also frozen or adapted "
                "weights; train the whole module (lora.trainable) or export the merged model instead"
            )
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": targets,
        "modules_to_save": sorted(to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def export_peft(checkpoint: str | Path, fmt: str, out: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA checkpoint's adapters as a peft adapter folder (`adapter_config.json` +
    `adapter_model.safetensors`), for `peft.PeftModel.from_pretrained(<the base exported with export-hf>, out)`."""
    require_lora_checkpoint(checkpoint)
    tensors, config = peft_adapter(load_lora_model(checkpoint), fmt)
    config["base_model_name_or_path"] = base_model_name_or_path
    with atomic_dir(out, inputs=[checkpoint]) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)
