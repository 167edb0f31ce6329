"""LoRA: low-rank adapters on the linear layers of the LLM and/or the ViT, and their checkpoints.

A wrapped layer computes `W x + b + (alpha / r) * B A dropout(x)` with `W`, `b` frozen and only `A` [r, in] and
`B` [out, r] training (B starts at zero, so training starts from the base model exactly). Why our own small layer
rather than `peft`: peft wraps transformers models by their module names, ours are plain modules with explicit
HF name tables, and `LoRALinear` *is* an `nn.Linear` that keeps the base layer's `weight`/`bias` under their
original names. So every name-based tool keeps working unchanged on a wrapped model: the HF tables, FSDP2's
per-layer units, the tensor-parallel plans, the optimizer's per-part groups and DCP's optimizer state. The adapters
add `<layer>.lora_A.weight` / `<layer>.lora_B.weight`, which are also peft's names, so the peft export below is
a renaming of the module path only.

Checkpoints of a LoRA run (`write_adapter_files`) hold only what training changed:

    config.json            the model config (as a full checkpoint has it)
    adapter.safetensors    every lora_A / lora_B tensor, Stitch names
    trainable.safetensors  every other trainable parameter (the projector by default), Stitch names
    lora.json              rank, alpha, dropout, the wrapped modules, and the base checkpoint (path + fingerprint)

`stitch.load(folder)` rebuilds base + adapters (`load_lora_model`); `merge_lora=True`, `stitch export-hf` and
`export_peft` turn them into plain weights or peft's own adapter format.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stitch.checkpoint.io import LORA_FILE, atomic_dir, read_json
from stitch.errors import CheckpointError, StitchConfigError
from stitch.models.vlm import VLM
from stitch.train.config import LoRAConfig

__all__ = [
    "LoRALinear",
    "MODULE_KINDS",
    "apply_lora",
    "target_module_names",
    "wrap_modules",
    "lora_layers",
    "has_lora",
    "is_adapter_name",
    "adapter_counts",
    "lora_state_dict",
    "trainable_state_dict",
    "merged_state_dict",
    "merge_lora",
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

# Module-name suffixes per part and kind, inside each (used) transformer layer.
MODULE_KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "llm": {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    },
    "vision": {
        "attention": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"),
        "mlp": ("mlp.fc1", "mlp.fc2"),
    },
}


# ------------------------------------------------------------------------------------------- the layer
class LoRALinear(nn.Linear):
    """An `nn.Linear` plus a low-rank update; the base `weight`/`bias` are the wrapped layer's own Parameters.

    Built from an existing layer (`LoRALinear(base, rank, alpha, dropout)`), it shares the base's parameters
    rather than copying them, so wrapping costs no memory and the base names stay `<layer>.weight`/`.bias`.
    Dropout is a float attribute named `lora_dropout` (not `dropout`) and applied with `F.dropout`, so the
    trainer's `set_dropout` (which rewrites every `nn.Dropout` and float `dropout` it finds) never touches it.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: bool = True):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.lora_dropout = int(rank), float(alpha), float(dropout)
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        if init:
            self.reset_lora_parameters()
        else:  # about to be loaded from a checkpoint: don't spend (or move) the global RNG
            with torch.no_grad():
                self.lora_A.weight.zero_()
                self.lora_B.weight.zero_()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default: A like an nn.Linear (Kaiming-uniform), B zero, so the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out]
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + self.lora_B(self.lora_A(h)) * self.scaling  # [..., in] -> [..., r] -> [..., out]

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B @ A in fp32: [out, in], what merging adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` with `weight + delta` (sum in fp32, stored in the base's dtype) and the same bias."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        weight = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        plain.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, lora_dropout={self.lora_dropout:g}"


# ------------------------------------------------------------------------------------------- wrapping
def _layers_of(model: VLM, part: str) -> list[tuple[str, nn.Module]]:
    """(name prefix, layer) of the transformer layers LoRA may wrap: all LLM layers, the ViT's used ones
    (layers after `select_layer` never run, so adapters there would never train)."""
    if part == "llm":
        layers = model.llm.layers
        items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
        return [(f"llm.layers.{i}.", layer) for i, layer in items]
    used = model.vision.config.num_layers_used
    return [(f"vision.layers.{i}.", layer) for i, layer in enumerate(model.vision.layers[:used])]


def target_module_names(model: VLM, parts: Iterable[str], modules: Iterable[str]) -> list[str]:
    """Full names of the linear layers `modules` select in `parts` (kinds or explicit name suffixes).

    Raises StitchConfigError for an entry that selects nothing in any listed part, naming the entry.
    """
    parts, modules = list(parts), list(modules)
    names: list[str] = []
    hits = dict.fromkeys(modules, 0)
    for part in parts:
        if part not in MODULE_KINDS:
            raise StitchConfigError(f"lora.parts: unknown part '{part}' (llm, vision)")
        for prefix, layer in _layers_of(model, part):
            for sub, module in layer.named_modules():
                if not isinstance(module, nn.Linear) or not sub or ".lora_" in f".{sub}":
                    continue
                full = prefix + sub
                for entry in modules:
                    suffixes = MODULE_KINDS[part].get(entry, (entry,))
                    if any(full == s or full.endswith("." + s) for s in suffixes):
                        hits[entry] += 1
                        if full not in names:
                            names.append(full)
    missing = [m for m, n in hits.items() if n == 0]
    if missing:
        known = sorted({s.rsplit(".", 1)[-1] for p in parts for kind in MODULE_KINDS[p].values() for s in kind})
        raise StitchConfigError(
            f"lora.modules: '{missing[0]}' selects no linear layer in {'/'.join(parts)} "
            f"(kinds: attention, mlp; layer names such as {', '.join(known)})"
        )
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_modules(model: nn.Module, names: Iterable[str], rank: int, alpha: float, dropout: float,
                 init: bool = True) -> list[LoRALinear]:
    """Replace each named `nn.Linear` by a `LoRALinear` around it (an existing one is kept if its rank and
    alpha match, so applying LoRA to a resumed model is a no-op). Returns the LoRA layers, in order."""
    out = []
    for name in names:
        parent, child = _parent(model, name)
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            if module.rank != rank or module.alpha != float(alpha):
                raise StitchConfigError(
                    f"{name}: already has a rank-{module.rank} (alpha {module.alpha:g}) adapter, the config asks "
                    f"for rank {rank} (alpha {float(alpha):g}); a run cannot change them when it resumes"
                )
            module.lora_dropout = float(dropout)
        elif isinstance(module, nn.Linear):
            module = LoRALinear(module, rank, alpha, dropout, init=init)
            setattr(parent, child, module)
        else:
            raise StitchConfigError(f"{name}: LoRA wraps linear layers, this is a {type(module).__name__}")
        out.append(module)
    return out


def _match_trainable(model: nn.Module, entries: Iterable[str]) -> list[nn.Parameter]:
    named = dict(model.named_parameters(remove_duplicate=False))
    params: list[nn.Parameter] = []
    for entry in entries:
        found = [p for n, p in named.items() if n == entry or n.startswith(entry + ".")]
        if not found:
            raise StitchConfigError(f"lora.trainable: '{entry}' names no module of the model (dotted module names "
                                    "such as projector, llm.lm_head, llm.embed_tokens, vision.post_norm)")
        params += found
    return params


def apply_lora(model: VLM, cfg: LoRAConfig) -> dict[str, int]:
    """Freeze `cfg.parts` and the projector, wrap the selected linear layers, train the adapters and the
    modules in `cfg.trainable`. Call after the stage's freezing (`stitch.train.stages.apply_stage` does);
    parts not in `cfg.parts` keep what the stage decided. Returns the adapter parameter count per part."""
    names = target_module_names(model, cfg.parts, cfg.modules)
    for part in [*cfg.parts, "projector"]:
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)
    for layer in wrap_modules(model, names, cfg.rank, cfg.alpha, cfg.dropout):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    stale = [n for n in lora_layers(model) if n not in set(names)]
    if stale:  # e.g. a resumed run whose lora.parts/modules changed: those adapters would be saved but never train
        raise StitchConfigError(f"the model already has adapters the lora config does not select ({stale[0]}, "
                                f"{len(stale)} in all); a run cannot change lora.parts/modules when it resumes")
    for p in _match_trainable(model, cfg.trainable):
        p.requires_grad_(True)
    return adapter_counts(model)


# ------------------------------------------------------------------------------------------- inspection
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (`...lora_A.weight` / `...lora_B.weight`)."""
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def adapter_counts(model: VLM) -> dict[str, int]:
    """Adapter parameters per part (vision, projector, llm)."""
    return {part: sum(p.numel() for n, p in module.named_parameters() if is_adapter_name(n))
            for part, module in model.parts().items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under their full Stitch names."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter that is not an adapter (tied weights once, under their first name)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and not is_adapter_name(n)}


@torch.no_grad()
def merged_state_dict(model: VLM) -> dict[str, torch.Tensor]:
    """The plain state dict (original names, no adapter tensors) with every adapter merged into its weight;
    the model itself is left as it is. Tied duplicates are dropped as `stitch.checkpoint.store.model_state` does."""
    from stitch.checkpoint.store import model_state

    state = {n: t for n, t in model_state(model).items() if not is_adapter_name(n)}
    for name, layer in lora_layers(model).items():
        state[f"{name}.weight"] = (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back (in place; returns the
    model). The result has exactly the original module tree and parameter names, so it saves, exports and
    runs like a model that never had adapters."""
    for name, layer in lora_layers(model).items():
        parent, child = _parent(model, name)
        setattr(parent, child, layer.merged())
    return model


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
    from stitch.checkpoint.io import TensorSource
    from stitch.checkpoint.store import is_stitch_checkpoint, model_state

    if is_lora_checkpoint(base):
        return model_state(merge_lora(load_lora_model(base)))
    source = TensorSource(base)
    if is_stitch_checkpoint(base):
        return {name: source[name] for name in source}
    from stitch.checkpoint.hf import vlm_state_from_hf

    return vlm_state_from_hf(source, cfg)


def load_lora_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VLM:
    """Base weights (from the folder lora.json points at) + this folder's adapters and trainable tensors:
    the model as training left it, adapters unmerged (`merge_lora` folds them in), with `requires_grad` on
    exactly the adapters and the tensors that trained in full."""
    from stitch.checkpoint.store import build_model, load_config, load_weights

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
    from stitch.checkpoint.hf import VLM_LAYOUTS
    from stitch.checkpoint.hf_vision import default_vision_layout, vision_name_pairs
    from stitch.checkpoint.names import PROJECTOR_TABLES, expand, llm_pairs

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
