"""LoRA adapter layers: low-rank updates on the linear layers of the LLM and/or the ViT, and merging them.

A wrapped layer computes `W x + b + (alpha / r) * B A dropout(x)` with `W`, `b` frozen and only `A` [r, in] and
`B` [out, r] training (B starts at zero, so training starts from the base model exactly). Why our own small layer
rather than `peft`: peft wraps transformers models by their module names, ours are plain modules with explicit
HF name tables, and `LoRALinear` *is* an `nn.Linear` that keeps the base layer's `weight`/`bias` under their
original names. So every name-based tool keeps working unchanged on a wrapped model: the HF tables, FSDP2's
per-layer units, the tensor-parallel plans, the optimizer's per-part groups and DCP's optimizer state. The adapters
add `<layer>.lora_A.weight` / `<layer>.lora_B.weight`, which are also peft's names, so the peft export
(`stitch.checkpoint.lora.export_peft`) is a renaming of the module path only.

This module is the in-memory half (layers, wrapping, inspection, merge) and lives with the models, so that the
checkpoint code that reads and writes adapter files (`stitch.checkpoint.lora`) and the trainer that applies them
both import it from below.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stitch.config import LoRAConfig
from stitch.errors import StitchConfigError
from stitch.models.vlm import VLM, model_state

__all__ = [
    "LoRALinear",
    "MODULE_KINDS",
    "apply_lora",
    "target_module_names",
    "wrap_modules",
    "lora_layers",
    "has_lora",
    "adapters_disabled",
    "is_adapter_name",
    "adapter_counts",
    "lora_state_dict",
    "trainable_state_dict",
    "merged_state_dict",
    "merge_lora",
]

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
        self.adapter_enabled = True  # False: the base layer alone (the reference of preference training)
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
        if not self.adapter_enabled:
            return out
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


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model without its adapters for the duration: the base weights alone, no second copy (peft's
    `disable_adapter`), which is the reference model of LoRA preference training."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.adapter_enabled = True


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
    the model itself is left as it is. Tied duplicates are dropped as `stitch.models.vlm.model_state` does."""
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
