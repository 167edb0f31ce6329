"""Stages: which parts of the model train (NVLM's recipe, prismatic's stage-driven freezing).

- pretrain: ViT and LLM frozen, only the projector trains (it learns to speak the LLM's embedding language);
- sft: ViT frozen, projector and LLM train.
`unfreeze` adds to that: the whole ViT, or only its last k layers (the ones nearest the projector, which adapt
most cheaply), may force the LLM on or off, and may limit LLM training to its last k decoder layers. The
result is printed as a table at start, so a run never trains something by accident.
With `lora.enabled`, `stitch.models.lora.apply_lora` runs last: the LoRA parts' base weights freeze, adapters are
added and train, and the table counts the adapters of each part.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from stitch.models.lora import apply_lora, is_adapter_name
from stitch.models.vlm import VLM
from stitch.train.config import TrainConfig

__all__ = ["apply_stage", "PartCount", "count_parameters", "parameter_table", "trainable_vision_layers"]


@dataclass
class PartCount:
    part: str
    trainable: int  # adapters included
    frozen: int
    adapters: int = 0  # LoRA adapter parameters (all trainable)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def trainable_vision_layers(model: VLM, cfg: TrainConfig) -> int:
    """How many of the ViT's used layers (counted from the last used one) train: 0, k, or all."""
    used = model.config.vision.num_layers_used  # the config: a later pipeline stage holds no ViT
    if cfg.unfreeze.vision:
        return used
    return min(cfg.unfreeze.vision_last_layers, used)


def apply_stage(model: VLM, cfg: TrainConfig) -> dict[str, PartCount]:
    """Set `requires_grad` on every parameter for `cfg`'s stage; return the per-part counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.projector.parameters():
        p.requires_grad_(cfg.unfreeze.projector)
    if cfg.trains("llm"):
        k = cfg.unfreeze.llm_last_layers
        modules = [model.llm] if not k else [*model.llm.layers[-k:], model.llm.norm]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)
    if cfg.unfreeze.vision:
        for p in model.vision.parameters():
            p.requires_grad_(True)
    elif cfg.unfreeze.vision_last_layers:
        used = model.config.vision.num_layers_used  # the config: a later pipeline stage holds no ViT
        k = trainable_vision_layers(model, cfg)
        for layer in model.vision.layers[used - k : used]:
            for p in layer.parameters():
                p.requires_grad_(True)
        # The post-norm sits after the last layer; it trains with it when the features pass through it.
        if model.vision.post_norm is not None and model.vision.config.applies_post_norm:
            for p in model.vision.post_norm.parameters():
                p.requires_grad_(True)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    return count_parameters(model)


def count_parameters(model: VLM) -> dict[str, PartCount]:
    """Trainable/frozen (and LoRA adapter) parameter counts per part (tied weights counted once)."""
    counts = {}
    for name, part in model.parts().items():
        seen: dict[int, tuple[str, nn.Parameter]] = {id(p): (n, p) for n, p in part.named_parameters()}
        trainable = sum(p.numel() for _, p in seen.values() if p.requires_grad)
        frozen = sum(p.numel() for _, p in seen.values() if not p.requires_grad)
        adapters = sum(p.numel() for n, p in seen.values() if is_adapter_name(n))
        counts[name] = PartCount(name, trainable, frozen, adapters)
    return counts


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def parameter_table(counts: dict[str, PartCount], title: str = "parameters"):
    """A rich Table of trainable and frozen parameters per part, with totals; with LoRA, an `adapters` column
    (adapter parameters, part of `trainable`) and the state says which parts learn through adapters."""
    from rich.table import Table

    lora = any(c.adapters for c in counts.values())
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("trainable", justify="right")
    if lora:
        table.add_column("adapters", justify="right")
    table.add_column("frozen", justify="right")
    table.add_column("total", justify="right")
    table.add_column("state")
    for c in counts.values():
        state = "trains" if c.frozen == 0 and c.trainable else "frozen" if c.trainable == 0 else "partly trains"
        if c.adapters:
            state = "LoRA" if c.trainable == c.adapters else "LoRA + partly trains"
        extra = [_human(c.adapters)] if lora else []
        table.add_row(c.part, _human(c.trainable), *extra, _human(c.frozen), _human(c.total), state)
    total_t = sum(c.trainable for c in counts.values())
    total_f = sum(c.frozen for c in counts.values())
    extra = [_human(sum(c.adapters for c in counts.values()))] if lora else []
    table.add_row("all", _human(total_t), *extra, _human(total_f), _human(total_t + total_f), "", style="bold")
    return table
